"""Token-level language-model training: next-token log-probs over packed rows and an SFT step.

The RL learner scores tokens with the same `next_token_scores` (through the fused
LM head, models/lm_head.py), so SFT and RL agree on which logit predicts which
token, and packing never leaks across segments.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from asearcher_jax.models.lm_head import TokenScores, token_scores
from asearcher_jax.models.qwen import Qwen
from asearcher_jax.train.optimizer import init_opt_state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedBatch:
  """Rows of packed sequences, all [B, T]. loss_mask[t] marks tokens[t] as a training target."""

  tokens: jax.Array
  positions: jax.Array
  segment_ids: jax.Array  # 0 = padding
  loss_mask: jax.Array
  # [B, C] (optional): the positions t whose targets tokens[t+1] the loss reads, padded with
  # T-1 (no target); the LM head then runs on these C positions alone (`loss_positions`)
  select: jax.Array | None = None


def next_token_logprobs(model: Qwen, batch: PackedBatch) -> tuple[jax.Array, jax.Array]:
  """(log p(tokens[t] | tokens[<t]), weight) for t = 1..T-1, both [B, T-1].

  The weight is zero where t starts a new segment (its predecessor belongs to
  another sequence) or is not a loss token. With `batch.select`, both are [B, C]: the targets
  of the selected positions alone (the padding's weight is zero).
  """
  scores = next_token_scores(model, batch.tokens, batch.positions, batch.segment_ids,
                             select=batch.select)
  return scores.logp, at_targets(target_weight(batch.segment_ids, batch.loss_mask), batch.select)


def next_token_predictions(model: Qwen, batch: PackedBatch
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(log-prob of each target, whether greedy decoding predicts it, weight), [B, T-1] each:
  the log-prob and weight of `next_token_logprobs`, plus what held-out evaluation scores."""
  scores = next_token_scores(model, batch.tokens, batch.positions, batch.segment_ids)
  return scores.logp, scores.greedy, target_weight(batch.segment_ids, batch.loss_mask)


def next_token_scores(model: Qwen, tokens: jax.Array, positions: jax.Array,
                      segment_ids: jax.Array, temperature: float = 1.0,
                      select: jax.Array | None = None) -> TokenScores:
  """`TokenScores` of tokens[t] given tokens[<t], [B, T-1] each, through the fused LM head
  (no [B, T, V] logits). The last position has no target: it is scored against token 0 and
  dropped, so the head runs on the whole [B, T] row.

  `select` [B, C] (`loss_positions`): score only the targets of these positions, [B, C] each.
  The head is a large share of a step where the vocabulary is large against the model or most
  tokens carry no loss (prompts and tool output: two thirds of the debug run's SFT rows)."""
  hidden, _ = model.hidden_states(tokens, positions, segment_ids)
  if select is not None:
    hidden = jnp.take_along_axis(hidden, select[..., None], axis=1)
    return token_scores(hidden, model.head(), at_targets(tokens[:, 1:], select),
                        temperature=temperature)
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  scores = token_scores(hidden, model.head(), targets, temperature=temperature)
  return TokenScores(*(x[:, :-1] for x in scores))


def at_targets(x: jax.Array, select: jax.Array | None) -> jax.Array:
  """A per-target array x [B, T-1] (x[:, t-1] belongs to target tokens[t]) read where `select`
  [B, C] points, [B, C]: its padding (T-1, no target) reads 0. Without `select`, x itself."""
  if select is None:
    return x
  return jnp.take_along_axis(jnp.pad(x, ((0, 0), (0, 1))), select, axis=1)


def loss_positions(segment_ids: np.ndarray, loss_mask: np.ndarray, multiple: int = 16
                   ) -> np.ndarray:
  """[R, C] int32 `PackedBatch.select` for rows [R, T]: each row's positions whose target has
  loss weight (`target_weight`), then T-1 to pad. C is the most any row has, rounded up to
  `multiple` (at most T): one compiled shape for a whole dataset of rows, and few for a stream
  of batches (the RL learner rounds to an eighth of T)."""
  weight = target_weight(segment_ids, loss_mask) > 0  # on the host: no device round trip
  r, t = segment_ids.shape
  c = select_width(int(weight.sum(axis=1).max(initial=0)), t, multiple)
  select = np.full((r, c), t - 1, np.int32)
  for i in range(r):
    at = np.flatnonzero(weight[i])
    select[i, :len(at)] = at
  return select


def select_width(count: int, t: int, multiple: int) -> int:
  """C of `loss_positions` for rows of T positions whose most loss positions is `count`."""
  return min(t, -(-max(count, 1) // multiple) * multiple)


def target_weight(segment_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """float32 [B, T-1]: 1 where tokens[t] is a loss token whose predecessor is in its segment
  (0 where t starts a new segment or is padding). numpy in, numpy out; jax in, jax out."""
  same_segment = segment_ids[:, 1:] == segment_ids[:, :-1]
  return (loss_mask[:, 1:] & same_segment & (segment_ids[:, 1:] > 0)).astype(jnp.float32)


def nll_loss(token_logp: jax.Array, weight: jax.Array) -> jax.Array:
  """Mean negative log-likelihood over weighted tokens (token-level normalisation)."""
  return -jnp.sum(token_logp * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def make_sft_step(model: Qwen, optimizer: optax.GradientTransformation):
  """Returns (params, opt_state, step), with
  step(params, opt_state, batch) -> (params, opt_state, metrics).

  The step is one jitted function; params and optimizer state are donated so
  the update happens in place, and shardings follow the inputs.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  opt_state, out_shardings = init_opt_state(optimizer, params)

  @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=out_shardings)
  def step(params, opt_state, batch: PackedBatch):
    def loss_fn(p):
      token_logp, weight = next_token_logprobs(nnx.merge(graphdef, p, rest), batch)
      return nll_loss(token_logp, weight), jnp.sum(weight)

    (loss, n_tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "tokens": n_tokens,
                               "grad_norm": optax.global_norm(grads)}

  return params, opt_state, step
