"""The learning curve of a run as one PNG: reward, success, turns, tool calls, staleness and
the policy's entropy against the learner step, from metrics.jsonl's rows. Written atomically,
so a viewer that reloads the file while training never sees half an image."""

from __future__ import annotations

import os

# (title, [(metric key, label)], y-axis label)
PANELS = (
    ("reward", [("reward", "mean reward")], "reward"),
    ("success", [("success", "success rate")], "fraction"),
    ("turns per episode", [("turns", "turns")], "turns"),
    ("tool calls per episode", [("search_calls", "search"), ("access_calls", "access")],
     "calls"),
    ("staleness (learner version - token version)",
     [("staleness_mean", "mean"), ("staleness_max", "max")], "versions"),
    # Not clip fraction / KL: with one PPO minibatch π_prox is π_θ, so both are 0 by
    # construction (rl/step.py). Entropy is what shows a step size that wrecks the policy.
    ("policy", [("entropy", "entropy (nats/token)"),
                ("capped_frac", "share of tokens over the behaviour-weight cap")], ""),
)


def smooth(values: list[float], window: int) -> list[float]:
  """Trailing moving average (the raw points stay on the plot, faint)."""
  out, total = [], 0.0
  for i, v in enumerate(values):
    total += v
    if i >= window:
      total -= values[i - window]
    out.append(total / min(i + 1, window))
  return out


def plot_metrics(rows: list[dict], out_png: str, *, title: str) -> str | None:
  """Renders `out_png` from metrics rows (metrics.jsonl's lines); None when there is nothing to
  plot yet."""
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
      pts = [(s, r[key]) for s, r in zip(steps, rows) if isinstance(r.get(key), (int, float))]
      if not pts:
        continue
      xs, ys = zip(*pts)
      line, = ax.plot(xs, ys, alpha=0.3, linewidth=1)
      ax.plot(xs, smooth(list(ys), window), color=line.get_color(), linewidth=2, label=label)
    ax.set_title(name)
    ax.set_xlabel("learner step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 and ax.get_lines():
      ax.legend(fontsize=8)
  fig.suptitle(title)
  tmp = f"{out_png}.tmp-{os.getpid()}.png"
  fig.savefig(tmp, dpi=90)
  plt.close(fig)
  os.replace(tmp, out_png)
  return out_png
