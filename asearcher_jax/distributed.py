"""JAX's multi-controller runtime for a learner that spans processes, and the few collectives
the host-side code needs.

Every process of the learner runs the same program: `initialize` joins it to the others
(`jax.distributed`), after which `jax.devices()` lists every device of every process and the
learner mesh spans them all. Host-side decisions that must agree everywhere (what to train on,
whether to stop, what a remote service answered) are taken by process 0 and broadcast, so no
process can take a different branch and leave the others waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import numpy as np

from asearcher_jax.errors import AsearcherError, ConfigError

if TYPE_CHECKING:  # annotations only: config.py assembles every section, above this module
  from asearcher_jax.config import DistributedSection

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins (or does not join) a multi-process run, before anything starts."""

  enabled: bool
  reason: str  # what decided it: config, env, slurm, ompi, tpu, off, single-process
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # for jax.distributed


def detect_launcher(environ: Mapping[str, str] = os.environ) -> str | None:
  """The multi-process launcher this process runs under, when it started more than one."""
  if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return "slurm"
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "ompi"
  # GKE TPU JobSets list every host of the slice; Cloud TPU VMs of a pod are told by metadata,
  # which only JAX's own detector reads (launch/tpu_pod.sh sets distributed.mode=on there).
  hosts = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES") or ""
  if "," in hosts or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def _ids(value: str, key: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in value.split(",") if x.strip())
  except ValueError:
    raise ConfigError(f"${key}={value!r}: expected comma-separated device ids") from None


def _int(environ: Mapping[str, str], key: str) -> int | None:
  value = environ.get(key)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"${key}={value!r}: expected an integer") from None


def resolve(cfg: DistributedSection, environ: Mapping[str, str] = os.environ) -> Launch:
  """Decides from the `distributed:` section and the environment; starts nothing."""
  if cfg.mode == "off":
    return Launch(False, "off")
  address = cfg.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
  num = cfg.num_processes if cfg.num_processes is not None else _int(environ, "JAX_NUM_PROCESSES")
  pid = cfg.process_id if cfg.process_id is not None else _int(environ, "JAX_PROCESS_ID")
  ids = cfg.local_device_ids
  if ids is None and environ.get("JAX_LOCAL_DEVICE_IDS"):
    ids = _ids(environ["JAX_LOCAL_DEVICE_IDS"], "JAX_LOCAL_DEVICE_IDS")
  launcher = detect_launcher(environ)
  if cfg.mode == "auto" and address is None and launcher is None:
    return Launch(False, "single-process")
  if address is not None and launcher is None and cfg.mode == "auto" and (num is None
                                                                         or pid is None):
    raise ConfigError(
        f"distributed: coordinator {address} is set but distributed.num_processes and "
        "distributed.process_id are not (nor $JAX_NUM_PROCESSES / $JAX_PROCESS_ID), and no "
        "launcher (SLURM, Open MPI, TPU pod) was detected to provide them")
  if num is not None and pid is not None and not 0 <= pid < num:
    raise ConfigError(f"distributed: process id {pid} is not in [0, {num})")
  kwargs: dict[str, Any] = {
      "coordinator_address": address, "num_processes": num, "process_id": pid,
      "local_device_ids": list(ids) if ids is not None else None,
      "initialization_timeout": cfg.initialization_timeout_s,
      "heartbeat_timeout_seconds": cfg.heartbeat_timeout_s}
  if address is not None:
    # JAX's coordinator would otherwise listen on every interface: it has no authentication,
    # so it listens only where it was told to be (loopback stays loopback).
    kwargs["coordinator_bind_address"] = address
  reason = "config" if cfg.coordinator_address else ("env" if address else launcher or "on")
  return Launch(True, reason, kwargs)


def initialize(cfg: DistributedSection, environ: Mapping[str, str] = os.environ) -> bool:
  """Joins this process to the run's others (once, before any device is touched); returns
  whether the run is multi-process."""
  if jax.distributed.is_initialized():
    return True
  launch = resolve(cfg, environ)
  if not launch.enabled:
    return False
  try:  # CPU devices talk over gloo; newer JAX may drop or rename the flag
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  except (AttributeError, ValueError) as e:
    log.warning("could not select CPU collectives %r: %s", cfg.cpu_collectives, e)
  try:
    jax.distributed.initialize(**launch.kwargs)
  except RuntimeError as e:  # e.g. a device was touched first
    raise ConfigError(f"distributed: cannot initialise ({launch.reason}): {e}") from None
  except ValueError as e:  # nothing told JAX the coordinator or the process count
    raise ConfigError(f"distributed: {e} (set distributed.coordinator_address, "
                      "num_processes and process_id, or run under SLURM / a TPU pod)") from None
  log.info("process %d of %d (%s), %d of %d devices local", jax.process_index(),
           jax.process_count(), launch.reason, jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def broadcast_bytes(data: bytes) -> bytes:
  """Process 0's `data` on every process (the others' argument is ignored).

  Sizes are padded to powers of two so that a stream of messages compiles a handful of
  programs, not one per length.
  """
  if jax.process_count() == 1:
    return data
  from jax.experimental import multihost_utils
  primary = is_primary()
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data) if primary else 0)))
  size = max(256, 1 << max(n - 1, 0).bit_length())
  buf = np.zeros(size, np.uint8)
  if primary:
    buf[:n] = np.frombuffer(data, np.uint8)
  out = multihost_utils.broadcast_one_to_all(buf)
  return np.asarray(out, np.uint8)[:n].tobytes()


class PrimaryFailed(AsearcherError):
  """What process 0 raised, as seen by the other processes."""


def on_primary(fn: Callable[[], Any], encode: Callable[[Any], bytes] | None = None,
               decode: Callable[[bytes], Any] | None = None) -> Any:
  """Runs `fn` on process 0 only; every process returns its result, or raises its error
  (process 0 its own exception, the others `PrimaryFailed`), so all take the same branch."""
  encode = encode or (lambda v: json.dumps(v).encode())
  decode = decode or json.loads
  if jax.process_count() == 1:
    return fn()
  error: BaseException | None = None
  payload = b""
  if is_primary():
    try:
      payload = b"+" + encode(fn())
    except Exception as e:  # noqa: BLE001 -- handed to every process, re-raised below
      error = e
      payload = b"!" + f"{type(e).__name__}: {e}".encode()
  payload = broadcast_bytes(payload)
  if payload[:1] == b"!":
    if error is not None:
      raise error
    raise PrimaryFailed(f"process 0 failed: {payload[1:].decode(errors='replace')}")
  return decode(payload[1:])
