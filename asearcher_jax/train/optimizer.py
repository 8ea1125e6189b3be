"""The optimizer from config, and the sharding of its state."""

from __future__ import annotations

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from asearcher_jax.errors import ConfigError
from asearcher_jax.train.config import OptimizerSection

# Parameters exempt from weight decay: norm scales and biases (Qwen names, see models/qwen.py).
_NO_DECAY = ("attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm", "bqkv", "bo")


def learning_rate_schedule(cfg: OptimizerSection, total_steps: int | None = None
                           ) -> optax.Schedule:
  """`total_steps`: the run's length, which `decay_steps: -1` decays over."""
  peak = cfg.learning_rate
  decay_steps = cfg.decay_steps
  if decay_steps == -1:
    if not total_steps:
      raise ConfigError("optimizer.decay_steps=-1 decays over the whole run, but this run does "
                        "not know its length: give a number of steps")
    decay_steps = total_steps
  if decay_steps and cfg.schedule == "wsd":
    end = max(decay_steps, cfg.warmup_steps + 1)
    decay = max(1, min(round(cfg.wsd_decay_fraction * end), end - cfg.warmup_steps))
    # a linear warmup holds its end value: warmup and the stable phase are one piece
    rise = (optax.linear_schedule(0.0, peak, cfg.warmup_steps) if cfg.warmup_steps
            else optax.constant_schedule(peak))
    down = optax.linear_schedule(peak, peak * cfg.min_lr_ratio, decay)
    return optax.join_schedules([rise, down], [end - decay])
  if decay_steps:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if cfg.warmup_steps else peak, peak_value=peak,
        warmup_steps=cfg.warmup_steps, decay_steps=max(decay_steps, cfg.warmup_steps + 1),
        end_value=peak * cfg.min_lr_ratio)
  if cfg.warmup_steps:
    return optax.linear_schedule(0.0, peak, cfg.warmup_steps)
  return optax.constant_schedule(peak)


def _param_name(path) -> str:
  """Last dict key of a pytree path: works for nested dicts, flat "a/b" dicts and nnx States."""
  for k in reversed(path):
    if isinstance(k, jax.tree_util.DictKey):
      return str(k.key).rsplit("/", 1)[-1]
  return ""


def decay_mask(params):
  """True for weight matrices and embeddings, False for norms and biases."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _param_name(path) not in _NO_DECAY,
                                          params)


def make_optimizer(cfg: OptimizerSection, total_steps: int | None = None
                   ) -> optax.GradientTransformation:
  """AdamW behind optional global-norm clipping; `total_steps` as in `learning_rate_schedule`."""
  adamw = optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.betas[0], b2=cfg.betas[1],
                      eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.grad_clip:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
  return adamw


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params, param_shardings):
  """Shardings for the optimizer state: moments follow their parameter, the rest replicate."""
  abstract = jax.eval_shape(optimizer.init, abstract_params)
  mesh = next(s.mesh for s in jax.tree.leaves(param_shardings))
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract, param_shardings,
      transform_non_params=lambda _: replicated)


def init_opt_state(optimizer: optax.GradientTransformation, params):
  """(optimizer state laid out like `params`, out_shardings of a training step).

  The moments are sharded with their parameter, so a step's donated state and a restored one
  have one layout on every process; the step's outputs (params, opt_state, metrics) are pinned
  to the inputs' layout, so the next call does not recompile."""
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  opt_shardings = opt_state_shardings(optimizer, params, param_shardings)
  mesh = next(s.mesh for s in jax.tree.leaves(param_shardings))
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
  return opt_state, (param_shardings, opt_shardings, NamedSharding(mesh, P()))
