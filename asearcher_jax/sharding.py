"""The device mesh and the one table that maps logical axes onto it.

Parameters and activations name their axes logically ("embed", "q_heads", ...);
`LOGICAL_RULES` is the only place that says which mesh axis each one is split
over. FSDP shards the embed dimension of every weight, tensor parallelism
splits heads, MLP and vocab; the batch is split over data and fsdp together.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from asearcher_jax.errors import ShardingError

MESH_AXES = ("data", "fsdp", "tensor")

LogicalAxes = tuple[str | None, ...]

LOGICAL_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "qkv": None,  # query heads, key, value of one kv head's group (models/qwen.py fuse_qkv)
    "mlp": "tensor",
    "gate_up": None,
    "layers": None,
    "norm": None,
    # activations and caches
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves a mesh shape (one axis may be -1) over `num_devices`, without touching devices.

  One axis may be -1 and takes what the others leave. The product must equal the device
  count exactly, so no device is silently idle.
  """
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ShardingError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ShardingError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not "
          f"divide the {num_devices} available devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ShardingError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but "
        f"{num_devices} are available")
  return dict(zip(MESH_AXES, sizes))


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh over all devices of all processes (`mesh_shape`).

  With several processes (`jax.distributed`), `jax.devices()` lists every process's devices,
  process by process; the last axes vary fastest, so `tensor` (then `fsdp`) stays within a
  host, where bandwidth is highest, whenever it fits there.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(shape, len(devices))
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: LogicalAxes, rules: Mapping = LOGICAL_RULES) -> P:
  out = []
  for a in axes:
    if a is not None and a not in rules:
      raise ShardingError(f"logical axis {a!r} has no entry in the sharding rules")
    out.append(None if a is None else rules[a])
  return P(*out)


def mesh_size(mesh, target) -> int:
  """Devices along a rule's target (None, an axis name, or a tuple of them) of a (abstract) mesh."""
  if target is None:
    return 1
  names = (target,) if isinstance(target, str) else target
  return math.prod(mesh.shape[n] for n in names)


def check_divisible(name: str, shape: Sequence[int], axes: LogicalAxes, mesh: Mesh,
                    rules: Mapping = LOGICAL_RULES) -> None:
  """Raises unless every sharded dimension of `name` divides evenly over its mesh axes."""
  for dim, (size, axis) in enumerate(zip(shape, axes)):
    target = None if axis is None else rules.get(axis)
    n = mesh_size(mesh, target)
    if size % n:
      raise ShardingError(
          f"{name}: dimension {dim} ({axis}, size {size}) is not divisible by mesh axis "
          f"{target!r} of size {n}; choose a mesh whose {target!r} size divides {size}")


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules: Mapping = LOGICAL_RULES):
  """NamedShardings for an nnx State whose Variables carry `logical_axes` metadata.

  The result has the State's own structure, so it can be passed straight to
  `jax.jit(out_shardings=...)` or used to build restore targets.
  """

  def one(path, var):
    axes = var.get_metadata().get("logical_axes")
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if axes is None:
      return var.replace(NamedSharding(mesh, P()))
    check_divisible(name, var.get_value().shape, axes, mesh, rules)
    return var.replace(NamedSharding(mesh, logical_to_spec(axes, rules)))

  return jax.tree.map_with_path(one, state, is_leaf=_is_var)


def activation_target(mesh, axis: str | None, size: int, rules: Mapping = LOGICAL_RULES):
  """The mesh axes an activation's logical `axis` of length `size` shards over: its rule's
  target, or None (replicated) when the target does not divide it (e.g. batch 1 at decode)."""
  target = None if axis is None else rules[axis]
  return target if size % mesh_size(mesh, target) == 0 else None


def constrain(x: jax.Array, axes: LogicalAxes, rules: Mapping = LOGICAL_RULES) -> jax.Array:
  """Sharding constraint on an activation, a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = [activation_target(mesh, a, size, rules) for size, a in zip(x.shape, axes)]
  return jax.lax.with_sharding_constraint(x, P(*spec))


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{n}={s}" for n, s in mesh.shape.items()) + f" ({mesh.devices.size} devices)"

