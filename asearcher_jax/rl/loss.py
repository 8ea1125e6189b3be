"""The decoupled PPO objective (AReaL, after Hilton et al. 2022), token-level normalised.

  ρ = exp(logπθ − sg logπprox)            the PPO ratio around the proximal policy
  w = sg exp(logπprox − logπbehav)        the behaviour correction (tokens with w > cap leave)
  ℓ = w · max(−Âρ, −Â·clip(ρ, 1−ε, 1+ε))
  L = Σ m ℓ / N,  N = the global count of loss tokens, counted before capping

N is an input so that every micro-batch and device divides by the same number: the sum of
the micro-batch losses (and gradients) is then the full-batch loss (and gradient), and
capping a token removes its term without re-weighting the others (AReaL PR #1088).

Log-probs may be −inf or −1e30 (truncated vocab entries, padding): log-ratios are computed
on `where`-sanitised inputs, NaN ones (−inf − −inf) are zeroed and all clamped before `exp`, so
neither the loss nor its gradient can be NaN, and masked tokens get an exact zero gradient.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

LOG_RATIO_CLAMP = 20.0  # exp(20) ≈ 4.9e8: far past any cap, far from float32 overflow

# Statistics are sums (and extrema) so that micro-batches and devices combine by adding; the
# suffix says how a key combines.
_MAX, _MIN = "_max", "_min"


def _safe_log_ratio(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
  """a − b on masked tokens (0 elsewhere), clamped to ±LOG_RATIO_CLAMP; −inf − −inf gives 0.

  ±inf differences clamp (a token the behaviour policy could not have sampled still gets a
  huge weight and is capped), and `clip`'s gradient there is 0, not NaN.
  """
  d = jnp.where(mask, a, 0.0) - jnp.where(mask, b, 0.0)
  d = jnp.where(jnp.isnan(d), 0.0, d)
  return jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def decoupled_ppo_loss(logp: jax.Array, prox_logp: jax.Array, behav_logp: jax.Array,
                       advantages: jax.Array, mask: jax.Array, *, eps_clip: float,
                       behav_weight_cap: float | None,
                       num_tokens) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(L, stats) for per-token arrays of any (equal) shape; `mask` marks loss tokens.

  `prox_logp` is stop-gradiented here; pass `logp` itself for the one-minibatch case
  (π_prox = sg π_θ, ρ ≡ 1). Stats are sums over this call's loss tokens: combine calls with
  `combine_stats`, turn into means with `finalize_stats`.
  """
  mask = mask.astype(bool)
  adv = jnp.where(mask, advantages, 0.0).astype(jnp.float32)
  prox_logp = jax.lax.stop_gradient(prox_logp)
  log_ratio = _safe_log_ratio(logp.astype(jnp.float32), prox_logp.astype(jnp.float32), mask)
  ratio = jnp.exp(log_ratio)
  log_w = jax.lax.stop_gradient(
      _safe_log_ratio(prox_logp.astype(jnp.float32), behav_logp.astype(jnp.float32), mask))
  w = jnp.exp(log_w)
  capped = mask & (w > behav_weight_cap) if behav_weight_cap is not None else jnp.zeros_like(mask)
  valid = mask & ~capped

  pg = -adv * ratio
  pg_clipped = -adv * jnp.clip(ratio, 1.0 - eps_clip, 1.0 + eps_clip)
  per_token = w * jnp.maximum(pg, pg_clipped)
  n = jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 1.0)
  loss = jnp.sum(jnp.where(valid, per_token, 0.0)) / n

  sg_ratio = jax.lax.stop_gradient(ratio)
  sg_log_ratio = jax.lax.stop_gradient(log_ratio)
  f32 = lambda x: jnp.sum(x.astype(jnp.float32))  # noqa: E731
  stats = {
      "tokens": f32(mask),
      "valid_tokens": f32(valid),
      "ratio_sum": f32(jnp.where(mask, sg_ratio, 0.0)),
      "ratio_max": jnp.max(jnp.where(mask, sg_ratio, -jnp.inf)),
      "ratio_min": jnp.min(jnp.where(mask, sg_ratio, jnp.inf)),
      # over every loss token, capped ones too, as AReaL's clip_mask & loss_mask
      "clipped": f32(mask & (jax.lax.stop_gradient(pg_clipped) > jax.lax.stop_gradient(pg))),
      "behav_weight_sum": f32(jnp.where(mask, w, 0.0)),
      "behav_weight_max": jnp.max(jnp.where(mask, w, -jnp.inf)),
      "capped": f32(capped),
      # k3 estimator of KL(prox || θ): ρ − 1 − log ρ ≥ 0, low variance (Schulman's note)
      "approx_kl_sum": f32(jnp.where(mask, sg_ratio - 1.0 - sg_log_ratio, 0.0)),
  }
  return loss, stats


def _combine(key: str, xs: jax.Array, axis: int = 0) -> jax.Array:
  if key.endswith(_MAX):
    return jnp.max(xs, axis=axis)
  if key.endswith(_MIN):
    return jnp.min(xs, axis=axis)
  return jnp.sum(xs, axis=axis)


def neutral_stats(like: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The identity of `combine_stats` with the keys of `like`: what an empty micro-batch adds."""
  def fill(k, v):
    value = -jnp.inf if k.endswith(_MAX) else jnp.inf if k.endswith(_MIN) else 0.0
    return jnp.full(v.shape, value, v.dtype)
  return {k: fill(k, v) for k, v in like.items()}


def reduce_stats(stacked: Mapping[str, jax.Array], axis: int = 0) -> dict[str, jax.Array]:
  """Combines stats stacked along `axis` (e.g. the outputs of a `lax.scan` over micro-batches)."""
  return {k: _combine(k, jnp.asarray(v), axis) for k, v in stacked.items()}


def combine_stats(stats: list[Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
  """Stats of several calls (micro-batches, devices) as if from one call over all tokens."""
  return reduce_stats({k: jnp.stack([s[k] for s in stats]) for k in stats[0]})


def finalize_stats(stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Means and fractions over loss tokens; every value is 0 when there were none."""
  n = stats["tokens"]
  some = n > 0
  denom = jnp.maximum(n, 1.0)
  pick = lambda x: jnp.where(some, x, 0.0)  # noqa: E731
  out = {
      "ratio_mean": stats["ratio_sum"] / denom,
      "ratio_max": pick(stats["ratio_max"]),
      "ratio_min": pick(stats["ratio_min"]),
      "clip_frac": stats["clipped"] / denom,
      "behav_weight_mean": stats["behav_weight_sum"] / denom,
      "behav_weight_max": pick(stats["behav_weight_max"]),
      "capped_frac": stats["capped"] / denom,
      "approx_kl": stats["approx_kl_sum"] / denom,
  }
  if "entropy_sum" in stats:
    out["entropy"] = stats["entropy_sum"] / denom
  if "fresh_tokens" in stats:  # the train-inference gap (rl/step.micro_batch_loss)
    fresh = stats["fresh_tokens"]
    out["logp_gap_mean"] = stats["logp_gap_sum"] / jnp.maximum(fresh, 1.0)
    out["logp_gap_max"] = jnp.where(fresh > 0, stats["logp_gap_max"], 0.0)
    out["fresh_tokens"] = fresh
  return out
