"""Weight publication after each learner step: versioned and atomic.

`DriverPublisher` is the colocated fast path (the decode driver lives in the learner's
process: a device-side copy, committed between two decode steps). `CheckpointPublisher`
reaches decode servers in other processes: the weights are written as an orbax policy
checkpoint whose step is the version (orbax renames a step into place only when complete),
then every server is told to load and commit that step. Only when all have committed does the
caller advance the version clock (the replay queue's version), so no rollout is admitted
against a version some server does not serve yet.

A learner spanning several processes publishes the same way with no gather of the model on any
host: every process writes the shards it holds (orbax, chunked) and hashes them into a
per-chunk content manifest saved in the same step (asearcher_jax.manifest), which each decode
server checks on load; process 0 alone then talks to the servers and tells the others what
they answered. The directory must be one filesystem shared by learner and decode hosts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp

from asearcher_jax import distributed
from asearcher_jax import manifest as weight_manifest
from asearcher_jax.models.config import QwenConfig
from asearcher_jax.models.params import flat_state
from asearcher_jax.models.pretrained import save_policy


class Publisher(Protocol):
  def publish(self, version: int, params) -> dict: ...

  def served(self) -> int:
    """The newest version any decode server holds: a learner that died between the servers'
    commit and the queue's version starts above it, never reusing a tag."""
    ...

  def close(self) -> None: ...


class DriverPublisher:
  """In-process decode drivers. The learner donates its params to the next step, so the
  drivers get a copy."""

  def __init__(self, drivers: Sequence):
    self.drivers = list(drivers)

  def publish(self, version: int, params) -> dict:
    from asearcher_jax.inference.weights import load_weights
    out = {}
    for i, d in enumerate(self.drivers):
      copy = jax.tree.map(jnp.copy, flat_state(params))
      new = load_weights(d.engine.params, copy, d.engine.cfg)
      out[f"driver{i}"] = d.update_weights(version, new)
    return out

  def served(self) -> int:
    return max((d.version for d in self.drivers), default=0)

  def close(self) -> None:
    pass


class CheckpointPublisher:
  """Decode servers over gRPC, fed through an orbax policy checkpoint directory."""

  def __init__(self, directory: str, cfg: QwenConfig, addresses: Sequence[str], *,
               tokenizer_dir: str | None = None, token: str | None = None, keep: int = 2,
               timeout_s: float = 600.0, dtype=None, verify: bool = True):
    self.directory, self.cfg, self.addresses = os.path.abspath(directory), cfg, list(addresses)
    self.tokenizer_dir, self.token, self.keep, self.timeout_s = tokenizer_dir, token, keep, \
        timeout_s
    self.dtype = None if dtype is None else jnp.dtype(dtype)  # what the servers hold
    self.verify = verify

  def publish(self, version: int, params) -> dict:
    """Every process of the learner calls it with its shards of `params`."""
    if distributed.is_primary():
      self._drop_from(version)  # left by a run that is being resumed: replaced, never mixed
    distributed.barrier(f"publish-{version}")
    flat = flat_state(params)
    if self.dtype is not None:  # cast on device, shard by shard: half the bytes for bf16
      flat = {k: v.astype(self.dtype) for k, v in flat.items()}
    manifest = weight_manifest.build(flat) if self.verify else None
    save_policy(self.directory, version, flat, self.cfg, tokenizer_dir=self.tokenizer_dir,
                version=version, manifest=manifest)
    self.tokenizer_dir = None  # copied once; later steps reuse it
    out = distributed.on_primary(lambda: asyncio.run(self._commit(version)))
    if distributed.is_primary():
      self._prune(version)
    return out

  async def _each_server(self, call) -> dict:
    """{address: await call(client)} over every decode server at once."""
    from asearcher_jax.inference.client import DecodeClient

    async def one(address):
      async with DecodeClient(address, token=self.token, timeout=self.timeout_s) as c:
        return address, await call(c)

    return dict(await asyncio.gather(*(one(a) for a in self.addresses)))

  async def _commit(self, version: int) -> dict:
    async def commit(c):
      r = await c.update_weights(version, orbax_dir=self.directory, step=version)
      return {"version": r.version, "interrupted": r.interrupted, "load_s": r.load_s,
              "commit_s": r.commit_s}

    return await self._each_server(commit)

  def served(self) -> int:
    return distributed.on_primary(lambda: asyncio.run(self._served()))

  async def _served(self) -> int:
    async def version(c):
      return int((await c.stats(wait_for_ready=True)).version)  # servers may be starting

    return max((await self._each_server(version)).values(), default=0)

  def _drop_from(self, version: int) -> None:
    if os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if name.isdigit() and int(name) >= version:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def _prune(self, version: int) -> None:
    """Steps older than the last `keep` are no longer served by anyone."""
    for name in os.listdir(self.directory):
      if name.isdigit() and int(name) <= version - self.keep:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def close(self) -> None:
    pass
