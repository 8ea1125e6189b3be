"""The optimizer's section of the run config (`optimizer:`)."""

from __future__ import annotations

from pydantic import Field

from asearcher_jax.section import Section


class OptimizerSection(Section):
  """AdamW with global-norm clipping and a warmup + cosine/constant schedule."""

  learning_rate: float = Field(1e-6, gt=0)
  warmup_steps: int = Field(0, ge=0)
  # Cosine decay to min_lr_ratio over this many steps; -1: over the whole run (SFT's epochs,
  # RL's rl.total_steps), MaxText's learning_rate_schedule_steps=-1.
  decay_steps: int | None = Field(None, ge=-1)
  min_lr_ratio: float = Field(0.0, ge=0, le=1)
  betas: tuple[float, float] = (0.9, 0.999)
  eps: float = 1e-8
  weight_decay: float = 0.01
  grad_clip: float | None = 1.0
