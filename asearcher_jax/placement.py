"""Which accelerators, and how much of their memory, each role of a run takes; where the others
are. Applied by each process before JAX touches a device, so it needs no launcher of its own:
the same config tells every process on every host its share.

Two roles hold accelerators: the learner and the decode servers. Colocated, they share this
host's devices and split each device's memory (`colocated_learner_share` to the learner, the
rest evenly to the host's decode servers); disaggregated, each gets whole devices: a split of
this host's (`learner_devices` / `decode_devices`), or other hosts and slices. Device ids and
memory shares take effect on GPUs; TPU chips cannot be shared by two processes, so on TPUs the
roles go to separate hosts (slices).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Literal, Mapping, MutableMapping, Sequence

from asearcher_jax import auth
from asearcher_jax.errors import ConfigError
from asearcher_jax.section import check_address

if TYPE_CHECKING:  # annotations only: config.py assembles every section, above this module
  from asearcher_jax.config import Config

log = logging.getLogger(__name__)

Role = Literal["learner", "decode"]
ROLES = ("learner", "decode")


# jaxlib reads the share of a GPU it preallocates from either name (the second is the older,
# deprecated one) and refuses both at once.
MEM_FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def operator_mem_fraction(environ: Mapping[str, str] = os.environ) -> str | None:
  """The memory fraction already in the environment, under either name: the operator's."""
  return next((environ[k] for k in MEM_FRACTION_VARS if environ.get(k)), None)


def memory_fraction(cfg: Config, role: Role) -> float:
  """The share of each of its devices' memory a process of `role` may take."""
  p = cfg.placement
  if p.mode == "disaggregated":
    return p.memory_fraction
  if role == "learner":
    return p.memory_fraction * p.colocated_learner_share
  return p.memory_fraction * (1.0 - p.colocated_learner_share) / max(1, cfg.rl.decode_servers)


def role_devices(cfg: Config, role: Role) -> tuple[int, ...] | None:
  """This host's accelerator ids for `role` (a decode server: its replica's share), or None
  for all of them."""
  p = cfg.placement
  if role == "learner":
    return p.learner_devices
  if p.decode_devices is None:
    return None
  k = p.decode_num_devices or len(p.decode_devices)
  replicas = len(p.decode_devices) // k
  if p.decode_replica >= replicas:
    raise ConfigError(f"placement.decode_replica {p.decode_replica}: decode_devices "
                      f"{list(p.decode_devices)} hold {replicas} decode server(s) of {k} "
                      "device(s)")
  return p.decode_devices[p.decode_replica * k:(p.decode_replica + 1) * k]


def role_config(cfg: Config, role: Role):
  """The config a process of `role` runs with: a decode server takes `placement.decode_mesh`
  and `decode_param_dtype`; a learner takes `learner_devices` as its local devices."""
  p = cfg.placement
  if role == "decode":
    update = {}
    if p.decode_mesh is not None:
      update["mesh"] = p.decode_mesh
    if p.decode_param_dtype is not None:
      update["model"] = cfg.model.model_copy(update={"param_dtype": p.decode_param_dtype})
    return cfg.model_copy(update=update)
  d = cfg.distributed
  if p.learner_devices is not None and d.local_device_ids is None:
    return cfg.model_copy(update={"distributed": d.model_copy(
        update={"local_device_ids": p.learner_devices})})
  if (p.learner_devices is not None
      and tuple(d.local_device_ids) != tuple(p.learner_devices)):
    raise ConfigError(f"placement.learner_devices {list(p.learner_devices)} and "
                      f"distributed.local_device_ids {list(d.local_device_ids)} disagree")
  return cfg


def apply(cfg: Config, role: Role, environ: MutableMapping[str, str] = os.environ):
  """Restricts this process to its role's devices and memory share and returns `role_config`.

  Must run before JAX initialises a backend; a memory fraction already in the environment
  (`operator_mem_fraction`) is the operator's and wins.
  """
  if role not in ROLES:
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")
  import jax
  if _backends_started():
    raise ConfigError(f"placement for the {role} must be applied before JAX starts")
  if operator_mem_fraction(environ) is None:  # the older name: every jaxlib since 0.4 reads it
    environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{memory_fraction(cfg, role):.3f}"
  ids = role_devices(cfg, role)
  if ids is not None:
    try:
      jax.config.update("jax_cuda_visible_devices", ",".join(str(i) for i in ids))
    except (AttributeError, ValueError) as e:  # a JAX without CUDA support
      log.warning("cannot restrict CUDA devices to %s: %s", list(ids), e)
  return role_config(cfg, role)


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a JAX that moved it: assume not started
    return False


def serving_param_dtype(cfg: Config, platform: str) -> str:
  """The dtype a decode server holds its weights in: `placement.decode_param_dtype` when set;
  else on an accelerator the model's compute dtype, so weights are cast once (at load and at
  each weight swap) instead of at every step and decode reads half the bytes; on CPU, which
  gains nothing from bfloat16, `model.param_dtype`. The learner keeps its own master weights."""
  p, m = cfg.placement, cfg.model
  if p.decode_param_dtype is not None:
    return p.decode_param_dtype
  if platform != "cpu" and m.dtype != "float32":
    return m.dtype
  return m.param_dtype


def client_token(cfg: Config) -> str | None:
  """The token this run's clients send: serve.token, else $ASEARCHER_TOKEN."""
  return cfg.serve.token or os.environ.get("ASEARCHER_TOKEN") or None


def replay_address(cfg: Config, given: str | None) -> str:
  """The replay queue: the command line's, else the config's."""
  address = given or cfg.placement.replay_address
  if not address:
    raise ConfigError("no replay queue address: pass --replay or set placement.replay_address")
  _check_reachable(cfg, [address], "the replay queue")
  return address


def decode_addresses(cfg: Config, given: Sequence[str] | None) -> list[str]:
  """The decode servers: the command line's, else the config's (possibly none)."""
  addresses = list(given) if given else list(cfg.placement.decode_addresses)
  _check_reachable(cfg, addresses, "decode servers")
  return addresses


def worker_decode_address(cfg: Config, worker: int) -> str:
  """The decode server rollout worker `worker` uses: the config's, round robin."""
  addresses = decode_addresses(cfg, None)
  if not addresses:
    raise ConfigError("no decode server for the rollout worker: pass --decode or set "
                      "placement.decode_addresses")
  return addresses[worker % len(addresses)]


def _check_reachable(cfg: Config, addresses: Sequence[str], what: str) -> None:
  """Servers off loopback refuse clients without a token: say so before connecting."""
  for a in addresses:
    try:
      check_address(a, what)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  remote = [a for a in addresses if not auth.is_loopback(a.rsplit(":", 1)[0].strip("[]"))]
  if remote and not client_token(cfg):
    raise ConfigError(f"{what} at {remote} are not on loopback and require a token: set "
                      "serve.token or $ASEARCHER_TOKEN")
