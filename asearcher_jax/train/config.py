"""The optimizer's section of the run config (`optimizer:`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asearcher_jax.section import Section


class OptimizerSection(Section):
  """AdamW with global-norm clipping and a warmup + cosine / warmup-stable-decay / constant
  schedule."""

  learning_rate: float = Field(1e-6, gt=0)
  warmup_steps: int = Field(0, ge=0)
  # Decay to min_lr_ratio over this many steps; -1: over the whole run (SFT's steps, RL's
  # updates: rl.total_steps x ppo_n_minibatches), MaxText's learning_rate_schedule_steps=-1.
  # None: constant after warmup.
  decay_steps: int | None = Field(None, ge=-1)
  min_lr_ratio: float = Field(0.0, ge=0, le=1)
  # cosine: from the end of warmup to decay_steps. wsd (warmup-stable-decay, MiniCPM): the peak
  # until the last wsd_decay_fraction of decay_steps, then linear down: the fast learning of a
  # constant rate with an annealed end (a constant rate ends wherever its noise left it).
  schedule: Literal["cosine", "wsd"] = "cosine"
  wsd_decay_fraction: float = Field(0.2, gt=0, le=1)
  betas: tuple[float, float] = (0.9, 0.999)
  eps: float = 1e-8
  weight_decay: float = 0.01
  grad_clip: float | None = 1.0
