"""The RL learner's step: decoupled PPO over packed micro-batches, n optimizer updates.

With `ppo_n_minibatches` n = 1 (ASearcher's setting) π_prox is the policy before this update,
i.e. sg(π_θ) of the same forward pass: no recompute pass, ρ ≡ 1 in value and the gradient is the
importance-weighted policy gradient −Σ m·w·Â·∇logπθ / N. With n > 1 one forward pass first
records log π_prox under the step's starting policy, then n updates follow in turn, minibatch k
(its own micro-batches, laid out by `build_batch`) divided by its own loss-token count N_k: from
the second update on ρ ≠ 1 and the clip is the trust region around π_prox.

Log-probs are those of the tempered distribution, log_softmax(logits / temperature): what the
decode engine reports as the behaviour log-prob for a temperature sample without top-k/top-p
(inference/sampling.py), so w compares like with like.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from asearcher_jax.models.qwen import Qwen
from asearcher_jax.rl.batch import TrainBatch
from asearcher_jax.rl.config import RLSection
from asearcher_jax.rl.loss import (
  decoupled_ppo_loss,
  finalize_stats,
  neutral_stats,
  reduce_stats,
)
from asearcher_jax.train.lm import at_targets, next_token_scores, target_weight
from asearcher_jax.train.optimizer import init_opt_state

_PER_TOKEN = ("tokens", "positions", "segment_ids", "loss_mask", "behav_logp", "advantages",
              "versions")


def tempered_token_logprobs(model: Qwen, tokens: jax.Array, positions: jax.Array,
                            segment_ids: jax.Array, loss_mask: jax.Array, temperature: float,
                            select: jax.Array | None = None
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(log p_T(tokens[t] | tokens[<t]), loss weight, entropy of p_T), each [R, T-1], t = 1..T-1,
  or [R, C] at the targets of `select` (`TrainBatch.select`: the LM head runs there alone).

  Same alignment as `train.lm.next_token_logprobs`: the weight is the loss mask of the target
  token, and 0 where the target starts a segment or is padding. The entropy is a metric only
  (no gradient).
  """
  scores = next_token_scores(model, tokens, positions, segment_ids, temperature, select)
  weight = at_targets(target_weight(segment_ids, loss_mask), select) > 0
  return scores.logp, weight, scores.entropy


def micro_batch_loss(model: Qwen, mb: dict[str, jax.Array], num_tokens, learner_version,
                     cfg: RLSection) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, stats) of one micro-batch (per-token arrays [R, T], `select` [R, C] when the batch
  has it, and `prox_logp` [R, T-1] or [R, C] when π_prox is not this policy) divided by
  `num_tokens`, its minibatch's global N.

  Summing this over micro-batches gives the full-batch loss, and likewise for gradients.
  The stats include the train-inference gap |log π_prox − log π_behav| on the loss tokens that
  `learner_version` itself sampled: the same weights scoring the same token, so whatever
  remains is the two programs' numerics (dtype, kernels, sampling path), not off-policyness.
  """
  select = mb.get("select")
  logp, weight, entropy = tempered_token_logprobs(
      model, mb["tokens"], mb["positions"], mb["segment_ids"], mb["loss_mask"], cfg.temperature,
      select)
  behav, advantages, versions = (at_targets(mb[k][:, 1:], select)
                                 for k in ("behav_logp", "advantages", "versions"))
  prox = mb.get("prox_logp", logp)  # like logp; absent with one minibatch
  loss, stats = decoupled_ppo_loss(
      logp, prox, behav, advantages, weight,
      eps_clip=cfg.eps_clip, behav_weight_cap=cfg.behav_weight_cap, num_tokens=num_tokens)
  stats["entropy_sum"] = jnp.sum(jnp.where(weight, entropy, 0.0))
  fresh = weight & (versions == learner_version)
  gap = jnp.abs(jax.lax.stop_gradient(prox) - behav)
  stats["fresh_tokens"] = jnp.sum(fresh, dtype=jnp.float32)
  stats["logp_gap_sum"] = jnp.sum(jnp.where(fresh, gap, 0.0))
  stats["logp_gap_max"] = jnp.max(jnp.where(fresh, gap, -jnp.inf))
  return loss, stats


def micro_batches(batch: TrainBatch) -> dict[str, jax.Array]:
  """The per-token fields of a batch, [M, R, T] each, and its `select` [M, R, C] if it has one:
  what `lax.scan` walks over."""
  mbs = {k: getattr(batch, k) for k in _PER_TOKEN}
  if batch.select is not None:
    mbs["select"] = batch.select
  return mbs


def make_ppo_loss(model: Qwen, cfg: RLSection):
  """Returns (params, loss_fn) with loss_fn(params, batch) -> (loss, stats) over the whole
  batch (a scan over micro-batches, no gradient accumulation): the function whose gradient
  the step accumulates with one PPO minibatch, for tests and evaluation."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, batch: TrainBatch):
    def body(total, mb):
      loss, stats = micro_batch_loss(nnx.merge(graphdef, p, rest), mb, batch.num_tokens,
                                     batch.learner_version, cfg)
      return total + loss, stats

    loss, stats = jax.lax.scan(body, jnp.zeros((), jnp.float32), micro_batches(batch))
    return loss, reduce_stats(stats)

  return params, loss_fn


def make_ppo_step(model: Qwen, optimizer: optax.GradientTransformation, cfg: RLSection):
  """Returns (params, opt_state, step), with
  step(params, opt_state, batch: TrainBatch) -> (params, opt_state, metrics).

  One `jax.jit` (params and optimizer state donated; shardings follow the inputs): for each of
  the n minibatches in turn, a `lax.scan` over its micro-batches accumulates float32 gradients
  of losses already divided by its global N_k (skipping empty padding micro-batches), then one
  optimizer update (skipped if the minibatch has no loss token). Recompiles only when
  [M, R, T] changes. The model's arrays are donated to the first call.
  """
  n = cfg.ppo_n_minibatches
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def grad_fn(p, mb, num_tokens, version):
    def loss_fn(p):
      return micro_batch_loss(nnx.merge(graphdef, p, rest), mb, num_tokens, version, cfg)
    return jax.value_and_grad(loss_fn, has_aux=True)(p)

  opt_state, out_shardings = init_opt_state(optimizer, params)
  shardings = out_shardings[0]  # the gradient accumulator lives where the parameters do

  def accumulate(params, mbs, num_tokens, version):
    """(float32 gradient, loss, stats) summed over the micro-batches `mbs` ([M', R, T] each)."""
    first = jax.tree.map(lambda x: x[0], mbs)
    stats_like = jax.eval_shape(grad_fn, params, first, num_tokens, version)[0][1]

    def run(acc, mb):
      (loss, stats), grads = grad_fn(params, mb, num_tokens, version)
      return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), (loss, stats)

    def skip(acc, mb):
      return acc, (jnp.zeros((), jnp.float32), neutral_stats(stats_like))

    def body(acc, mb):  # a padding micro-batch (no segment at all) is skipped, not computed
      return jax.lax.cond(jnp.any(mb["segment_ids"] > 0), run, skip, acc, mb)

    zeros = jax.tree.map(
        lambda p, s: jax.lax.with_sharding_constraint(jnp.zeros(p.shape, jnp.float32), s),
        params, shardings)
    grads, (losses, stats) = jax.lax.scan(body, zeros, mbs)
    return grads, jnp.sum(losses), reduce_stats(stats)

  def proximal_logp(params, mbs):
    """log π_prox [M, R, T-1] (or [M, R, C] with `select`): the step's starting policy on every
    micro-batch."""
    def run(mb):
      return tempered_token_logprobs(
          nnx.merge(graphdef, params, rest), mb["tokens"], mb["positions"], mb["segment_ids"],
          mb["loss_mask"], cfg.temperature, mb.get("select"))[0]

    def body(_, mb):
      r, t = mb["tokens"].shape
      shape = mb["select"].shape if "select" in mb else (r, t - 1)
      return None, jax.lax.cond(jnp.any(mb["segment_ids"] > 0), run,
                                lambda mb: jnp.zeros(shape, jnp.float32), mb)

    return jax.lax.scan(body, None, mbs)[1]

  def update(carry, xs, version):
    params, opt_state = carry
    mbs, count = xs
    grads, loss, stats = accumulate(params, mbs, count, version)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    def apply(params, opt_state):
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    # The last line against poison: an update whose loss or gradient is not finite is skipped
    # (parameters and optimizer state untouched) and counted, so no NaN is ever published.
    norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(norm)
    params, opt_state = jax.lax.cond((count > 0) & finite, apply, lambda p, o: (p, o), params,
                                     opt_state)
    # Its stats go with it: the step's figures describe the updates applied, never a NaN.
    stats = jax.tree.map(lambda s, n: jnp.where(finite, s, n), stats, neutral_stats(stats))
    return (params, opt_state), (jnp.where(finite, loss * count, 0.0),
                                 jnp.where(finite, norm, 0.0), stats, (count > 0) & ~finite)

  @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=out_shardings)
  def step(params, opt_state, batch: TrainBatch):
    if batch.shape[0] % n:  # static: raised while tracing
      raise ValueError(f"a batch of {batch.shape[0]} micro-batches does not split into "
                       f"rl.ppo_n_minibatches={n}: build it with the learner's rl config")
    mbs = micro_batches(batch)
    if n > 1:
      mbs["prox_logp"] = proximal_logp(params, mbs)
    split = jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), mbs)
    # N_k per minibatch; with n = 1 this is batch.num_tokens (build_batch's loss_mask.sum())
    counts = jnp.sum(split["loss_mask"], axis=(1, 2, 3), dtype=jnp.float32)
    (params, opt_state), (losses, norms, stats, nonfinite) = jax.lax.scan(
        functools.partial(update, version=batch.learner_version), (params, opt_state),
        (split, counts))
    used = (counts > 0) & ~nonfinite
    metrics = {"loss": jnp.sum(losses) / jnp.maximum(jnp.sum(jnp.where(used, counts, 0.0)), 1.0),
               "grad_norm": jnp.sum(jnp.where(used, norms, 0.0)) / jnp.maximum(jnp.sum(used), 1),
               "nonfinite_updates": jnp.sum(nonfinite, dtype=jnp.int32),
               "num_tokens": jnp.sum(jnp.where(used, counts, 0.0)),  # the tokens trained on
               **finalize_stats(reduce_stats(stats))}
    return params, opt_state, metrics

  return params, opt_state, step
