"""Reinforcement learning: group advantages, the decoupled PPO objective, packed training
batches and the jitted learner step.

`RLSection` is JAX-free (the config loader imports it); the rest loads JAX on first use.
"""

from asearcher_jax.lazy import attach
from asearcher_jax.rl.config import RLSection

__getattr__, __dir__ = attach(__name__, {
    "batch_normalize": "advantages", "group_advantages": "advantages",
    **{name: "batch" for name in ("TrainBatch", "build_batch", "shard_batch", "staleness_limit")},
    **{name: "loss" for name in ("combine_stats", "decoupled_ppo_loss", "finalize_stats",
                                 "neutral_stats", "reduce_stats")},
    **{name: "step" for name in ("make_ppo_loss", "make_ppo_step", "micro_batch_loss",
                                 "tempered_token_logprobs")},
})

__all__ = [
    "RLSection", "TrainBatch", "batch_normalize", "build_batch", "combine_stats",
    "decoupled_ppo_loss", "finalize_stats", "group_advantages", "make_ppo_loss", "make_ppo_step",
    "micro_batch_loss", "neutral_stats", "reduce_stats", "shard_batch", "staleness_limit",
    "tempered_token_logprobs",
]
