#!/usr/bin/env python
"""The RL learner's step on a run's own trajectories: the LM head on loss positions or on all.

  python benchmarks/learner_step.py RUN_DIR [--config C] [--policy sft] [--batches 8]

The step runs with the LM head on the loss positions alone (`TrainBatch.select`, as the learner
runs it) against the head on every position. RUN_DIR is a `launch/debug.sh` output directory (or
any run with a replay journal). Its groups with differing rewards, in the order the rollouts put
them, are cut into batches of `rl.batch_groups` as the learner leases them and built by the
learner's `build_batch`; the learner's step (config's rl and optimizer sections, weights of
RUN_DIR/<policy>) runs each batch both ways, alternately, after one untimed pass that compiles
every shape. In an agent's trajectories most tokens are prompt and tool output, which carry no
loss: the head, a large share of a step wherever the vocabulary is large against the model, then
runs on a fraction of each row. Prints a table and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from benchmarks.common import run_info, write_result  # noqa: E402


def leased_batches(run: str, cfg, batches: int):
  """Up to `batches` learner batches of the run's groups with differing rewards (put order)."""
  from asearcher_jax.jsonl import read_lines
  from asearcher_jax.replay.queue import Group
  from asearcher_jax.replay.validate import decode_trajectory
  from asearcher_jax.rl.batch import build_batch

  journal = os.path.join(run, "rl", "replay", "journal.jsonl")
  if not os.path.isfile(journal):
    raise SystemExit(f"{journal}: no replay journal; is {run} an RL run's directory?")
  out, groups = [], []
  for record in read_lines(journal):
    if record.get("op") != "put":
      continue
    group = Group.from_record(record)
    trajs = [decode_trajectory(t, group.group_id) for t in group.trajectories]
    if len({t.reward for t in trajs}) < 2:
      continue
    groups.append(trajs)
    if len(groups) == cfg.rl.batch_groups:
      version = max(int(t.version.max(initial=0)) for g in groups for t in g)
      out.append(build_batch(groups, cfg.rl, learner_version=version))
      groups = []
      if len(out) == batches:
        break
  if not out:
    raise SystemExit(f"{journal}: fewer than {cfg.rl.batch_groups} groups with differing rewards")
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("run", help="a run directory (launch/debug.sh's OUT_DIR)")
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "debug.yaml"),
                 help="the config the run trained with (its rl and optimizer sections)")
  p.add_argument("--policy", default="sft", help="the weights, under the run, to step from")
  p.add_argument("--batches", type=int, default=8, help="learner batches to time")
  p.add_argument("--repeats", type=int, default=2, help="timed passes over the batches")
  p.add_argument("--results", help="JSON output (default: "
                 "benchmarks/results/learner_step_<platform>_<config's name>.json)")
  p.add_argument("overrides", nargs="*", help="dotted config overrides")
  args = p.parse_args()

  import jax

  from asearcher_jax.config import load_config
  from asearcher_jax.memory_plan import resolve_remat
  from asearcher_jax.models.pretrained import load_policy
  from asearcher_jax.rl.batch import shard_batch
  from asearcher_jax.rl.step import make_ppo_step
  from asearcher_jax.sharding import make_mesh
  from asearcher_jax.train.optimizer import make_optimizer

  cfg = load_config(args.config, args.overrides + [
      "model.arch=null", f"model.path={os.path.join(args.run, args.policy)}"])
  mesh = make_mesh(cfg.mesh.shape())
  cfg = resolve_remat(cfg)  # as the learner loads its policy (rl/launch.py)
  built = [(shard_batch(b, mesh), info) for b, info in leased_batches(args.run, cfg, args.batches)]
  ways = {}
  for name in ("loss_positions", "whole_rows"):
    model, _, _ = load_policy(cfg.model, mesh, progress=False)
    params, opt_state, step = make_ppo_step(
        model, make_optimizer(cfg.optimizer, cfg.rl.total_updates), cfg.rl)
    ways[name] = [params, opt_state, step]

  def run(name, batch):
    if name == "whole_rows":
      batch = dataclasses.replace(batch, select=None)
    way = ways[name]
    t0 = time.perf_counter()
    way[0], way[1], metrics = way[2](way[0], way[1], batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0

  for batch, _ in built:  # compile every shape both ways
    for name in ways:
      run(name, batch)
  times = {name: [[] for _ in built] for name in ways}
  for r in range(args.repeats):
    for i, (batch, _) in enumerate(built):
      for name in (ways if (i + r) % 2 == 0 else reversed(list(ways))):  # alternate the order
        times[name][i].append(run(name, batch))

  rows = []
  for i, (batch, info) in enumerate(built):
    row = {"tokens": info["tokens"], "loss_tokens": info["num_tokens"], "rows": info["rows"],
           "micro_batches": info["micro_batches"], "row_tokens": batch.shape[-1],
           "head_positions": info["head_positions"]}
    for name in ways:
      row[f"{name}_s"] = [round(t, 4) for t in times[name][i]]
    rows.append(row)
    print(f"batch {i}: {info['tokens']} tokens ({info['num_tokens']} loss) in {info['rows']} "
          f"rows of {batch.shape[-1]}, head on {info['head_positions']} a row: "
          f"{np.median(times['loss_positions'][i]):.3f} s against "
          f"{np.median(times['whole_rows'][i]):.3f} s", flush=True)
  total = {name: float(sum(np.median(t) for t in times[name])) for name in ways}
  ratio = total["loss_positions"] / total["whole_rows"]
  loss_share = sum(r["loss_tokens"] for r in rows) / sum(r["tokens"] for r in rows)
  print(f"{len(rows)} batches, loss on {loss_share:.0%} of the tokens: "
        f"{total['loss_positions']:.2f} s against {total['whole_rows']:.2f} s ({ratio:.2f}x)")
  config_name = os.path.splitext(os.path.basename(args.config))[0]  # as train_step.py names it
  write_result({"benchmark": "learner_step", **run_info(), "args": vars(args),
                "model": cfg.model.path, "loss_share": round(loss_share, 4),
                "total_s": {k: round(v, 4) for k, v in total.items()},
                "loss_positions_vs_whole_rows": round(ratio, 4), "batches": rows},
               args.results, f"learner_step_{jax.devices()[0].platform}_{config_name}")


if __name__ == "__main__":
  main()
