"""GRPO-style advantages without a critic (ASearcher/AReaL recipe).

Each trajectory's advantage is its reward minus its group's mean (optionally divided by the
group's std), broadcast onto its loss tokens; then, optionally, one z-score over every loss
token of the batch. Host-side numpy: the learner builds batches on the host, and the batch is
global, so no cross-device reduction is needed. Degenerate inputs (an all-equal group, a batch
whose loss tokens all carry the same advantage, no loss tokens at all) give exact zeros, never
NaN: the tiny float residue of `x - mean(x)` must not be blown up by a near-zero std.
"""

from __future__ import annotations

import numpy as np

ADV_EPS = 1e-5  # AReaL's Normalization eps


def group_advantages(rewards, std_norm: bool = False, eps: float = ADV_EPS) -> np.ndarray:
  """[G] float32: r - mean(r), divided by (unbiased std + eps) when `std_norm` (GRPO).

  ASearcher trains with the mean-centred form (std_norm off); an all-equal group gives zeros.
  """
  r = np.asarray(rewards, np.float64).reshape(-1)
  if not np.isfinite(r).all():
    raise ValueError(f"non-finite reward in group: {r.tolist()}")
  if r.size == 0 or r.max() == r.min():
    return np.zeros(r.shape, np.float32)
  adv = r - r.mean()
  if std_norm:
    adv = adv / (r.std(ddof=1) + eps)  # size >= 2 here: equal groups returned above
  return adv.astype(np.float32)


def batch_normalize(token_adv, mask, eps: float = ADV_EPS) -> np.ndarray:
  """Z-score of `token_adv` over the tokens where `mask` is set (unbiased std); 0 elsewhere.

  Token-level (every loss token weighs the same, as in the token-mean loss), so long
  trajectories count more than short ones, as in AReaL's global `adv_norm`.
  """
  adv = np.asarray(token_adv, np.float64)
  mask = np.asarray(mask, bool)
  out = np.zeros(adv.shape, np.float32)
  vals = adv[mask]
  if vals.size == 0 or vals.max() == vals.min():
    return out
  std = vals.std(ddof=1)
  out[mask] = ((vals - vals.mean()) / (std + eps)).astype(np.float32)
  return out
