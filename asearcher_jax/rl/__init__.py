"""Reinforcement learning: group advantages, the decoupled PPO objective, packed training
batches and the jitted learner step."""

from asearcher_jax.rl.advantages import batch_normalize, group_advantages
from asearcher_jax.rl.batch import TrainBatch, build_batch, shard_batch, staleness_limit
from asearcher_jax.rl.config import RLSection
from asearcher_jax.rl.loss import (
                                   combine_stats,
                                   decoupled_ppo_loss,
                                   finalize_stats,
                                   neutral_stats,
                                   reduce_stats,
)
from asearcher_jax.rl.step import (
                                   make_ppo_loss,
                                   make_ppo_step,
                                   micro_batch_loss,
                                   tempered_token_logprobs,
)

__all__ = [
    "RLSection", "TrainBatch", "batch_normalize", "build_batch", "combine_stats",
    "decoupled_ppo_loss", "finalize_stats", "group_advantages", "make_ppo_loss", "make_ppo_step",
    "micro_batch_loss", "neutral_stats", "reduce_stats", "shard_batch", "staleness_limit",
    "tempered_token_logprobs",
]
