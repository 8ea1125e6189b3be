"""Per-slot sampling (greedy, temperature, top-k, top-p) with the log-probability of each draw.

Every slot carries its own parameters and PRNG key, so a request's tokens
depend only on its own seed and logits — never on which other requests share
the batch. The reported log-probability is that of the distribution actually
sampled from (after temperature and top-k/top-p truncation, renormalised), the
behaviour policy that decoupled PPO needs. Greedy slots report the plain
log-softmax of the logits.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def processed_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                     top_p: jax.Array) -> jax.Array:
  """Tempered logits [B, V] with truncated entries at NEG_INF. Greedy rows come back untempered."""
  logits = logits.astype(jnp.float32)
  greedy = temperature <= 0.0
  scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
  needs_truncation = jnp.any(((top_k > 0) | (top_p < 1.0)) & ~greedy)

  def truncate(x):
    vocab = x.shape[-1]
    desc = jnp.sort(x, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    # top-p over the top-k survivors: keep the smallest prefix whose mass reaches p.
    desc = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], desc, NEG_INF)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]) | (top_p >= 1.0)[:, None]  # p = 1: no truncation
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(kth, cutoff)
    out = jnp.where(x >= threshold, x, NEG_INF)
    return jnp.where(greedy[:, None], x, out)

  return jax.lax.cond(needs_truncation, truncate, lambda x: x, scaled)


class Draw(NamedTuple):
  tokens: jax.Array  # [B] int32
  logprobs: jax.Array  # [B] f32: of the distribution sampled from
  keys: jax.Array  # [B, 2] uint32: each row's PRNG state after the draw
  top_ids: jax.Array  # [B, top_n] int32: the most likely tokens of that distribution
  top_logprobs: jax.Array  # [B, top_n] f32


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, top_n: int = 0) -> Draw:
  """Draws one token per row, with its log-probability and (static `top_n` > 0) the `top_n`
  most likely tokens' log-probabilities, all from the same distribution.

  `keys` are raw uint32 PRNG keys, one per row; each row's key advances once per draw.
  """
  x = processed_logits(logits, temperature, top_k, top_p)
  split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
  next_keys, draw_keys = split[:, 0], split[:, 1]
  drawn = jax.vmap(jax.random.categorical)(draw_keys, x)
  greedy = temperature <= 0.0
  tokens = jnp.where(greedy, jnp.argmax(x, axis=-1), drawn).astype(jnp.int32)
  logp = jax.nn.log_softmax(x, axis=-1)
  logprobs = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
  if top_n:
    top_logprobs, top_ids = jax.lax.top_k(logp, top_n)
  else:
    top_logprobs = jnp.zeros((x.shape[0], 0), jnp.float32)
    top_ids = jnp.zeros((x.shape[0], 0), jnp.int32)
  return Draw(tokens, logprobs, next_keys, top_ids.astype(jnp.int32), top_logprobs)
