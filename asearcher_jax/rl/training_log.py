"""Training metrics to a JSONL file (one fsynced line per step), TensorBoard event files and a
compact console line."""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping

import numpy as np

from asearcher_jax.agent.trajectory import Trajectory
from asearcher_jax.jsonl import Follower, append_lines, read_lines, write_atomic


def episode_metrics(trajs: list[Trajectory]) -> dict[str, float]:
  """Reward, success, turns and tool calls of the episodes a step trained on."""
  if not trajs:
    return {}
  success = [t.metrics.get("em", float(t.reward >= 1.0)) for t in trajs]
  return {
      "reward": float(np.mean([t.reward for t in trajs])),
      "success": float(np.mean(success)),
      "turns": float(np.mean([t.num_turns for t in trajs])),
      "search_calls": float(np.mean([t.tool_calls("search") for t in trajs])),
      "access_calls": float(np.mean([t.tool_calls("access") for t in trajs])),
      "answered": float(np.mean([t.status == "answered" for t in trajs])),
      "episode_tokens": float(np.mean([len(t.tokens) for t in trajs])),
  }


def rollout_log_path(out_dir: str, worker: int) -> str:
  """Where rollout worker `worker` logs every group it scores (one file per worker: workers are
  separate processes, possibly on separate hosts)."""
  return os.path.join(out_dir, "rollouts", f"w{worker}.jsonl")


class RolloutLogs:
  """Every worker's group lines, kept up to date by reading only what the workers appended
  since the last `update`."""

  def __init__(self, out_dir: str):
    self.out_dir, self.rows, self._files = out_dir, [], {}

  def update(self) -> list[dict]:
    """Every group line so far, oldest first."""
    new = []
    for p in glob.glob(os.path.join(self.out_dir, "rollouts", "w*.jsonl")):
      new += self._files.setdefault(p, Follower(p)).read()
    if new:
      self.rows = sorted(self.rows + new, key=lambda r: r.get("time", 0.0))
    return self.rows


def read_rollout_logs(out_dir: str) -> list[dict]:
  """Every worker's group lines, oldest first, read once."""
  return RolloutLogs(out_dir).update()


def starved(groups: list[dict], since: float, least: int) -> str | None:
  """A console line when every group the workers scored since `since` was filtered out (at
  least `least` of them), else None. Dynamic filtering drops a group whose episodes all scored
  alike: a policy that always fails (or always succeeds) then gives the learner nothing, and a
  run waits on its first step with no other sign of why."""
  recent = [g for g in groups if g.get("time", 0.0) >= since]
  if len(recent) < least or not all(g.get("filtered") for g in recent):
    return None
  reward = np.mean([g.get("reward", 0.0) for g in recent])
  success = np.mean([g.get("success", 0.0) for g in recent])
  return (f"no data for the learner: the last {len(recent)} groups the rollout workers scored "
          f"were all filtered out, every episode of each group scoring alike (mean reward "
          f"{reward:.2f}, success {success:.2f}). {STARVED_ADVICE}")


def starved_after(rl) -> int:
  """Groups filtered out in a row before a run is told that its learner gets nothing: 4B, and
  at least 16 (a usable group in fewer is luck of the draw, not a sign)."""
  return max(4 * rl.batch_groups, 16)


STARVED_ADVICE = ("A policy that always fails, or always succeeds, gives the policy gradient "
                  "nothing to learn from: start RL from a policy that solves some of these "
                  "questions (SFT), pick questions of the right difficulty, or train on such "
                  "groups anyway with rl.filter_equal_rewards=false")


class MetricsWriter:
  def __init__(self, out_dir: str, tensorboard: bool = True):
    os.makedirs(out_dir, exist_ok=True)
    self.path = os.path.join(out_dir, "metrics.jsonl")
    self._tb_dir = os.path.join(out_dir, "tensorboard") if tensorboard else None
    self._tb = self._open_tb()

  def _open_tb(self, purge_step: int | None = None):
    if self._tb_dir is None:
      return None
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # metrics.jsonl still has everything
      return None
    return SummaryWriter(self._tb_dir, purge_step=purge_step)

  def rewind(self, step: int) -> None:
    """Drops what was written for steps after `step` (a resume from its checkpoint trains them
    again): metrics.jsonl is rewritten without their lines, and TensorBoard hides their
    events (`purge_step`)."""
    if os.path.exists(self.path):
      rows = read_lines(self.path)
      kept = [r for r in rows if not (isinstance(r, dict) and r.get("step", 0) > step)]
      if len(kept) != len(rows):
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    if self._tb is not None:
      self._tb.close()
      self._tb = self._open_tb(purge_step=step + 1)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    append_lines(self.path, [{"step": step, **metrics}])
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class NoMetrics:
  """The metrics of a learner process other than process 0: written once, by process 0."""

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    pass

  def rewind(self, step: int) -> None:
    pass

  def close(self) -> None:
    pass


def console_line(step: int, total: int, m: Mapping[str, Any]) -> str:
  def f(key, fmt="{:.3f}"):
    return fmt.format(m[key]) if key in m else "-"
  return (f"step {step}/{total} v{m.get('version', '?')} reward {f('reward')} success "
          f"{f('success', '{:.2f}')} turns {f('turns', '{:.1f}')} search "
          f"{f('search_calls', '{:.1f}')} loss {f('loss', '{:.4f}')} clip "
          f"{f('clip_frac', '{:.3f}')} stale {f('staleness_mean', '{:.2f}')} "
          f"{f('tokens_per_s', '{:.0f}')} tok/s")
