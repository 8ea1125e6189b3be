"""A paged KV cache: one pool of fixed-size pages that every decoding sequence draws from.

A sequence's keys and values live in the pages its row of the page table names, in order:
position p sits at offset p % page_size of page `table[p // page_size]`. Memory then follows
the tokens sequences actually hold rather than slots x max_len, a slot's cache is handed over
by writing a table row rather than copying, and a kernel that reads the table reads only a
sequence's live pages. Page 0 is the sink: unallocated table entries name it, so writes at
positions a sequence holds no page for land there and are never read unmasked.

The pool is laid out [layers, kv_heads, pages, page_size, head_dim], one layer's slice being
the layout of the Pallas paged-attention kernels (jax.experimental.pallas.ops.gpu/tpu).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from asearcher_jax.sharding import activation_target

SINK = 0  # the page unallocated table entries name
PagedKernel = Literal["xla", "pallas_gpu", "pallas_interpret", "pallas_tpu",
                      "pallas_tpu_interpret"]

POOL_AXES = ("layers", "act_kv_heads", None, None, "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVPages:
  """Keys and values of every page: [layers, kv_heads, pages, page_size, head_dim]."""

  k: jax.Array
  v: jax.Array

  @property
  def page_size(self) -> int:
    return self.k.shape[3]


def pages_for(tokens: int, page_size: int) -> int:
  """Pages that hold `tokens` positions."""
  return -(-tokens // page_size)


def write(pool: jax.Array, layer, table: jax.Array, positions: jax.Array,
          x: jax.Array) -> jax.Array:
  """pool with x [B, T, K, D] written at `positions` [B, T] of the sequences whose page-table
  rows are `table` [B, pages]; a position past the table's end goes to the sink."""
  size = pool.shape[3]
  page = jnp.take_along_axis(table, positions // size, axis=1, mode="fill", fill_value=SINK)
  # The scalar layer, page and offset are advanced indices split by a slice, so the indexed
  # shape is [B, T, K, D]: x's own.
  return pool.at[layer, :, page, positions % size].set(x.astype(pool.dtype))


def read_window(pool: jax.Array, layer, table: jax.Array, length: int) -> jax.Array:
  """The first `length` positions of each sequence, [K, B, length, D], read as one take over
  the layer's flattened positions: the debug model's CPU decode step is 10-12% shorter than
  with whole pages indexed and reshaped (README, benchmarks/decode.py)."""
  size = pool.shape[3]
  p = jnp.arange(length)
  flat = table[:, p // size] * size + p % size  # [B, length]
  layer_pool = pool[layer]
  return jnp.take(layer_pool.reshape(layer_pool.shape[0], -1, layer_pool.shape[-1]), flat,
                  axis=1)


def gather(pool: jax.Array, layer, table: jax.Array, length: int) -> jax.Array:
  """The first `length` positions of each sequence, contiguous: [B, length, K, D]."""
  return read_window(pool, layer, table, length).transpose(1, 2, 0, 3)


def scatter(pool: jax.Array, rows: jax.Array, x: jax.Array) -> jax.Array:
  """pool with x [layers, n, length, K, D] written, every layer at once, at positions
  0..length-1 of the sequences whose page-table rows are `rows` [n, pages]."""
  layers, n, length, kv, d = x.shape
  size = pool.shape[3]
  count = pages_for(length, size)
  x = jnp.pad(x.astype(pool.dtype), ((0, 0), (0, 0), (0, count * size - length), (0, 0), (0, 0)))
  x = x.reshape(layers, n, count, size, kv, d).transpose(0, 4, 1, 2, 3, 5)
  return pool.at[:, :, rows[:, :count]].set(x)


def read(pool: jax.Array, row: jax.Array) -> jax.Array:
  """Every layer's positions in the pages `row` names, in order: [layers, pages * size, K, D]."""
  x = pool[:, :, row].transpose(0, 2, 3, 1, 4)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def platform_kernel(choice: str, platform: str) -> PagedKernel:
  """The kernel `serve.paged_attention` names on a platform: pallas is the GPU or TPU one."""
  if choice == "xla":
    return "xla"
  if platform not in ("gpu", "tpu"):
    raise ValueError(f"serve.paged_attention={choice} is a GPU or TPU kernel; this process runs "
                     f"on {platform} (use xla)")
  return "pallas_gpu" if platform == "gpu" else "pallas_tpu"


def decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer,
                     table: jax.Array, lengths: jax.Array, window: int,
                     kernel: PagedKernel, mesh: Mesh | None = None) -> jax.Array:
  """One query per sequence (q [B, 1, N, D]) over its first `lengths` cached positions.

  "xla" reads every sequence's pages up to `window` and masks; the Pallas kernels (GPU: jax's
  `pallas.ops.gpu.paged_attention`, TPU: `pallas.ops.tpu.paged_attention`, both on this pool's
  layer layout; the `_interpret` kinds run them on CPU) read only the pages that hold each
  sequence's `lengths` positions. On a `mesh` of several devices each runs the kernel on its
  own kv heads (the pool's split) with the query heads that read them, and its own rows where
  they divide: a kernel is one device's program, which GSPMD would run on the gathered pool."""
  if kernel == "xla":
    return _xla_decode_attention(q, k_pool, v_pool, layer, table, lengths, window)
  b, _, n, d = q.shape
  pages = table.shape[1]
  per_block = math.gcd(pages, 8)  # pages a compute block reads: whole blocks make a row
  # The kernels do not scale the logits; attention here is softmax(q k / sqrt(d)).
  scaled = (q[:, 0].astype(jnp.float32) / jnp.sqrt(jnp.float32(d))).astype(q.dtype)
  # A full slot reads its whole table; an idle one (a row of sink pages) reads nothing, or on
  # TPU its first sink position (that kernel leaves a row of length 0 unwritten).
  tpu = kernel.startswith("pallas_tpu")
  lengths = jnp.where(table[:, 0] == SINK, int(tpu), jnp.minimum(lengths, pages * k_pool.shape[3]))
  k, v = k_pool[layer].astype(q.dtype), v_pool[layer].astype(q.dtype)
  run = functools.partial(_paged_kernel, kernel=kernel, per_block=per_block)
  if mesh is not None and mesh.devices.size > 1:
    rows = activation_target(mesh, "batch", b)
    heads = activation_target(mesh, "act_kv_heads", k.shape[0])
    run = jax.shard_map(run, mesh=mesh, in_specs=(P(rows, heads), P(heads), P(heads), P(rows),
                                                  P(rows)),
                        out_specs=P(rows, heads), check_vma=False)
  return run(scaled, k, v, table, lengths.astype(jnp.int32)).reshape(b, 1, n, d)


def _paged_kernel(q, k, v, table, lengths, *, kernel: PagedKernel, per_block: int):
  """The Pallas paged-attention kernel `kernel` names: q [B, N, D], k/v [K, pages, size, D]."""
  pages = table.shape[1]
  if kernel.startswith("pallas_tpu"):
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention  # noqa: PLC0415
    interpret = (pltpu.force_tpu_interpret_mode() if kernel == "pallas_tpu_interpret"
                 else contextlib.nullcontext())
    with interpret:
      return paged_attention(q, k, v, lengths, table, pages_per_compute_block=per_block)
  from jax.experimental.pallas.ops.gpu import paged_attention as pallas  # noqa: PLC0415
  # The GPU kernel splits a row's pages into k_splits partitions of whole compute blocks.
  return pallas.paged_attention(
      q, k, v, table, lengths, block_h=16, pages_per_compute_block=per_block,
      k_splits=math.gcd(pages // per_block, 16), interpret=kernel == "pallas_interpret")


def _xla_decode_attention(q, k_pool, v_pool, layer, table, lengths, length):
  """Attention over each sequence's first `length` positions, masked to its own."""
  b, _, n, d = q.shape
  kv = k_pool.shape[1]
  k = read_window(k_pool, layer, table, length)
  v = read_window(v_pool, layer, table, length)
  acc = jnp.promote_types(q.dtype, jnp.float32)
  # kv heads and rows lead, as in the window [K, B, length, D]: batched matmuls whose batch
  # dims lead need no transpose of the window (on CPU 0.16 against 0.25 ms a layer at batch
  # 64, window 128), only of the small query and output.
  qg = q[:, 0].reshape(b, kv, n // kv, d).transpose(1, 0, 2, 3)
  qg = qg.astype(acc) / jnp.sqrt(jnp.asarray(d, acc))
  logits = jnp.einsum("kbgd,kbsd->kbgs", qg, k.astype(acc))
  held = jnp.arange(length)[None, :] < lengths[:, None]  # [B, length]
  logits = jnp.where(held[None, :, None], logits, jnp.finfo(acc).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("kbgs,kbsd->kbgd", probs, v.astype(acc))
  return out.transpose(1, 0, 2, 3).reshape(b, 1, n, d).astype(q.dtype)
