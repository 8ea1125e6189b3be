"""`asearcher plan`: what each device will hold, for a config and its meshes, before launch.

A learner device holds its shards of the parameters, the AdamW moments (and the update being
applied), the float32 gradient accumulator beside one micro-batch's gradients, the layers'
weights in the compute dtype (cast once a step), the activations of one micro-batch under the
remat policy, and one chunk of its logits. A decode server
device holds its parameters, a second copy while a new version loads, the KV cache of
serve.slots x serve.max_len, the sessions kept on device, and the largest batched prefill its
driver runs (serve.prefill_tokens).

Shapes come from the model config and shardings from the one rules table
(asearcher_jax.sharding.LOGICAL_RULES), so a mesh that does not divide a tensor is refused
here exactly as it would be at launch. Parameters, optimizer state, gradients and caches are
exact counts; activations and the LM head's chunk estimate what XLA keeps alive: before the
fused LM head the learner total came within -4% to +23% of the peak XLA allocated on an H100
(jax 0.11.2; Qwen2.5-0.5B/1.5B shapes, 2k-8k-token rows, four remat/attention settings; to be
measured again), and it is checked against XLA's buffer assignment on CPU in
tests/test_memory_plan.py. A config whose total exceeds a device's budget is
refused, naming its biggest item and what shrinks it.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from asearcher_jax.errors import ConfigError
from asearcher_jax.models.attention import KEPT_KERNELS, KERNELS, resolve_impl_for
from asearcher_jax.models.config import REMAT_BY_MEMORY
from asearcher_jax.models.lm_head import chunk_length
from asearcher_jax.placement import memory_fraction, operator_mem_fraction, role_devices
from asearcher_jax.sharding import LOGICAL_RULES, check_divisible, mesh_shape, mesh_size

if TYPE_CHECKING:  # annotations only: config.py assembles every section, above this module
  from asearcher_jax.config import Config

GiB = 1 << 30


class PlanError(ConfigError):
  """The config does not fit its devices."""


@dataclasses.dataclass(frozen=True)
class Item:
  name: str
  bytes: int
  hint: str  # what makes it smaller


@dataclasses.dataclass
class Group:
  """One role's devices: its mesh, what each device holds and how much it may hold."""

  role: str
  mesh: dict[str, int]
  items: list[Item]
  budget: int | None  # bytes per device this role may use; None: memory unknown
  budget_note: str = ""

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())

  @property
  def total(self) -> int:
    return sum(i.bytes for i in self.items)

  @property
  def biggest(self) -> Item:
    return max(self.items, key=lambda i: i.bytes)

  @property
  def fits(self) -> bool:
    return self.budget is None or self.total <= self.budget


@dataclasses.dataclass
class Plan:
  groups: list[Group]
  mode: str
  device_memory: int | None
  warnings: list[str]
  remat: str  # the learner's remat policy (`auto` resolved)
  remat_note: str = ""  # why `auto` chose it
  platform: str = ""  # what `auto` attention and remat were resolved for

  def report(self) -> str:
    lines = []
    memory = "unknown" if self.device_memory is None else _gib(self.device_memory)
    lines.append(f"placement {self.mode}; platform {self.platform}; device memory {memory}")
    if self.remat_note:
      lines.append(f"model.remat auto: {self.remat} ({self.remat_note})")
    for g in self.groups:
      mesh = " x ".join(f"{k}={v}" for k, v in g.mesh.items())
      lines.append(f"{g.role}: mesh {mesh} ({g.devices} devices), per device:")
      for i in g.items:
        lines.append(f"  {i.name:<58} {_gib(i.bytes):>11}")
      budget = "no budget (memory unknown)" if g.budget is None else \
          f"of {_gib(g.budget)} ({g.budget_note})"
      verdict = "" if g.budget is None else ("  fits" if g.fits else "  DOES NOT FIT")
      lines.append(f"  {'total':<58} {_gib(g.total):>11} {budget}{verdict}")
    lines += [f"warning: {w}" for w in self.warnings]
    return "\n".join(lines)

  def check(self) -> None:
    """Raises PlanError for the first role that does not fit, naming its biggest item."""
    for g in self.groups:
      if not g.fits:
        b = g.biggest
        raise PlanError(f"{g.role}: {_gib(g.total)} per device does not fit its "
                        f"{_gib(g.budget)} ({g.budget_note}); the biggest item is {b.name} "
                        f"({_gib(b.bytes)}): {b.hint}")


def _gib(n: int) -> str:
  return f"{n / GiB:.2f} GiB"


def _itemsize(dtype: str) -> int:
  return jnp.dtype(dtype).itemsize


def _split(size: int, ways: int) -> int:
  """What one device holds of `size` split `ways` ways (the model replicates what does not
  divide: `sharding.constrain`)."""
  return size // ways if size % ways == 0 else size


def param_elements(arch, mesh: dict[str, int], param_dtype: str = "float32",
                   under: str = "") -> int:
  """Parameter elements one device holds under `mesh` (the rules table's sharding), of the
  parameters whose path starts with `under`; raises ShardingError for a tensor the mesh does
  not divide."""
  return sum(n for name, _, n in _param_shards(arch, mesh, param_dtype) if name.startswith(under))


def served_param_bytes(arch, mesh: dict[str, int], param_dtype: str, quantization: str
                       ) -> tuple[int, int]:
  """Bytes of the weights one decode device holds, and of the largest one in float32: in
  `param_dtype`, or with `serve.quantization: int8` the matmul weights as int8 plus their
  float32 scales (counted whole: a scale per output channel is a sliver of its weight)."""
  from asearcher_jax.models.qwen import QUANTIZED_AXES
  total, largest = 0, 0
  for name, shape, n in _param_shards(arch, mesh, param_dtype):
    largest = max(largest, 4 * n)
    if quantization == "int8" and name in QUANTIZED_AXES:
      kept = math.prod(d for i, d in enumerate(shape) if i not in QUANTIZED_AXES[name])
      total += n + 4 * kept
    else:
      total += n * _itemsize(param_dtype)
  return total, largest


def _param_shards(arch, mesh: dict[str, int], param_dtype: str):
  """(path, shape, elements one device holds) of every parameter under `mesh`."""
  from flax import nnx

  from asearcher_jax.models.pretrained import abstract_model
  fake = types.SimpleNamespace(shape=mesh)
  state = nnx.state(abstract_model(arch, param_dtype=param_dtype), nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for path, var in leaves:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    axes = var.get_metadata().get("logical_axes")
    shape = var.get_value().shape
    if axes is None:
      yield name, shape, math.prod(shape)
      continue
    check_divisible(name, shape, axes, fake)
    ways = math.prod(mesh_size(fake, LOGICAL_RULES[a]) for a in axes if a is not None)
    yield name, shape, math.prod(shape) // ways


def _layer_dims(arch, t: int) -> dict[str, int]:
  """Per-device widths of one layer's activations under tensor parallelism t."""
  return {"E": arch.hidden_size, "F": _split(arch.intermediate_size, t),
          "N": _split(arch.num_heads, t), "K": _split(arch.num_kv_heads, t), "D": arch.head_dim,
          "V": _split(arch.vocab_size, t)}


def _layer_live(d: dict[str, int], cb: int) -> int:
  """Bytes per token of everything one layer's forward creates: residual and norms (4E), q, k,
  v before and after RoPE and the attention output (3(N+K)D), and the MLP's gate, up, silu
  and product (4F)."""
  return cb * (4 * d["E"] + 3 * (d["N"] + d["K"]) * d["D"] + 4 * d["F"])


def _attention_residuals(d: dict[str, int], cb: int, impl: str) -> int:
  """Bytes per token a flash kernel's backward reads: q and the output, k and v (repeated to
  the query heads for the Pallas kernels), the log-sum-exp (float32), positions and segments."""
  kv_heads = d["K"] if impl == "blockwise" else d["N"]
  return cb * 2 * (d["N"] + kv_heads) * d["D"] + 4 * d["N"] + 8


def learner_group(cfg: Config, arch, devices: int, platform: str) -> tuple[Group, list[str]]:
  m, rl = cfg.model, cfg.rl
  mesh = mesh_shape(cfg.mesh.shape(), devices)
  pb, cb = _itemsize(m.param_dtype), _itemsize(m.dtype)
  n = param_elements(arch, mesh, m.param_dtype)
  warnings = []
  ways = mesh["data"] * mesh["fsdp"]
  rows = _split(rl.micro_batch_rows, ways)
  if ways > 1 and rl.micro_batch_rows % ways:
    warnings.append(f"rl.micro_batch_rows={rl.micro_batch_rows} does not divide over data x "
                    f"fsdp = {ways} devices: every device computes the whole micro-batch "
                    f"(make it a multiple of {ways})")
  T, L = rl.row_tokens, arch.num_layers
  d = _layer_dims(arch, mesh["tensor"])
  tok = rows * T
  chunk = chunk_length(rows, T, d["V"])  # per device, as models/lm_head.py sizes it
  impl = resolve_impl_for(m.attention, platform, m.dtype, arch.head_dim)
  fused = impl in ("cudnn", "blockwise", "pallas", "splash")  # no [T, S] scores: out and lse
  scores = rows * d["N"] * T * T  # attention logits of one layer, elements
  # one layer at a time also holds its attention logits, their softmax and, in the backward
  # pass, their gradients (float32), beside its own intermediates
  live = tok * _layer_live(d, cb) + (rows * d["N"] * T * 4 if fused else scores * (12 + cb))
  # what a flash kernel's backward reads, which every policy but `full` keeps (attention.py)
  kept = tok * _attention_residuals(d, cb, impl) if impl in KEPT_KERNELS else 0
  if m.remat == "none":  # every layer's intermediates stay for the backward pass, and the
    # Pallas kernels' own copies of their inputs (kv heads repeated, rows padded)
    saved = tok * _layer_live(d, cb) + (rows * d["N"] * T * 4 if fused else scores * (4 + cb)) \
        + (kept if impl in KERNELS else 0)
  elif m.remat == "full":  # each layer's input only
    saved = tok * cb * d["E"]
  elif m.remat == "attention":  # each layer's input and the attention kernel's residuals
    saved = tok * cb * d["E"] + kept
  elif m.remat == "dots":  # every matmul's output, the attention logits included
    saved = tok * cb * (3 * d["E"] + 2 * (d["N"] + d["K"]) * d["D"] + 2 * d["F"]) \
        + (kept or (rows * d["N"] * T * 4 if fused else scores * 4))
  else:  # dots_no_batch: the weight matmuls' outputs; XLA attention is recomputed
    saved = tok * cb * (3 * d["E"] + (d["N"] + 2 * d["K"]) * d["D"] + 2 * d["F"]) + kept
  # + the [rows, 1, T, T] attention mask, which blockwise attention and the kernels never build
  activations = L * saved + live + (
      0 if impl in ("blockwise", "pallas", "splash") else rows * T * T)
  items = [
      Item(f"parameters ({m.param_dtype})", n * pb,
           "shard them over more devices (mesh.fsdp, or mesh.tensor)"),
      Item("optimizer state (AdamW moments and update)", 3 * n * pb,
           "shard it over more devices (mesh.fsdp), or hold parameters in bfloat16"),
      Item("gradients (float32 accumulator and one micro-batch's)", n * (4 + pb),
           "shard them over more devices (mesh.fsdp)"),
      Item(f"activations ({rows} row{'s' * (rows != 1)} x {T} tokens, remat {m.remat}, "
           f"attention {impl})", activations,
           "use " + ("" if m.remat == "full" else "model.remat=full, ")
           + "fewer rl.micro_batch_rows or a shorter rl.row_tokens"
           + ("" if fused else ", or attention that holds no [T, T] scores "
                                "(model.attention=blockwise, or cudnn on GPUs)")),
      # models/lm_head.py: one chunk of logits at a time (the logits, their softmax and their
      # gradient, float32); the head's gradient is the micro-batch gradient counted above
      Item(f"LM head ({rows} x {chunk} of {T} positions x {d['V']} vocabulary a chunk, "
           "float32)", 3 * rows * chunk * d["V"] * 4,
           "split the vocabulary (mesh.tensor)"),
  ]
  if cb != pb:  # models/qwen.py casts the layers' weights once a step, before the layer loop
    items.append(Item(f"layer weights in {m.dtype} (kept for the backward pass)",
                      param_elements(arch, mesh, m.param_dtype, under="layers/") * cb,
                      "shard them over more devices (mesh.fsdp)"))
  p = cfg.placement
  if p.decode_param_dtype is not None and p.decode_param_dtype != m.param_dtype:
    items.append(Item(f"published copy ({p.decode_param_dtype})",
                      n * _itemsize(p.decode_param_dtype), "publish in the learner's dtype"))
  return Group("learner", mesh, items, None), warnings


def decode_group(cfg: Config, arch, devices: int, platform: str) -> Group:
  from asearcher_jax.inference.engine import first_bucket, padded_rows, prefill_buckets
  from asearcher_jax.placement import role_config, serving_param_dtype
  dcfg = role_config(cfg, "decode")
  m, s = dcfg.model, dcfg.serve
  mesh = mesh_shape(dcfg.mesh.shape(), devices)
  served = serving_param_dtype(dcfg, platform)
  pb, cb = _itemsize(served), _itemsize(m.dtype)
  n = param_elements(arch, mesh, served)
  weights, largest = served_param_bytes(arch, mesh, served, s.quantization)
  held = f"int8 and {served}" if s.quantization == "int8" else served
  d = _layer_dims(arch, mesh["tensor"])
  per_token = 2 * arch.num_layers * d["K"] * arch.head_dim * cb  # keys and values, all layers
  T = s.max_len
  pages = s.pool_pages() + 1  # and the sink
  # A prefill attends through its KV cache's mask, which the training kernels leave to XLA
  # (models/attention.py).
  impl = resolve_impl_for(m.attention, platform, m.dtype, arch.head_dim)
  impl = "xla" if impl in KEPT_KERNELS else impl
  # The largest prefill call (inference/driver.py): rows of at most a chunk's bucket each,
  # padded to a power of two and bounded by serve.prefill_tokens (a row alone always runs).
  # Fresh prompts attend to their own tokens and leave a cache of their own for `insert`;
  # session turns attend to their whole page table (max_len positions), every row's gathered a
  # layer at a time.
  q = first_bucket(prefill_buckets(min(s.min_prefill_bucket, T), T), min(s.prefill_chunk or T, T))
  tokens = padded_rows(s.slots) * q
  if s.prefill_tokens is not None:
    tokens = min(tokens, max(s.prefill_tokens, q))

  def prefill(keys: int) -> int:
    """One layer's live tensors and its float32 logits (with their softmax, its copy in the
    compute dtype where that is narrower, and the mask; cuDNN keeps only float32 statistics)
    over `keys` positions."""
    scores = tokens * d["N"] * (keys * (8 + cb % 4) if impl != "cudnn" else 4)
    return tokens * (_layer_live(d, cb) + keys) + scores

  fresh = prefill(q) + tokens * per_token
  turns = prefill(T) + padded_rows(s.slots) * T * 2 * d["K"] * arch.head_dim * cb
  return Group("decode server", mesh, [
      Item(f"parameters ({held})", weights,
           "serve in bfloat16 (placement.decode_param_dtype) or int8 (serve.quantization), "
           "or split over placement.decode_mesh"),
      # Loaded in float; an int8 server then quantizes it weight by weight, each through a
      # float32 copy, beside the float model (inference/weights.py).
      Item(f"parameters of the next version (while it loads, {served})",
           n * pb + (weights + largest if s.quantization == "int8" else 0),
           "serve in bfloat16 (placement.decode_param_dtype)"),
      # One page pool for the slots and the sessions kept on device, split over kv heads only
      # (inference/engine.py).
      Item(f"KV pages ({pages} x {s.page_size} tokens, shared by {s.slots} slots and "
           f"{s.device_sessions} device sessions)", pages * s.page_size * per_token,
           "fewer serve.kv_pages (or serve.slots, serve.device_sessions), a shorter "
           "serve.max_len, or split kv heads (decode mesh tensor)"),
      Item(f"largest prefill ({tokens} tokens, session turns over {T} positions; attention "
           f"{impl})", max(fresh, turns),
           "a smaller serve.prefill_tokens (or serve.prefill_chunk), or a shorter "
           "serve.max_len"),
  ], None)


def detect_device_memory() -> int | None:
  """The first local device's memory (None on CPUs). On GPUs JAX reports its pool, a fraction
  of the device (XLA_CLIENT_MEM_FRACTION, 0.75 unless set): that is undone here, since
  the budget applies `placement.memory_fraction` itself."""
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 -- a backend without memory statistics
    return None
  if not stats or "bytes_limit" not in stats:
    return None
  limit = int(stats["bytes_limit"])
  if device.platform == "gpu":
    limit = int(limit / float(operator_mem_fraction() or "0.75"))
  return limit


def plan(cfg: Config, *, devices: int | None = None, decode_devices: int | None = None,
         device_memory_gib: float | None = None, platform: str | None = None) -> Plan:
  """The per-device plan of `cfg`. Arguments override the config's placement numbers; what
  neither gives is detected on this machine."""
  p = cfg.placement
  arch = architecture(cfg)
  platform = platform or p.platform
  detected = None
  if platform is None or (devices or p.num_devices) is None:
    platform = platform or jax.default_backend()
    detected = jax.device_count()
  n_learn = devices or p.num_devices or (
      len(p.learner_devices) * (cfg.distributed.num_processes or 1) if p.learner_devices
      else None) or detected
  hosts = cfg.distributed.num_processes or 1
  local = role_devices(cfg, "decode")
  n_decode = decode_devices or p.decode_num_devices or (len(local) if local else None) or (
      max(1, n_learn // hosts) if p.mode == "colocated" else _fixed_size(p.decode_mesh))
  gib = device_memory_gib or p.device_memory_gib
  memory = int(gib * GiB) if gib else detect_device_memory()
  budgets = {}
  for role in ("learner", "decode"):
    f = memory_fraction(cfg, role)
    if memory is not None:
      budgets[role] = (int(memory * f), f"{f:.2f} of {_gib(memory)}")
  auto = cfg.model.remat == "auto"
  # `attention` is `full` where the attention path keeps nothing under remat
  kept = resolve_impl_for(cfg.model.attention, platform, cfg.model.dtype,
                          arch.head_dim) in KEPT_KERNELS
  candidates = [r for r in REMAT_BY_MEMORY if kept or r != "attention"]
  for remat in (candidates if auto else (cfg.model.remat,)):
    learner, warnings = learner_group(with_remat(cfg, remat), arch, n_learn, platform)
    learner.budget, learner.budget_note = budgets.get("learner", (None, ""))
    if learner.fits:
      break
  note = ""
  if auto:
    note = ("device memory unknown: nothing recomputed" if memory is None else
            f"the first of {', '.join(candidates)} whose learner fits" if learner.fits
            else "even the least memory does not fit")
  decode = decode_group(cfg, arch, n_decode, platform)
  decode.budget, decode.budget_note = budgets.get("decode", (None, ""))
  return Plan([learner, decode], p.mode, memory, warnings, remat, note, platform)


def with_remat(cfg: Config, remat: str) -> Config:
  """`cfg` with model.remat set (configs are immutable)."""
  return cfg.model_copy(update={"model": cfg.model.model_copy(update={"remat": remat})})


def resolve_remat(cfg: Config, echo=None, **plan_args) -> Config:
  """`cfg` with `model.remat: auto` replaced by the policy the plan chooses for this machine's
  devices: nothing recomputed where the learner fits without (and where memory is unknown, as on
  CPUs), else the first of REMAT_BY_MEMORY that fits. A step is fastest with the least recompute
  that memory allows; a fixed policy either wastes compute on a big device or runs out of
  memory on a small one."""
  if cfg.model.remat != "auto":
    return cfg
  # The run's own platform, not the one its config was written for (placement.platform).
  p = plan(cfg, **{"platform": jax.default_backend(), **plan_args})
  if echo is not None:
    echo(f"model.remat auto: {p.remat} ({p.remat_note})")
  return with_remat(cfg, p.remat)


def _fixed_size(mesh) -> int:
  """Devices of a decode mesh given without -1; 1 when it has none or one."""
  if mesh is None or -1 in mesh.shape().values():
    return 1
  return math.prod(mesh.shape().values())


def architecture(cfg: Config):
  """The policy's shape from the config or model.path's files, without loading weights."""
  m = cfg.model
  if m.arch is not None:
    return m.arch
  from asearcher_jax.models.config import QwenConfig
  from asearcher_jax.models.tokenizer import is_hf_dir
  if is_hf_dir(m.path):
    return QwenConfig.from_hf_dir(m.path)
  from asearcher_jax.models.pretrained import read_policy_meta
  return read_policy_meta(m.path)[0]
