"""The LM head fused with what training reads from it: each target token's log-prob.

Training never needs the [B, T, V] logits, only log p(target) (and, as metrics, the entropy and
whether greedy decoding would pick the target). Materialising the logits costs about four
float32 [T, V] buffers a row (logits, log-softmax and their cotangents): 9 GiB at 1 × 4096
tokens of a 151,936-token vocabulary. Here the head runs over chunks of the sequence inside a
`lax.scan` with a custom VJP: the forward keeps only per-token scalars, and the backward
recomputes one chunk's logits at a time, so no more than one [B, C, V] float32 chunk ever
exists. Matmuls take the compute dtype and accumulate in float32, the head's gradient is
accumulated in float32 across chunks, and the softmax is float32 throughout.

`reference_token_scores` is the plain path (full logits, `log_softmax`) the fused one is
tested against.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from asearcher_jax.models.chunking import accumulation_dtype, merge_seq, split_seq
from asearcher_jax.sharding import activation_target, constrain, mesh_size

# Float32 logits elements one chunk may hold on a device (256 MiB): a [1, 256, 151936] chunk on
# a Qwen-size vocabulary; on small vocabularies the whole row fits and there is one chunk.
CHUNK_ELEMENTS = 1 << 26

_LOGIT_AXES = ("batch", "seq", "act_vocab")
_HEAD_AXES = ("embed", "vocab")


class TokenScores(NamedTuple):
  """Per-token results, [B, T] each. Only `logp` carries a gradient."""

  logp: jax.Array  # log p_T(target), float32 (float64 for float64 inputs)
  entropy: jax.Array  # entropy of p_T, as logp (a metric)
  greedy: jax.Array  # bool: argmax of the logits is the target


def chunk_length(batch: int, seq: int, vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
  """Sequence positions per chunk: the whole sequence when its [batch, seq, vocab] float32
  logits fit in `elements` (no padding), else the largest power of two that fits (at least 1)."""
  if seq * batch * vocab <= elements:
    return seq
  c = 1
  while 2 * c * batch * vocab <= elements:
    c *= 2
  return c


def _per_device(batch: int, vocab: int) -> tuple[int, int]:
  """The rows and vocabulary entries of a [batch, C, vocab] logits chunk that one device holds
  under the current mesh (the chunk budget is per device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return batch, vocab
  ways = lambda axis, size: mesh_size(mesh, activation_target(mesh, axis, size))  # noqa: E731
  return batch // ways("batch", batch), vocab // ways("act_vocab", vocab)


def _chunk_scores(h: jax.Array, head: jax.Array, t: jax.Array, temperature: float):
  """(logits / temperature, log-sum-exp, logp, entropy, greedy) of one [B, C, E] chunk."""
  acc = accumulation_dtype(h.dtype)
  z = jnp.einsum("bce,ev->bcv", h, head, preferred_element_type=acc) / temperature
  z = constrain(z, _LOGIT_AXES)
  # Shifted by the max: `lse - Σ p·z` on raw logits subtracts two numbers the size of max|z|,
  # and a peaked distribution's entropy came out below zero (-2e-4 at T 0.25).
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  zs = z - m
  ls = jnp.log(jnp.sum(jnp.exp(zs), axis=-1))
  lse = m[..., 0] + ls
  target = jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0]
  p = jnp.exp(zs - ls[..., None])
  entropy = ls - jnp.sum(p * zs, axis=-1)
  greedy = jnp.argmax(z, axis=-1) == t
  return z, lse, target - lse, entropy, greedy


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(hidden, head, targets, temperature, c):
  return _fused_fwd(hidden, head, targets, temperature, c)[0]


def _fused_fwd(hidden, head, targets, temperature, c):
  def body(_, xs):
    h, t = xs
    _, _, logp, entropy, greedy = _chunk_scores(h, head, t, temperature)
    return None, (logp, entropy, greedy)

  _, out = jax.lax.scan(body, None, (split_seq(hidden, c), split_seq(targets, c)))
  return TokenScores(*(merge_seq(o) for o in out)), (hidden, head, targets)


def _fused_bwd(temperature, c, res, g):
  """d logp / d z = (onehot(target) − p) / temperature, one chunk at a time; the entropy and
  greedy outputs are metrics and pass no gradient."""
  hidden, head, targets = res
  dt, acc = hidden.dtype, accumulation_dtype(hidden.dtype)

  def body(dhead, xs):
    h, t, g_logp = xs
    z, lse, _, _, _ = _chunk_scores(h, head, t, temperature)
    p = jnp.exp(z - lse[..., None])
    onehot = jax.nn.one_hot(t, z.shape[-1], dtype=acc)
    dz = constrain((g_logp[..., None] * (onehot - p) / temperature), _LOGIT_AXES).astype(dt)
    dh = jnp.einsum("bcv,ev->bce", dz, head, preferred_element_type=acc)
    dhead = dhead + jnp.einsum("bce,bcv->ev", h, dz, preferred_element_type=acc)
    return constrain(dhead, _HEAD_AXES), dh.astype(dt)

  # sharded as the head is: each chunk's contribution is reduced over the rows' devices into
  # its shard (a reduce-scatter a chunk, which is what a larger chunk amortises)
  dhead0 = constrain(jnp.zeros(head.shape, acc), _HEAD_AXES)
  dhead, dh = jax.lax.scan(body, dhead0, (split_seq(hidden, c), split_seq(targets, c),
                                          split_seq(g.logp.astype(acc), c)))
  return merge_seq(dh), dhead.astype(head.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def token_scores(hidden: jax.Array, head: jax.Array, targets: jax.Array, *,
                 temperature: float = 1.0, chunk_elements: int = CHUNK_ELEMENTS) -> TokenScores:
  """Scores of `targets` [B, T] under the head [E, V] applied to `hidden` [B, T, E].

  The head is cast once to the hidden states' dtype. T is padded up to a whole number of
  chunks (padding scores are dropped).
  """
  b, t, _ = hidden.shape
  head = head.astype(hidden.dtype)
  rows, vocab = _per_device(b, head.shape[-1])
  c = chunk_length(rows, t, vocab, chunk_elements)
  pad = -t % c
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  scores = _fused(hidden, head, targets.astype(jnp.int32), float(temperature), c)
  return TokenScores(scores.logp[:, :t], jax.lax.stop_gradient(scores.entropy[:, :t]),
                     scores.greedy[:, :t])


def reference_token_scores(hidden: jax.Array, head: jax.Array, targets: jax.Array, *,
                           temperature: float = 1.0) -> TokenScores:
  """`token_scores` through the full [B, T, V] float32 logits: the numerics it is tested
  against."""
  z = jnp.einsum("bte,ev->btv", hidden, head.astype(hidden.dtype),
                 preferred_element_type=accumulation_dtype(hidden.dtype)) / temperature
  logp_all = jax.nn.log_softmax(z, axis=-1)
  logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
  sg = jax.lax.stop_gradient(logp_all)
  entropy = -jnp.sum(jnp.exp(sg) * sg, axis=-1)
  return TokenScores(logp, entropy, jnp.argmax(z, axis=-1) == targets)
