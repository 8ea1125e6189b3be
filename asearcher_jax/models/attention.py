"""Attention over packed sequences and KV caches, with a fused path and a reference path.

One masking rule covers every use: a query attends to keys at positions no
later than its own and in the same segment. Training packs several sequences
into a row (segment ids, positions restart per segment); decoding attends to a
cache whose slot j holds position j. `blockwise` (models/blockwise_attention.py)
applies the rule block by block and never holds a [T, S] mask or scores; `pallas` and `splash`
do the same in the Pallas flash-attention kernels of the GPU and the TPU. Their forward pass
names what their backward pass reads (`RESIDUALS`), so that a remat policy keeps it rather
than running the kernel's forward again (models/qwen.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from asearcher_jax.models.blockwise_attention import blockwise_attention
from asearcher_jax.models.chunking import accumulation_dtype
from asearcher_jax.models.config import AttentionImpl
from asearcher_jax.sharding import activation_target


def make_mask(q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array | None = None,
              kv_seg: jax.Array | None = None) -> jax.Array:
  """Boolean [B, 1, T, S] mask from positions [B, T] / [B, S] and optional segment ids."""
  mask = kv_pos[:, None, :] <= q_pos[:, :, None]
  if q_seg is not None:
    mask &= q_seg[:, :, None] == kv_seg[:, None, :]
  return mask[:, None]


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Plain softmax attention in float32 (float64 for float64 inputs); the numerics the fused
  kernels and blockwise attention are tested against."""
  b, t, n, d = q.shape
  kv_heads = k.shape[2]
  acc = accumulation_dtype(q.dtype)
  qg = q.reshape(b, t, kv_heads, n // kv_heads, d).astype(acc)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(acc)) / jnp.sqrt(d).astype(acc)
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(acc).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(acc))
  return out.reshape(b, t, n, d).astype(q.dtype)


def resolve_impl(impl: AttentionImpl, q: jax.Array) -> AttentionImpl:
  """`auto`: cuDNN's fused kernel on GPUs where it applies (bf16/fp16, head_dim a multiple of 8
  up to 128), splash attention on TPUs, blockwise attention on CPUs, else XLA. jax's own
  default is XLA everywhere, which on an H200 trains the 1.5B shape at 24% MFU against cuDNN's
  37% (benchmarks/results/train_step_*H200*); on 2 CPU cores blockwise trains the debug model
  1.3x as fast as XLA at 4 x 640 tokens and 2x at one 3,450-token row
  (benchmarks/results/train_step_cpu_debug_*). On TPUs splash is MaxText's choice too
  (`attention: autoselected`); XLA's [T, T] scores would hold a v5p's memory for one
  16k-token row (`asearcher plan`, 14B config at full remat: 44 of 79 GiB of activations,
  8.7 with splash)."""
  return resolve_impl_for(impl, jax.default_backend(), jnp.dtype(q.dtype).name, q.shape[-1])


def resolve_impl_for(impl: AttentionImpl, platform: str, dtype: str, head_dim: int
                     ) -> AttentionImpl:
  """`resolve_impl` for a platform other than the running one (`asearcher plan`)."""
  if impl != "auto":
    return impl
  if platform == "gpu" and dtype in ("bfloat16", "float16") and head_dim % 8 == 0 \
      and head_dim <= 128:
    return "cudnn"
  if platform == "tpu":
    return "splash"
  if platform == "cpu":
    return "blockwise"
  return "xla"


Segments = tuple[jax.Array, jax.Array]  # (positions, segment ids), [B, T] each


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | Segments,
              impl: AttentionImpl = "auto", mesh: Mesh | None = None) -> jax.Array:
  """q [B, T, N, D], k/v [B, S, K, D] (N a multiple of K); mask [B, 1, T, S], or for
  self-attention over packed rows the (positions, segment ids) it comes from, which
  `blockwise` attends by without ever building it (the other implementations build it).
  `mesh`: the one the arrays are sharded over, which the Pallas kernels run per device on."""
  impl = resolve_impl(impl, q)
  if isinstance(mask, tuple):
    positions, segment_ids = mask
    if impl == "blockwise":
      return keeping_residuals(blockwise_attention, q, k, v, positions, segment_ids)
    if impl in KERNELS:
      kernel = KERNELS[impl]
      if mesh is not None and mesh.devices.size > 1:
        kernel = per_device(kernel, mesh)
      return keeping_residuals(kernel, q, k, v, segment_ids)
    mask = make_mask(positions, positions, segment_ids, segment_ids)
  elif impl == "blockwise" or impl in KERNELS:  # a KV cache's mask (prefill, decode): XLA's
    impl = "xla"
  if impl == "reference":
    return reference_attention(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


RESIDUALS = "attention_residuals"  # the checkpoint name of what the kernels' backward reads


def keeping_residuals(kernel, q, k, v, *aux):
  """kernel(q, k, v, *aux), its output and the residuals its backward pass reads (the inputs as
  the kernel keeps them, the output, the log-sum-exp) named `RESIDUALS`.

  Under jax.checkpoint a flash kernel's residuals are outputs of no matmul, so every remat
  policy ran its forward again in the backward pass, and `checkpoint_dots` kept the blockwise
  kernel's every block of scores. With the name saved the backward reads what the forward
  left (benchmarks/results/train_step_cpu_debug_b2_s2048_blockwise_remat-*: `attention` steps
  1.25x as fast as `full` for 16% more temporaries). `aux` (positions, segment ids) is not
  differentiated.
  """

  @jax.custom_vjp
  def run(q, k, v, aux):
    return kernel(q, k, v, *aux)

  def forward(q, k, v, aux):
    out, backward = jax.vjp(lambda q, k, v: kernel(q, k, v, *aux), q, k, v)
    named = checkpoint_name(out, RESIDUALS)
    leaves, tree = jax.tree.flatten(backward)  # the output among them is kept once
    leaves = [named if x is out else checkpoint_name(x, RESIDUALS) for x in leaves]
    return named, jax.tree.unflatten(tree, leaves)

  def backward(residuals, g):
    return (*residuals(g), None)

  run.defvjp(forward, backward)
  return run(q, k, v, aux)


def per_device(kernel, mesh: Mesh):
  """`kernel`(q, k, v, segment_ids) run by every device on its own rows and heads (shard_map).

  A Pallas kernel is one device's program: GSPMD cannot split it, and would gather every row
  and head to each device. Attention is independent per row and per kv-head group, and a
  block of kv heads and the block of query heads that reads them sit on the same device
  (query head n reads kv head n // (N/K)), so no device needs another's data. Rows split over
  (data, fsdp) and heads over tensor, each where it divides, as the rules table says; an axis
  that does not divide the dimension replicates it.
  """

  def run(q, k, v, segment_ids):
    rows = activation_target(mesh, "batch", q.shape[0])
    heads = activation_target(mesh, "act_kv_heads", k.shape[2])
    spec = P(rows, None, heads, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, P(rows, None)),
                         out_specs=spec, check_vma=False)(q, k, v, segment_ids)

  return run


# The kernels' tiles. GPU: 128 x 128 forward (jax's default), 32 x 32 for the backward kernels.
# TPU: 512 where the row is whole tiles of it (MaxText's choice), else 128.
_PALLAS_BLOCK, _PALLAS_BACKWARD_BLOCK = 128, 32
_SPLASH_BLOCK, _SPLASH_SMALL_BLOCK = 512, 128
_PAD_SEGMENT = np.iinfo(np.int32).min  # the segment of the padding a kernel's tiles need


def _pad_rows(q, k, v, segment_ids, multiple: int):
  """q, k, v (kv heads repeated to q's), segment ids, padded along T to `multiple`."""
  n, t = q.shape[2], q.shape[1]
  padded = -(-t // multiple) * multiple
  pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
  k, v = (jnp.repeat(x, n // x.shape[2], axis=2) for x in (k, v))
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - t)),
                        constant_values=_PAD_SEGMENT)
  return q, k, v, segment_ids


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     interpret: bool | None = None) -> jax.Array:
  """Causal attention within segments through the Pallas GPU flash-attention kernel (jax's
  `pallas.ops.gpu.attention.mha`, forward and backward): no [T, T] mask or scores, the tiles
  above the diagonal skipped, other segments masked tile by tile.

  The kernel is causal by index, which is the position rule for packed rows: each segment is
  contiguous and its positions count up from 0 (rl/batch.py and train/lm.py pack so). Grouped
  kv heads are repeated to the query heads. T is padded to whole tiles with a segment id no
  token has. It is one device's kernel (`per_device` runs it on a mesh). Off GPU it runs in
  Pallas interpret mode: the CPU tests' path, slow.
  """
  from jax.experimental.pallas.ops.gpu import attention as kernel  # noqa: PLC0415

  t, d = q.shape[1], q.shape[3]
  block = _PALLAS_BLOCK if t >= _PALLAS_BLOCK else max(16, 1 << (t - 1).bit_length())
  q, k, v, segment_ids = _pad_rows(q, k, v, segment_ids, block)
  small = min(block, _PALLAS_BACKWARD_BLOCK)
  sizes = kernel.BlockSizes(block_q=block, block_k=block, block_q_dkv=small,
                            block_kv_dkv=small, block_q_dq=small, block_kv_dq=small)
  out = kernel.mha(q, k, v, segment_ids, sm_scale=float(1 / np.sqrt(d)), causal=True,
                   block_sizes=sizes,
                   interpret=jax.default_backend() != "gpu" if interpret is None else interpret)
  return out[:, :t]


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     interpret: bool | None = None) -> jax.Array:
  """`pallas_attention` through the TPU's Pallas splash-attention kernel (forward and backward;
  the tiles above the diagonal skipped, other segments masked tile by tile), one row at a
  time. The same packing rule and padding; off TPU, interpret mode."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # noqa: PLC0415

  t, n, d = q.shape[1], q.shape[2], q.shape[3]
  block = _SPLASH_BLOCK if t % _SPLASH_BLOCK == 0 else _SPLASH_SMALL_BLOCK
  q, k, v, segment_ids = _pad_rows(q, k, v, segment_ids, block)
  padded = q.shape[1]
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  run = splash.make_splash_mha(
      splash.MultiHeadMask([splash.CausalMask((padded, padded))] * n), head_shards=1,
      q_seq_shards=1, block_sizes=sizes,
      interpret=jax.default_backend() != "tpu" if interpret is None else interpret)
  scale = (1 / np.sqrt(d)).astype(np.float32)

  def row(q, k, v, segments):  # [T, N, D] each; the kernel takes [N, T, D] and no scale
    out = run((q * scale.astype(q.dtype)).swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
              segment_ids=splash.SegmentIds(segments, segments))
    return out.swapaxes(0, 1)

  return jax.vmap(row)(q, k, v, segment_ids)[:, :t]


KERNELS = {"pallas": pallas_attention, "splash": splash_attention}
# The paths that keep their residuals under remat (`keeping_residuals`). Not cuDNN's: with a
# dense mask its residuals hold a [B, 1, T, T] bias.
KEPT_KERNELS = ("blockwise", *KERNELS)
