#!/usr/bin/env python
"""How much of an RL step's gradient is signal: the gradient noise scale of finished RL runs.

  python benchmarks/gradient_noise.py RUN_DIR [RUN_DIR ...] [--config C] [--policy sft]
      [--max-version V]

For each run (a `launch/debug.sh` output directory, or any run with a replay journal; --config
gives the RL section its loss is computed with, configs/debug.yaml by default), reads the
groups its rollouts put into the replay queue (`rl/replay/journal.jsonl`; a journal that was
compacted keeps only the groups not yet consumed), keeps those whose rewards differ (the ones
the learner trains on), and takes each group's policy gradient — the learner's own decoupled
PPO loss, advantages z-scored within the group — at the policy the RL stage started from
(`RUN_DIR/<policy>`). With per-group gradients g_i of the true gradient G:

  |G|^2   ~ mean over pairs i != j of g_i . g_j          (unbiased: independent groups)
  tr(S)   ~ mean_i |g_i|^2 - |G|^2                        (S: one group's gradient covariance)
  B_noise = tr(S) / |G|^2                                 (McCandlish et al. 2018, B_simple)

B_noise is the batch, in groups, at which an update's gradient is as much signal as noise: the
cosine between two independent updates of B groups is B / (B + B_noise). A debug-run update
sees about one group's worth of episodes (4 groups, 4 PPO minibatches a step). Prints a table
and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from benchmarks.common import run_info, write_result  # noqa: E402


def noise_scale(grads: np.ndarray) -> dict:
  """B_noise and its parts from per-group gradients [n, d] (n >= 2), in float64. Where the
  estimated signal |G|^2 is not positive (noise swamps it at this n) B_noise is None, not inf
  (JSON has no infinity), and `signal_nonpositive` says so."""
  g = np.asarray(grads, np.float64)
  n = len(g)
  if n < 2:
    raise ValueError("the noise scale needs at least two groups")
  gram = g @ g.T
  sq = float(np.trace(gram) / n)
  signal = float((gram.sum() - np.trace(gram)) / (n * (n - 1)))
  noise = sq - signal
  return {"groups": n, "mean_sq_norm": sq, "signal_sq_norm": signal, "noise_trace": noise,
          "b_noise": noise / signal if signal > 0 else None, "signal_nonpositive": signal <= 0}


def group_gradients(run: str, config: str, policy: str, max_version: int) -> np.ndarray:
  import jax

  from asearcher_jax.config import load_config
  from asearcher_jax.jsonl import read_lines
  from asearcher_jax.models.pretrained import from_pretrained
  from asearcher_jax.replay.queue import Group
  from asearcher_jax.replay.validate import decode_trajectory
  from asearcher_jax.rl.batch import build_batch
  from asearcher_jax.rl.step import make_ppo_loss

  journal = os.path.join(run, "rl", "replay", "journal.jsonl")
  if not os.path.isfile(journal):
    raise SystemExit(f"{journal}: no replay journal; is {run} an RL run's directory?")
  cfg = load_config(config, ["model.arch=null", f"model.path={os.path.join(run, policy)}",
                             "rl.ppo_n_minibatches=1"])
  model, _, _ = from_pretrained(cfg.model.path, dtype="float32", param_dtype="float32",
                                tokenizer=False, progress=False)
  params, loss_fn = make_ppo_loss(model, cfg.rl)
  grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))
  out = []
  for record in read_lines(journal):
    if record.get("op") != "put" or record["submit_version"] > max_version:
      continue
    group = Group.from_record(record)
    trajs = [decode_trajectory(t, group.group_id) for t in group.trajectories]
    if len({t.reward for t in trajs}) < 2:
      continue
    batch, _ = build_batch([trajs], cfg.rl, learner_version=0)
    leaves = jax.tree.leaves(grad(params, batch))
    out.append(np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves]))
  if len(out) < 2:
    raise SystemExit(f"{journal}: {len(out)} group(s) with differing rewards; the noise scale "
                     "needs at least two")
  return np.stack(out)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("runs", nargs="+", help="run directories (launch/debug.sh's OUT_DIR)")
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "debug.yaml"),
                 help="the config the runs trained with (its rl section sets the loss)")
  p.add_argument("--policy", default="sft", help="the policy, under each run, to take gradients at")
  p.add_argument("--max-version", type=int, default=10**9,
                 help="only groups submitted by policy versions up to this one")
  p.add_argument("--results",
                 help="JSON output (default: benchmarks/results/gradient_noise_cpu.json)")
  args = p.parse_args()
  rows = {}
  for run in args.runs:
    rows[run] = noise_scale(group_gradients(run, args.config, args.policy, args.max_version))
    r = rows[run]
    if r["signal_nonpositive"]:
      print(f"{run}: {r['groups']} groups, estimated signal |G|^2 {r['signal_sq_norm']:.3g} <= 0: "
            "the noise swamps it at this many groups, B_noise unbounded (recorded as null)",
            flush=True)
      continue
    cos = lambda b: b / (b + r["b_noise"])  # noqa: E731
    print(f"{run}: {r['groups']} groups, B_noise {r['b_noise']:.0f} groups; cosine of two "
          f"independent updates of 1 / 4 / 32 groups: {cos(1):.3f} / {cos(4):.3f} / "
          f"{cos(32):.3f}", flush=True)
  write_result({"benchmark": "gradient_noise", **run_info(), "args": vars(args), "runs": rows},
               args.results, "gradient_noise_cpu")


if __name__ == "__main__":
  main()
