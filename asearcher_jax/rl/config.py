"""The RL section (`rl:`): group sampling, staleness, the decoupled PPO objective, packing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from asearcher_jax.section import Section


class RLSection(Section):

  # data: QA files (any loader format) or TFDS directories; empty = the train split of the
  # config's `world:` (the debug world unless set)
  data: tuple[str, ...] = ()
  split: str = "train"  # for TFDS directories
  seed: int = 0  # data order and sampling seeds
  # processes (asearcher train on one host)
  rollout_workers: int = Field(1, ge=1)
  decode_servers: int = Field(1, ge=1)
  # rollout
  group_size: int = Field(8, ge=1)  # G episodes per question
  batch_groups: int = Field(8, ge=1)  # B groups per learner step
  max_head_offpolicyness: int = Field(4, ge=0)  # η; 0 = synchronous on-policy
  max_concurrent_groups: int = Field(16, ge=1)  # per rollout worker
  request_timeout_s: float = Field(600.0, gt=0)  # one decode request of a rollout worker
  filter_equal_rewards: bool = True  # drop groups whose rewards are all equal
  # consume-time guard: a group whose oldest loss token is older than v - max_token_staleness
  # (default η) is dropped, or its stale tokens masked
  max_token_staleness: int | None = Field(None, ge=0)
  # mask (default): the group is consumed and counted; dropping it would leave the rollout
  # side counting it as accepted, and eta would quietly degrade towards synchronous training.
  stale_policy: Literal["drop", "mask"] = "mask"
  # advantages
  adv_std_norm: bool = False  # divide by the group's reward std (GRPO); off in ASearcher
  adv_batch_norm: bool = True  # token-level z-score over the batch (ASearcher/AReaL)
  # objective
  eps_clip: float = Field(0.2, gt=0)
  behav_weight_cap: float | None = Field(5.0, gt=1)  # tokens with w > cap leave the loss
  temperature: float = Field(1.0, gt=0)  # the sampling temperature the log-probs are under
  # optimizer updates per learner step, each on a token-balanced 1/n of the batch's sequences,
  # with π_prox the policy before the step (AReaL's ppo_n_minibatches). 1 = one update, ρ ≡ 1,
  # so the clip never binds. Learning-rate schedules count updates, n per step.
  ppo_n_minibatches: int = Field(1, ge=1)
  # packing
  row_tokens: int = Field(8192, ge=16)  # packed row length
  micro_batch_rows: int = Field(4, ge=1)  # rows per micro-batch (gradient accumulation)
  # loop
  total_steps: int = Field(100, ge=1)
  lease_timeout_s: float = Field(600.0, gt=0)

  @property
  def total_updates(self) -> int:
    """The run's optimizer updates, what learning-rate schedules count (n a step)."""
    return self.total_steps * self.ppo_n_minibatches

  @model_validator(mode="after")
  def _check(self):
    if self.group_size == 1 and self.filter_equal_rewards:  # one reward is always all equal
      raise ValueError("rl.group_size 1 with rl.filter_equal_rewards drops every group: the "
                       "learner would wait for ever; set group_size >= 2 or turn the filter off")
    return self
