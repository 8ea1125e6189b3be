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
# A temperature below this samples as greedy (vLLM's _SAMPLING_EPS): logits tempered by less
# can overflow float32 or sink below NEG_INF, where truncated tokens would outrank kept ones.
GREEDY_BELOW = 1e-5


# Top-k / top-p read the most likely tokens first: XLA's top_k of this many costs a hundredth of
# a full sort of a 152k vocabulary (64 rows on 2 CPU cores: 22 ms against 2.0 s). The sort runs
# only for a batch where some row's kept set may reach past them.
TRUNCATION_PREFIX = 256


def processed_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                     top_p: jax.Array) -> jax.Array:
  """Tempered logits [B, V] with truncated entries at NEG_INF. Greedy rows come back untempered.

  Top-p keeps the smallest set of most likely tokens (among the top-k) whose mass reaches p."""
  logits = logits.astype(jnp.float32)
  greedy = temperature < GREEDY_BELOW
  scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
  truncating = ((top_k > 0) | (top_p < 1.0)) & ~greedy
  vocab = scaled.shape[-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)

  def threshold(desc, log_z):
    """The smallest logit kept, from each row's first desc.shape[-1] logits (descending) and the
    log-normaliser of its top-k; and the mass those logits hold."""
    n = desc.shape[-1]
    kth = jnp.take_along_axis(desc, (jnp.minimum(k, n) - 1)[:, None], axis=-1)
    desc = jnp.where(jnp.arange(n)[None, :] < k[:, None], desc, NEG_INF)
    probs = jnp.exp(desc - log_z[:, None])
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]) | (top_p >= 1.0)[:, None]  # p = 1: no truncation
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.maximum(kth, cutoff), jnp.sum(probs, axis=-1)

  def top_k_log_z(desc):
    return jax.nn.logsumexp(jnp.where(jnp.arange(desc.shape[-1])[None, :] < k[:, None], desc,
                                      NEG_INF), axis=-1)

  def full_sort(x):
    desc = jnp.sort(x, axis=-1)[:, ::-1]
    return threshold(desc, top_k_log_z(desc))[0]

  def truncate(x):
    n = min(vocab, TRUNCATION_PREFIX)
    desc = jax.lax.top_k(x, n)[0]
    # the top-k's normaliser: inside the prefix when k <= n, the whole row when there is no top-k
    log_z = jnp.where(k <= n, top_k_log_z(desc), jax.nn.logsumexp(x, axis=-1))
    cut, mass = threshold(desc, log_z)
    # exact where the kept set ends inside the prefix: the top-k does, or the prefix holds p
    inside = ~truncating | (k <= n) | ((k == vocab) & (mass >= top_p))
    cut = jax.lax.cond(jnp.all(inside), lambda: cut, lambda: full_sort(x))
    return jnp.where(truncating[:, None], jnp.where(x >= cut, x, NEG_INF), x)

  return jax.lax.cond(jnp.any(truncating), truncate, lambda x: x, scaled)


class Draw(NamedTuple):
  tokens: jax.Array  # [B] int32
  logprobs: jax.Array  # [B] f32: of the distribution sampled from
  keys: jax.Array  # [B, 2] uint32: each row's PRNG state after the draw
  top_ids: jax.Array  # [B, top_n] int32: the most likely tokens of that distribution
  top_logprobs: jax.Array  # [B, top_n] f32


# Inverse-CDF sampling searches the vocabulary in blocks: the block holding the draw from the
# blocks' masses, then the token inside it, so no [B, V] cumulative sum or noise is needed.
_BLOCK = 128


def _last_true(mask: jax.Array) -> jax.Array:
  """Index of the last True along the last axis (0 when none is)."""
  n = mask.shape[-1]
  return n - 1 - jnp.argmax(mask[..., ::-1], axis=-1)


def inverse_cdf(weights: jax.Array, target: jax.Array) -> jax.Array:
  """Per row, the index i with weight > 0 whose interval [sum(weights[:i]), sum(weights[:i+1]))
  holds `target` (in [0, sum(weights)); rounding at the top end picks the last positive
  weight). Weights are unnormalised and >= 0 with at least one positive per row."""
  b, v = weights.shape
  nb = -(-v // _BLOCK)
  w = jnp.pad(weights, ((0, 0), (0, nb * _BLOCK - v))).reshape(b, nb, _BLOCK)
  mass = jnp.sum(w, axis=-1)  # [B, nb]
  before = jnp.cumsum(mass, axis=-1) - mass
  block = _last_true((before <= target[:, None]) & (mass > 0))
  inner = jnp.take_along_axis(w, block[:, None, None], axis=1)[:, 0]  # [B, _BLOCK]
  rest = target - jnp.take_along_axis(before, block[:, None], axis=1)[:, 0]
  inner_before = jnp.cumsum(inner, axis=-1) - inner
  return block * _BLOCK + _last_true((inner_before <= rest[:, None]) & (inner > 0))


@jax.named_scope("sampling")  # a profile's sampling share (benchmarks/device_profile.py)
def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, top_n: int = 0) -> Draw:
  """Draws one token per row, with its log-probability and (static `top_n` > 0) the `top_n`
  most likely tokens' log-probabilities, all from the same distribution.

  `keys` are raw uint32 PRNG keys, one per row; each row's key advances once per draw. A
  sampled row costs one uniform number (inverse CDF over exp(x - max)), not a Gumbel number
  per vocabulary entry; when every row is greedy no random number is drawn at all. The
  log-probability comes from one logsumexp.
  """
  x = processed_logits(logits, temperature, top_k, top_p)
  split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
  next_keys, draw_keys = split[:, 0], split[:, 1]
  greedy = temperature < GREEDY_BELOW
  top = jnp.max(x, axis=-1)
  weights = jnp.exp(x - top[:, None])  # truncated entries (NEG_INF) weigh exactly 0
  total = jnp.sum(weights, axis=-1)
  log_total = jnp.log(total)  # log_z = top + log_total
  # argmax as the first index holding the max: a min-reduction, ~4x cheaper than XLA's
  # variadic argmax on CPU (a NaN row, which has no max, gets the last index)
  iota = jnp.arange(x.shape[-1], dtype=jnp.int32)[None, :]
  best = jnp.minimum(jnp.min(jnp.where(x == top[:, None], iota, x.shape[-1]), axis=-1),
                     x.shape[-1] - 1)

  def draw(_):
    u = jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(draw_keys)
    return inverse_cdf(weights, u * total)

  drawn = jax.lax.cond(jnp.all(greedy), lambda _: best, draw, None)
  tokens = jnp.where(greedy, best, drawn).astype(jnp.int32)
  # x - top first, then log_total: at a low temperature x and log_z are large and close, and
  # x - log_z would keep only the digits they do not share.
  logprobs = (jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0] - top) - log_total
  if top_n:
    top_x, top_ids = jax.lax.top_k(x, top_n)
    top_logprobs = (top_x - top[:, None]) - log_total[:, None]
  else:
    top_logprobs = jnp.zeros((x.shape[0], 0), jnp.float32)
    top_ids = jnp.zeros((x.shape[0], 0), jnp.int32)
  return Draw(tokens, logprobs, next_keys, top_ids.astype(jnp.int32), top_logprobs)
