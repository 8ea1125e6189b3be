"""Per-chunk content hashes of sharded weights: written by the publisher, checked by every reader.

A tensor's chunks are the distinct shards of the writer's layout. Each chunk is hashed once,
by the process that owns the device holding it (the lowest device id among its replicas), from
that device's own shard: only digests cross processes, never the weights. A reader with any
layout rebuilds each chunk from whichever of its local shards overlap it and compares digests,
so weights that arrive torn, stale or corrupted are refused by name.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import jax
import numpy as np

from asearcher_jax.errors import CheckpointError

FORMAT = 1
_DIGEST = 32  # sha256


def _bounds(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  return tuple((s.start or 0, shape[d] if s.stop is None else s.stop)
               for d, s in enumerate(index)) if shape else ()


def _digest(x: np.ndarray) -> bytes:
  return hashlib.sha256(np.ascontiguousarray(x).tobytes()).digest()


def _chunks(x) -> list[tuple[tuple[tuple[int, int], ...], Any]]:
  """[(bounds, owner device or None)] in a fixed order every process agrees on."""
  if not isinstance(x, jax.Array):
    return [(_bounds((slice(None),) * np.ndim(x), np.shape(x)), None)]
  owners: dict[tuple, Any] = {}
  for device, index in x.sharding.devices_indices_map(x.shape).items():
    b = _bounds(index, x.shape)
    if b not in owners or device.id < owners[b].id:
      owners[b] = device
  return sorted(owners.items(), key=lambda kv: kv[0])


def build(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The manifest of flat {"a/b": array} weights. Collective when arrays span processes:
  every process must call it, with the same names."""
  names = sorted(flat)
  plan = [(name, b, owner) for name in names for b, owner in _chunks(flat[name])]
  digests = np.zeros((len(plan), _DIGEST), np.uint8)
  me = jax.process_index()
  local: dict[str, dict] = {}
  for i, (name, b, owner) in enumerate(plan):
    x = flat[name]
    if owner is None:  # a host array, the same everywhere: process 0 speaks for it
      if me == 0:
        digests[i] = np.frombuffer(_digest(np.asarray(x)), np.uint8)
    elif owner.process_index == me:
      shards = local.setdefault(name, {s.device: s for s in x.addressable_shards})
      digests[i] = np.frombuffer(_digest(np.asarray(shards[owner].data)), np.uint8)
  if jax.process_count() > 1:  # each chunk has exactly one owner; the others hold zeros
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(digests)
    digests = gathered.astype(np.uint32).sum(axis=0).astype(np.uint8)
  tensors: dict[str, Any] = {}
  for (name, b, _), d in zip(plan, digests):
    x = flat[name]
    entry = tensors.setdefault(name, {"shape": list(np.shape(x)),
                                      "dtype": str(np.dtype(x.dtype)), "chunks": []})
    entry["chunks"].append([[list(r) for r in b], bytes(d).hex()])
  return {"format": FORMAT, "hash": "sha256", "tensors": tensors}


def dtypes(manifest: Mapping[str, Any]) -> dict[str, str]:
  return {k: v["dtype"] for k, v in manifest["tensors"].items()}


def verify(flat: Mapping[str, Any], manifest: Mapping[str, Any], source: str = "weights") -> int:
  """Raises CheckpointError naming the first tensor whose content differs from the manifest;
  returns the number of chunks checked (all of them when the arrays are addressable here)."""
  if manifest.get("format") != FORMAT or manifest.get("hash") != "sha256":
    raise CheckpointError(f"{source}: unknown weight manifest format "
                          f"{manifest.get('format')}/{manifest.get('hash')}")
  tensors = manifest["tensors"]
  missing, extra = sorted(set(tensors) - set(flat)), sorted(set(flat) - set(tensors))
  if missing or extra:
    raise CheckpointError(f"{source}: weights and manifest disagree: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}")
  checked = 0
  for name in sorted(tensors):
    entry, x = tensors[name], flat[name]
    if list(np.shape(x)) != entry["shape"] or str(np.dtype(x.dtype)) != entry["dtype"]:
      raise CheckpointError(f"{source}: {name} is {list(np.shape(x))} {np.dtype(x.dtype)}, the "
                            f"manifest says {entry['shape']} {entry['dtype']}")
    pieces = _local_pieces(x)
    for bounds, want in entry["chunks"]:
      got = _assemble(pieces, [tuple(r) for r in bounds], x.dtype)
      if got is None:  # not all of it is on this process (a multi-host reader)
        continue
      if _digest(got).hex() != want:
        raise CheckpointError(
            f"{source}: {name}[{', '.join(f'{a}:{b}' for a, b in bounds)}] does not match "
            "the hash its writer recorded: the weights were corrupted or changed while read")
      checked += 1
  return checked


def _local_pieces(x) -> list[tuple[tuple[tuple[int, int], ...], np.ndarray]]:
  if not isinstance(x, jax.Array):
    a = np.asarray(x)
    return [(_bounds((slice(None),) * a.ndim, a.shape), a)]
  seen, out = set(), []
  for s in x.addressable_shards:
    b = _bounds(s.index, x.shape)
    if b not in seen:
      seen.add(b)
      out.append((b, np.asarray(s.data)))
  return out


def _assemble(pieces, bounds, dtype) -> np.ndarray | None:
  """The chunk `bounds`, copied together from local pieces; None if they do not cover it."""
  shape = tuple(b - a for a, b in bounds)
  out = np.empty(shape, dtype)
  covered = 0
  for pb, data in pieces:
    inter = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(bounds, pb)]
    if any(lo >= hi for lo, hi in inter):
      continue
    dst = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, bounds))
    src = tuple(slice(lo - c, hi - c) for (lo, hi), (c, _) in zip(inter, pb))
    out[dst] = data[src]
    covered += int(np.prod([hi - lo for lo, hi in inter]))
    if covered >= int(np.prod(shape)):
      return out
  return out if covered >= int(np.prod(shape)) else None
