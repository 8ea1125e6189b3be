"""The RL learner's step: decoupled PPO over packed micro-batches, one optimizer update.

One PPO minibatch per batch (ASearcher's `ppo_n_minibatches: 1`), so π_prox is the policy
before this update, i.e. sg(π_θ) of the same forward pass: no recompute pass, ρ ≡ 1 in value
and the gradient is the importance-weighted policy gradient −Σ m·w·Â·∇logπθ / N.

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
from asearcher_jax.train.optimizer import init_opt_state

_PER_TOKEN = ("tokens", "positions", "segment_ids", "loss_mask", "behav_logp", "advantages",
              "versions")


def tempered_token_logprobs(model: Qwen, tokens: jax.Array, positions: jax.Array,
                            segment_ids: jax.Array, loss_mask: jax.Array, temperature: float
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(log p_T(tokens[t] | tokens[<t]), loss weight, entropy of p_T), each [R, T-1], t = 1..T-1.

  Same alignment as `train.lm.next_token_logprobs`: the weight is the loss mask of the target
  token, and 0 where the target starts a segment or is padding. The entropy is a metric only
  (no gradient).
  """
  logits, _ = model(tokens, positions, segment_ids)
  logp_all = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
  token_logp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
  sg = jax.lax.stop_gradient(logp_all)
  entropy = -jnp.sum(jnp.exp(sg) * sg, axis=-1)
  same_segment = segment_ids[:, 1:] == segment_ids[:, :-1]
  weight = loss_mask[:, 1:] & same_segment & (segment_ids[:, 1:] > 0)
  return token_logp, weight, entropy


def micro_batch_loss(model: Qwen, mb: dict[str, jax.Array], num_tokens, cfg: RLSection
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, stats) of one micro-batch (per-token arrays [R, T]) divided by the global N.

  Summing this over micro-batches gives the full-batch loss, and likewise for gradients.
  """
  logp, weight, entropy = tempered_token_logprobs(
      model, mb["tokens"], mb["positions"], mb["segment_ids"], mb["loss_mask"], cfg.temperature)
  loss, stats = decoupled_ppo_loss(
      logp, logp, mb["behav_logp"][:, 1:], mb["advantages"][:, 1:], weight,
      eps_clip=cfg.eps_clip, behav_weight_cap=cfg.behav_weight_cap, num_tokens=num_tokens)
  stats["entropy_sum"] = jnp.sum(jnp.where(weight, entropy, 0.0))
  return loss, stats


def micro_batches(batch: TrainBatch) -> dict[str, jax.Array]:
  """The per-token fields of a batch, [M, R, T] each: what `lax.scan` walks over."""
  return {k: getattr(batch, k) for k in _PER_TOKEN}


def make_ppo_loss(model: Qwen, cfg: RLSection):
  """Returns (params, loss_fn) with loss_fn(params, batch) -> (loss, stats) over the whole
  batch (a scan over micro-batches, no gradient accumulation): the function whose gradient
  the step accumulates, for tests and evaluation."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, batch: TrainBatch):
    def body(total, mb):
      loss, stats = micro_batch_loss(nnx.merge(graphdef, p, rest), mb, batch.num_tokens, cfg)
      return total + loss, stats

    loss, stats = jax.lax.scan(body, jnp.zeros((), jnp.float32), micro_batches(batch))
    return loss, reduce_stats(stats)

  return params, loss_fn


def make_ppo_step(model: Qwen, optimizer: optax.GradientTransformation, cfg: RLSection):
  """Returns (params, opt_state, step), with
  step(params, opt_state, batch: TrainBatch) -> (params, opt_state, metrics).

  One `jax.jit` (params and optimizer state donated; shardings follow the inputs): a
  `lax.scan` over the M micro-batches accumulates float32 gradients of losses already
  divided by the global N (skipping empty padding micro-batches), then one optimizer update.
  Recompiles only when [M, R, T] changes. The model's arrays are donated to the first call.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def grad_fn(p, mb, num_tokens):
    def loss_fn(p):
      return micro_batch_loss(nnx.merge(graphdef, p, rest), mb, num_tokens, cfg)
    return jax.value_and_grad(loss_fn, has_aux=True)(p)

  opt_state, out_shardings = init_opt_state(optimizer, params)
  shardings = out_shardings[0]  # the gradient accumulator lives where the parameters do

  @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=out_shardings)
  def step(params, opt_state, batch: TrainBatch):
    def run(acc, mb):
      (loss, stats), grads = grad_fn(params, mb, batch.num_tokens)
      return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), (loss, stats)

    def skip(acc, mb):
      return acc, (jnp.zeros((), jnp.float32), neutral_stats(stats_like))

    def body(acc, mb):  # a padding micro-batch (no segment at all) is skipped, not computed
      return jax.lax.cond(jnp.any(mb["segment_ids"] > 0), run, skip, acc, mb)

    first = jax.tree.map(lambda x: x[0], micro_batches(batch))
    stats_like = jax.eval_shape(grad_fn, params, first, batch.num_tokens)[0][1]
    zeros = jax.tree.map(
        lambda p, s: jax.lax.with_sharding_constraint(jnp.zeros(p.shape, jnp.float32), s),
        params, shardings)
    grads, (losses, stats) = jax.lax.scan(body, zeros, micro_batches(batch))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    stats = reduce_stats(stats)
    metrics = {"loss": jnp.sum(losses), "grad_norm": optax.global_norm(grads),
               "num_tokens": batch.num_tokens, **finalize_stats(stats)}
    return params, opt_state, metrics

  return params, opt_state, step
