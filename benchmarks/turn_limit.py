#!/usr/bin/env python
"""The paper's central claim at small scale: a short turn limit caps what RL can teach.

  python benchmarks/turn_limit.py [--limits 10 64] [--rl-steps 20] [--work DIR] [key=value ...]

On a world whose questions need up to --max-hops hops (one search per hop, so a 12-hop
question takes at least 13 turns), one tiny policy is warm-started by SFT on the expert's
trajectories (solved with no practical turn limit), then trained by the asynchronous RL loop
(`asearcher train`) once per turn limit, from the same SFT weights with the same seeds, and
each RL policy is evaluated under the limit it was trained with on two seeded random samples
across all hop counts: held-out questions, and questions of the training split (a policy this
small may not generalise to held-out final facts at all; on the questions it trained on, what
the limit lets it learn still shows). Reported per limit and question set: success (EM Avg@k /
Pass@k) overall and by hop count, turns and tool calls per episode, and how episodes ended.
Prints a table, writes JSON and a PNG under benchmarks/results/ (and everything else under
--work).

Every stage is the CLI a user runs (world build, init-model, world solve, sft, train, eval);
a stage whose output exists in --work is reused, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from asearcher_jax.eval.harness import latest_traces  # noqa: E402
from asearcher_jax.eval.report import aggregate  # noqa: E402
from asearcher_jax.jsonl import append_lines, read_lines  # noqa: E402
from benchmarks.common import run_info, write_result  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "debug.yaml")


def cli(*args: str, log: str, stage: str) -> None:
  """One `asearcher` command, its output appended to `log` and its time to stage_times.jsonl
  beside it (stages are reused across invocations); raises with the log's tail."""
  t0 = time.time()
  print(f"$ asearcher {' '.join(args)}", flush=True)
  with open(log, "a") as f:
    f.write(f"\n$ asearcher {' '.join(args)}\n")
    f.flush()
    code = subprocess.call([sys.executable, "-m", "asearcher_jax.cli", *args], stdout=f,
                           stderr=subprocess.STDOUT)
  if code != 0:
    with open(log) as f:
      tail = f.read()[-3000:]
    raise SystemExit(f"failed ({code}) after {time.time() - t0:.0f}s; {log}:\n{tail}")
  print(f"  ok in {time.time() - t0:.0f}s", flush=True)
  append_lines(os.path.join(os.path.dirname(log), "stage_times.jsonl"),
               [{"stage": stage, "s": round(time.time() - t0, 1)}])


def by_hops(traces: str, qa: str, k: int) -> dict:
  """Success (EM) Avg@k per hop count, as eval/report.aggregate scores it, and the questions
  it counts per hop count."""
  hops = {r["qid"]: r["hops"] for r in read_lines(qa)}
  # A retried episode counts once; the hop count stands in for the dataset.
  samples = [{**r, "dataset": hops[r["qid"]]} for r in latest_traces(traces, k).values()]
  em = {h: d["metrics"]["em"] for h, d in aggregate(samples, k).items() if "em" in d["metrics"]}
  return {"success_by_hops": {h: v[f"avg@{k}"] for h, v in em.items()},
          "questions_by_hops": {h: v["questions"] for h, v in em.items()}}


SETS = {"held_out": "held-out questions", "train": "training questions"}


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
  for ax, (key, name) in zip(axes, SETS.items()):
    for limit, r in results.items():
      h = r[key]["success_by_hops"]  # hop count -> success, in hop order
      ax.plot(list(h), list(h.values()), marker="o", label=f"trained and run with {limit} turns")
    ax.set_title(name)
    ax.set_xlabel("hops the question needs")
    ax.set_ylabel("success (EM Avg@k)")
    ax.grid(alpha=0.3)
    ax.legend()
  b = axes[-1]
  names = [str(n) for n in results]
  for i, (key, name) in enumerate(SETS.items()):
    b.bar([j + 0.4 * i for j in range(len(names))], [r[key]["tool_calls"] for r in
                                                     results.values()], width=0.4, label=name)
  b.set_xticks([j + 0.2 for j in range(len(names))], names)
  b.set_xlabel("turn limit")
  b.set_ylabel("tool calls per episode")
  b.legend()
  b.grid(alpha=0.3, axis="y")
  fig.suptitle("turn limit in RL training: success and tool use")
  fig.savefig(path, dpi=90)
  plt.close(fig)
  print(f"plot {path}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--limits", type=int, nargs="+", default=[10, 64])
  p.add_argument("--max-hops", type=int, default=12)
  p.add_argument("--questions-per-hop", type=int, default=150)
  p.add_argument("--sft-questions", type=int, default=1500)
  p.add_argument("--sft-epochs", type=int, default=3)
  p.add_argument("--rl-steps", type=int, default=20)
  p.add_argument("--eval-questions", type=int, default=120,
                 help="per question set (held-out, training), sampled across hop counts")
  p.add_argument("--k", type=int, default=2)
  p.add_argument("--work", default="runs/turn_limit")
  p.add_argument("--results", help="JSON output (default: benchmarks/results/turn_limit_cpu.json)")
  p.add_argument("overrides", nargs="*", help="config overrides for every stage")
  args = p.parse_args()
  w = os.path.abspath(args.work)
  os.makedirs(w, exist_ok=True)
  log = os.path.join(w, "stages.log")
  world = os.path.join(w, "world")
  # Long episodes: 2048-token contexts (the expert's 12-hop episodes are about 1,100 tokens).
  common = ["--config", CONFIG, "model.arch=null", "serve.max_len=2048",
            "agent.max_context_tokens=2048", "rl.row_tokens=2048", "rl.micro_batch_rows=2",
            *args.overrides]
  t0 = time.time()
  if not os.path.exists(os.path.join(world, "index", "manifest.json")):
    cli("world", "build", "--out", world, "--index", "--overwrite", "--max-hops",
        str(args.max_hops), "--questions-per-hop", str(args.questions_per_hop), "--num-people",
        "1200", "--num-cities", "240", "--num-countries", "30", "--num-orgs", "240",
        "--num-works", "480", "--max-facts-per-passage", "1",  # as launch/debug.sh
        log=log, stage="world")
  model = os.path.join(w, "model")
  if not os.path.exists(os.path.join(model, "config.json")):
    cli("init-model", "--config", CONFIG, *args.overrides, "--out", model, "--tokenizer-corpus",
        world, "--overwrite", log=log, stage="model")
  expert = os.path.join(w, "expert.jsonl")
  if not os.path.exists(expert):
    cli("world", "solve", *common, f"model.path={model}", "agent.max_turns=64", "--world",
        world, "--limit", str(args.sft_questions), "--out", expert, "--no-progress", log=log,
        stage="expert")
  sft = os.path.join(w, "sft")
  if not os.path.exists(os.path.join(sft, "config.json")):
    cli("sft", *common, f"model.path={model}", "--data", expert, "--out", sft, "--epochs",
        str(args.sft_epochs), "--batch-rows", "2", "--loss-on", "all", "--no-progress",
        log=log, stage="sft")  # as launch/debug.sh: the policy starts untrained
  results = {}
  for limit in args.limits:
    run = os.path.join(w, f"rl_{limit}")
    limits = [f"agent.max_turns={limit}"]
    metrics = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(metrics) or len(read_lines(metrics)) < args.rl_steps:
      cli("train", *common, *limits, f"model.path={sft}", f"run.output_dir={run}",
          f"rl.data=[{os.path.join(world, 'qa_train.jsonl')}]",
          f"retrieval.index={os.path.join(world, 'index')}", f"rl.total_steps={args.rl_steps}",
          "optimizer.learning_rate=3e-4", "optimizer.warmup_steps=0", "--no-progress",
          *(["--resume"] if os.path.exists(os.path.join(run, "checkpoints")) else []), log=log,
          stage=f"rl_{limit}")
    results[limit] = {}
    for key, split in (("held_out", "test"), ("train", "train")):
      qa = os.path.join(world, f"qa_{split}.jsonl")
      ev = os.path.join(w, f"eval_{limit}" + ("" if split == "test" else "_train"))
      if not os.path.exists(os.path.join(ev, "report.json")):
        cli("eval", "--serve", *common, *limits, f"model.path={os.path.join(run, 'weights')}",
            f"retrieval.index={os.path.join(world, 'index')}", "--data", qa, "--limit",
            str(args.eval_questions), "--k", str(args.k), "--out", ev, "--no-progress", log=log,
            stage=os.path.basename(ev))
      with open(os.path.join(ev, "report.json")) as f:
        [ds] = json.load(f)["datasets"].values()
      em = ds["metrics"]["em"]
      results[limit][key] = {
          "success_avg": em[f"avg@{args.k}"], "success_pass": em[f"pass@{args.k}"],
          "turns": ds["mean_turns"], "tool_calls": ds["mean_tool_calls"],
          **by_hops(os.path.join(ev, "traces.jsonl"), qa, args.k), "status": ds["status"]}
  print(f"\nsuccess by turn limit (EM, k={args.k}, {args.eval_questions} questions a set, "
        f"1-{args.max_hops} hops, {args.rl_steps} RL steps from one SFT start):")
  print(f"{'limit':>5}  {'questions':<18}  {'avg@k':>6}  {'pass@k':>6}  {'turns':>5}  "
        f"{'tools':>5}  by hops")
  for limit, r in results.items():
    for key, name in SETS.items():
      x = r[key]
      hops = " ".join(f"{h}:{100 * v:.0f}" for h, v in x["success_by_hops"].items())
      print(f"{limit:>5}  {name:<18}  {100 * x['success_avg']:6.1f}  "
            f"{100 * x['success_pass']:6.1f}  {x['turns']:5.1f}  {x['tool_calls']:5.1f}  {hops}")
  out = {"benchmark": "turn_limit", **run_info(), "args": vars(args),
         "wall_s": time.time() - t0,  # this invocation; stages lists every stage's time
         "stages": read_lines(os.path.join(w, "stage_times.jsonl")), "results": results}
  path = write_result(out, args.results, "turn_limit_cpu")
  plot(results, os.path.splitext(path)[0] + ".png")


if __name__ == "__main__":
  main()
