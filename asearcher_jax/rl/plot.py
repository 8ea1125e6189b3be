"""The learning curve of a run as one PNG: reward, success, turns, tool calls, staleness and
the policy's entropy against the learner step, from metrics.jsonl's rows, and the reward and
success of every group the rollout workers scored, filtered or not, against the policy version
it was started under (the weights of that learner step). Written atomically, so a viewer that
reloads the file while training never sees half an image."""

from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

# (title, [(metric key, label)], y-axis label)
PANELS = (
    ("reward", [("reward", "trained groups")], "reward"),
    ("success", [("success", "trained groups")], "fraction"),
    ("turns per episode", [("turns", "turns")], "turns"),
    ("tool calls per episode", [("search_calls", "search"), ("access_calls", "access")],
     "calls"),
    ("staleness (learner version - token version)",
     [("staleness_mean", "mean"), ("staleness_max", "max")], "versions"),
    # Entropy is what shows a step size that wrecks the policy. The clipped share is 0 by
    # construction with one PPO minibatch (π_prox is π_θ, rl/step.py); with more it shows how
    # far the later updates push the policy from where the step started.
    ("policy", [("entropy", "entropy (nats/token)"),
                ("capped_frac", "share of tokens over the behaviour-weight cap"),
                ("clip_frac", "share of tokens clipped (rl.ppo_n_minibatches > 1)"),
                # The same weights scoring the same tokens in the learner and the decode engine:
                # the gap is numerics (e.g. bf16 serving), not off-policyness.
                ("logp_gap_mean", "train-inference |log-prob gap|, current version")], ""),
)


# Panels whose metric is also drawn from the rollout workers' log: dynamic filtering keeps only
# groups with mixed rewards, so the trained groups' success sits near 0.5 whatever the policy
# learns.
ROLLOUT_PANELS = ("reward", "success")


def by_version(rollouts: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
  """Mean of `key` over the groups started under each policy version (groups are equal-sized)."""
  sums: dict[int, list[float]] = {}
  for r in rollouts:
    if _finite(r.get(key)) and "version" in r:
      sums.setdefault(int(r["version"]), []).append(r[key])
  versions = sorted(sums)
  return versions, [sum(sums[v]) / len(sums[v]) for v in versions]


def _finite(v) -> bool:
  """A point to plot: one NaN would blank a smoothed curve from there on."""
  return isinstance(v, (int, float)) and math.isfinite(v)


def smooth(values: list[float], window: int) -> list[float]:
  """Trailing moving average (the raw points stay on the plot, faint)."""
  out, total = [], 0.0
  for i, v in enumerate(values):
    total += v
    if i >= window:
      total -= values[i - window]
    out.append(total / min(i + 1, window))
  return out


def draw(ax, xs, ys, window: int, label: str) -> None:
  line, = ax.plot(xs, ys, alpha=0.3, linewidth=1)
  ax.plot(xs, smooth(list(ys), window), color=line.get_color(), linewidth=2, label=label)


def plot_metrics(rows: list[dict], out_png: str, *, title: str,
                 rollouts: Sequence[dict] = ()) -> str | None:
  """Renders `out_png` from metrics rows (metrics.jsonl's lines) and the rollout workers' group
  lines (`rl.training_log.read_rollout_logs`); None when there is nothing to plot yet."""
  rows = [r for r in rows if "step" in r]
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")  # files only; never a display
  import matplotlib.pyplot as plt
  steps = [r["step"] for r in rows]
  window = max(1, len(rows) // 10)
  fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
  for ax, (name, series, ylabel) in zip(axes.flat, PANELS):
    for key, label in series:
      pts = [(s, r[key]) for s, r in zip(steps, rows) if _finite(r.get(key))]
      if not pts:
        continue
      xs, ys = zip(*pts)
      draw(ax, xs, ys, window, label)
    if name in ROLLOUT_PANELS and rollouts:
      xs, ys = by_version(rollouts, series[0][0])
      if xs:
        draw(ax, xs, ys, max(1, len(xs) // 10), "all groups, by policy version")
    ax.set_title(name)
    ax.set_xlabel("learner step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[1]) > 1:
      ax.legend(fontsize=8)
  fig.suptitle(title)
  tmp = f"{out_png}.tmp-{os.getpid()}.png"
  fig.savefig(tmp, dpi=90)
  plt.close(fig)
  os.replace(tmp, out_png)
  return out_png
