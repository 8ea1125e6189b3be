"""Causal, segment-aware attention over packed rows in blocks: no [T, S] mask, scores or bias.

The flash-attention algorithm (Dao et al. 2022; the backward of FlashAttention-2) in plain JAX:
the forward walks key blocks with an online softmax and keeps only the output and its
log-sum-exp; the backward recomputes one block's probabilities at a time. The mask of a block
comes from positions and segment ids, and a block that no query of it may see (the future, or
another packed episode) is skipped, so a row of many short episodes costs about Σ len², not T².
Blocks are skipped for all rows of the batch at once: rows packed differently share only the
blocks that every one of them masks.

It runs wherever XLA does (the reference for kernels, CPU, and any accelerator where no fused
kernel applies, e.g. float32 on GPUs) and holds O(T · block) memory a layer rather than
O(T²). The masking rule is `models.attention.make_mask`'s: a query attends to the keys at
positions no later than its own in the same segment.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from asearcher_jax.models.chunking import accumulation_dtype, merge_seq, split_seq

BLOCK = 128
_NEG = -1e30  # a masked score; finite, so an all-masked block gives exp(_NEG - m) = 0, not NaN


def _mask(q_pos, q_seg, k_pos, k_seg) -> jax.Array:
  """[B, bq, bk] for one block pair."""
  return (k_pos[:, None, :] <= q_pos[:, :, None]) & (q_seg[:, :, None] == k_seg[:, None, :])


def _tied(x, positions, segments):
  """The block's positions and segment ids, made to depend on its activations `x`.

  Masks depend on positions and segment ids alone, which are the same in every layer: inside
  the model's scan over layers XLA hoists them out of the loop and materialises every block
  pair's mask at once (an [nq, nk, B, bq, K, G, bk] buffer, T² again). Tying them to this
  layer's activations keeps each mask inside its block."""
  return jax.lax.optimization_barrier((x, positions, segments))


def _scores(q, k, mask, scale):
  """[B, bq, K, G, bk] scores (float32) of grouped queries q [B, bq, K, G, D] and keys
  k [B, bk, K, D], masked to _NEG."""
  s = jnp.einsum("bqkgd,bskd->bqkgs", q, k,
                 preferred_element_type=accumulation_dtype(q.dtype)) * scale
  return jnp.where(mask[:, :, None, None, :], s, _NEG)


def _forward(q, k, v, q_pos, q_seg, k_pos, k_seg, scale):
  """(o [nq, B, bq, K, G, D] float32, lse [nq, B, bq, K, G]) over blocked inputs."""
  acc_dt = accumulation_dtype(q.dtype)

  def one_query_block(xs):
    qi, qp, qs = _tied(*xs)
    shape = qi.shape[:-1]  # B, bq, K, G

    def step(carry, ys):
      m, total, acc = carry
      kj, vj, kp, ks = ys
      mask = _mask(qp, qs, kp, ks)

      def visit(carry):
        m, total, acc = carry
        s = _scores(qi, kj, mask, scale)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(mask[:, :, None, None, :], jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum("bqkgs,bskd->bqkgd", p.astype(vj.dtype), vj,
                        preferred_element_type=acc_dt)
        return m_new, total * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

      return jax.lax.cond(jnp.any(mask), visit, lambda c: c, carry), None

    init = (jnp.full(shape, _NEG, acc_dt), jnp.zeros(shape, acc_dt),
            jnp.zeros(shape + (qi.shape[-1],), acc_dt))
    (m, total, acc), _ = jax.lax.scan(step, init, (k, v, k_pos, k_seg))
    seen = total > 0  # a query that sees no key (padding added to fill a block) gets 0
    o = jnp.where(seen[..., None], acc / jnp.where(seen, total, 1.0)[..., None], 0.0)
    return o, jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), _NEG)

  return jax.lax.map(one_query_block, (q, q_pos, q_seg))


def _backward(q, k, v, q_pos, q_seg, k_pos, k_seg, o, lse, do, scale):
  """(dq, dk, dv) over blocked inputs: dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)),
  dQ = dS K · scale, dK = dSᵀ Q · scale, in one pass over the block pairs (key blocks outside,
  query blocks inside), each pair's P recomputed once from the saved log-sum-exp: dK and dV
  accumulate in the inner loop's carry; each pair's dQ term leaves it and adds into dQ."""
  acc_dt = accumulation_dtype(q.dtype)
  delta = jnp.sum(do * o, axis=-1)  # [nq, B, bq, K, G]

  def key_block(dq, ys):
    kj, vj, kp, ks = ys
    kj, kp, ks = _tied(kj, kp, ks)

    def step(carry, xs):
      qi, qp, qs, lse_i, do_i, delta_i = xs
      mask = _mask(qp, qs, kp, ks)

      def visit(carry):
        dk, dv = carry
        p = jnp.where(mask[:, :, None, None, :],
                      jnp.exp(_scores(qi, kj, mask, scale) - lse_i[..., None]), 0.0)
        dp = jnp.einsum("bqkgd,bskd->bqkgs", do_i.astype(vj.dtype), vj,
                        preferred_element_type=acc_dt)
        ds = p * (dp - delta_i[..., None])
        dv = dv + jnp.einsum("bqkgs,bqkgd->bskd", p.astype(do_i.dtype), do_i,
                             preferred_element_type=acc_dt)
        dk = dk + jnp.einsum("bqkgs,bqkgd->bskd", ds.astype(qi.dtype), qi,
                             preferred_element_type=acc_dt) * scale
        dq_i = jnp.einsum("bqkgs,bskd->bqkgd", ds.astype(kj.dtype), kj,
                          preferred_element_type=acc_dt) * scale
        return (dk, dv), dq_i

      # this pair's dQ term is an output of the inner loop, added to dQ outside it: no cond
      # carries (or copies) the whole dQ
      return jax.lax.cond(jnp.any(mask), visit,
                          lambda c: (c, jnp.zeros(qi.shape, acc_dt)), carry)

    zeros = jnp.zeros(kj.shape, acc_dt)
    (dk, dv), dq_terms = jax.lax.scan(step, (zeros, zeros), (q, q_pos, q_seg, lse, do, delta))
    return dq + dq_terms, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, acc_dt), (k, v, k_pos, k_seg))
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attend(q, k, v, q_pos, q_seg, k_pos, k_seg, scale, block):
  return _attend_fwd(q, k, v, q_pos, q_seg, k_pos, k_seg, scale, block)[0]


def _blocked(q, k, v, q_pos, q_seg, k_pos, k_seg, block):
  b, t, n, d = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, d)
  return tuple(split_seq(x, block) for x in (qg, k, v, q_pos, q_seg, k_pos, k_seg))


def _attend_fwd(q, k, v, q_pos, q_seg, k_pos, k_seg, scale, block):
  blocked = _blocked(q, k, v, q_pos, q_seg, k_pos, k_seg, block)
  o, lse = _forward(*blocked, scale)
  out = merge_seq(o).reshape(q.shape).astype(q.dtype)
  return out, (q, k, v, q_pos, q_seg, k_pos, k_seg, out, lse)


def _attend_bwd(scale, block, res, g):
  q, k, v, q_pos, q_seg, k_pos, k_seg, out, lse = res
  blocked = _blocked(q, k, v, q_pos, q_seg, k_pos, k_seg, block)
  grouped = blocked[0].shape[2:]  # bq, K, G, D
  as_blocks = lambda x: split_seq(x.reshape(x.shape[:2] + grouped[1:]), block)  # noqa: E731
  o = as_blocks(out).astype(accumulation_dtype(q.dtype))
  do = as_blocks(g).astype(accumulation_dtype(q.dtype))
  dq, dk, dv = _backward(*blocked, o, lse, do, scale)
  return (merge_seq(dq).reshape(q.shape).astype(q.dtype), merge_seq(dk).astype(k.dtype),
          merge_seq(dv).astype(v.dtype), None, None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                        segment_ids: jax.Array, *, block: int = BLOCK) -> jax.Array:
  """Self-attention over packed rows: q [B, T, N, D], k/v [B, T, K, D] (N a multiple of K),
  positions and segment ids [B, T]. T is padded up to whole blocks (the padding sees nothing
  and is seen by nothing)."""
  t = q.shape[1]
  block = min(block, t)
  pad = -t % block
  positions, segment_ids = positions.astype(jnp.int32), segment_ids.astype(jnp.int32)
  q_seg = k_seg = segment_ids
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
    positions = jnp.pad(positions, ((0, 0), (0, pad)))
    q_seg = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    k_seg = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-2)
  scale = 1.0 / float(q.shape[-1]) ** 0.5
  out = _attend(q, k, v, positions, q_seg, positions, k_seg, scale, block)
  return out[:, :t]
