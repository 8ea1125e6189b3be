#!/usr/bin/env python
"""The README's main command over several seeds: how much the debug run learns, and its spread.

  python benchmarks/debug_seeds.py [--seeds 0 1 2 3 4] [--work runs/debug_seeds] [key=value ...]

Runs `SEED=s bash launch/debug.sh` once per seed, exactly as a user would (the seed sets the
policy's initialisation, the SFT data order and the RL stage's data order and sampling; the
world and the held-out questions stay the same), one after another so that each run has the
machine to itself. Per seed it records held-out EM Avg@k / Pass@k after SFT and after RL, the
change with its 95% paired bootstrap interval over the questions, the share of episodes that
pass the format gate and that answer, and the run's wall time; then the median and range over
seeds. Prints a table and writes JSON under benchmarks/results/. A seed whose run finished in
--work is read, not rerun; trailing arguments go to launch/debug.sh (RL-stage overrides).
--reevaluate scores finished runs again after a change to evaluation: it removes each run's
evaluations and reruns debug.sh with RESUME=1, which keeps the world, the model, the SFT and
the RL policies and evaluates both again (the wall time recorded stays the training run's).
--rerun-rl trains the RL stage again from each finished run's SFT policy (RESUME=1 without the
RL run): RL settings compared on the same SFT policies, whose stages the seed fixes bit for bit;
the wall time recorded is the first run's up to the RL stage plus the rerun's from it.
--trained-questions also evaluates the SFT and RL policies, as debug.sh evaluates them, on
the questions whose groups reached the learner (those the replay journal accepted: dynamic
filtering dropped the rest), and records how the scored groups split (all right, all wrong,
mixed): whether RL moved the policy on what it trained on, apart from whether that carried over
to held-out questions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from asearcher_jax.agent.trajectory import INFRA_STATUSES  # noqa: E402
from asearcher_jax.eval.harness import latest_traces  # noqa: E402
from asearcher_jax.eval.report import aggregate, paired_intervals  # noqa: E402
from asearcher_jax.jsonl import append_lines, read_lines  # noqa: E402
from asearcher_jax.replay.queue import JOURNAL  # noqa: E402
from asearcher_jax.rl.training_log import read_rollout_logs  # noqa: E402
from benchmarks.common import run_info, write_result  # noqa: E402

DONE = r"\[debug\] done in (\d+)m(\d+)s"  # debug.sh's last line: the run's wall time
# debug.sh's settings of the stages before RL, from the environment (recorded with results)
STAGE_ENV = ("SFT_TRAJ", "SFT_EPOCHS", "SFT_BATCH_ROWS", "EVAL_QUESTIONS")
# --trained-questions: the questions the learner got, and both policies' evaluations on them
TRAINED, TRAINED_EVALS = "rl_trained.jsonl", ("eval_trained_sft", "eval_trained_rl")


def debug_sh(seed: int, out: str, overrides: list[str], env: dict, log: str,
             resume: bool = False) -> None:
  """`SEED=seed OUT_DIR=out [RESUME=1] bash launch/debug.sh overrides`, its output to `log`;
  exits with the log's tail if the run fails."""
  print(f"seed {seed}: {'RESUME=1 ' if resume else ''}SEED={seed} OUT_DIR={out} bash "
        f"launch/debug.sh {' '.join(overrides)} (log {log})", flush=True)
  env = dict(env, SEED=str(seed), OUT_DIR=out, **({"RESUME": "1"} if resume else {}))
  with open(log, "w") as f:
    code = subprocess.call(["bash", os.path.join(ROOT, "launch", "debug.sh"), *overrides],
                           env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
  if code != 0:
    with open(log) as f:
      raise SystemExit(f"seed {seed} failed ({code}); {log}:\n{f.read()[-3000:]}")


def run_seed(seed: int, out: str, overrides: list[str], env: dict) -> float | None:
  """One debug run; its wall time in seconds as debug.sh reports it (setup included), or None
  when the run was already there."""
  if os.path.exists(os.path.join(out, "eval_rl", "report.json")):
    return None
  log = out + ".log"
  t0 = time.time()
  debug_sh(seed, out, overrides, env, log)
  with open(log) as f:
    done = re.findall(DONE, f.read())
  return int(done[-1][0]) * 60 + int(done[-1][1]) if done else time.time() - t0


def reevaluate(seed: int, out: str, overrides: list[str], env: dict) -> None:
  """The finished run's policies evaluated again as debug.sh evaluates them now."""
  for stage in ("eval_sft", "eval_rl", *TRAINED_EVALS):
    shutil.rmtree(os.path.join(out, stage), ignore_errors=True)
  debug_sh(seed, out, overrides, env, out + ".reevaluate.log", resume=True)


def stage_clock(log: str) -> tuple[int, int]:
  """Seconds into a debug.sh run at which its RL stage started and at which it was done."""
  with open(log) as f:
    text = f.read()
  secs = lambda m: int(m[0]) * 60 + int(m[1])  # noqa: E731
  return (secs(re.findall(r"\[debug (\d+)m(\d+)s\] 5/6", text)[-1]),
          secs(re.findall(DONE, text)[-1]))


def rerun_rl(seed: int, out: str, overrides: list[str], env: dict) -> float | None:
  """The RL stage and its evaluation run again from the finished run's SFT policy; returns the
  wall time of the whole run: the first run's stages before RL and the rerun's from RL on
  (None without the first run's log)."""
  for stage in ("rl", "eval_rl", *TRAINED_EVALS):
    shutil.rmtree(os.path.join(out, stage), ignore_errors=True)
  if os.path.exists(os.path.join(out, TRAINED)):  # another RL run trains on other questions
    os.remove(os.path.join(out, TRAINED))
  log = out + ".rerun_rl.log"
  debug_sh(seed, out, overrides, env, log, resume=True)
  if not os.path.exists(out + ".log"):
    return None
  rl_start, _ = stage_clock(out + ".log")
  rerun_start, rerun_done = stage_clock(log)
  return rl_start + rerun_done - rerun_start


def eval_k(folder: str) -> int:
  """Samples per question of an evaluation, from its report."""
  with open(os.path.join(folder, "report.json")) as f:
    return json.load(f)["k"]


def compare(sft_eval: str, rl_eval: str) -> dict:
  """Two evaluations of the same questions (as the eval report aggregates them): what each
  scored at their k, and the change with its paired interval."""
  k, rl_k = eval_k(sft_eval), eval_k(rl_eval)
  if rl_k != k:
    raise SystemExit(f"{sft_eval} and {rl_eval} sampled {k} and {rl_k} per question")
  res, traces = {"k": k}, {}
  for stage, folder in (("sft", sft_eval), ("rl", rl_eval)):
    traces[stage] = list(latest_traces(os.path.join(folder, "traces.jsonl"), k).values())
    [ds] = aggregate(traces[stage], k).values()
    ran = ds["samples"] - sum(ds["status"].get(s, 0) for s in INFRA_STATUSES)
    em = ds["metrics"]["em"]
    res[stage] = {"em_avg": em[f"avg@{k}"], "em_pass": em[f"pass@{k}"],
                  "format_ok": ds["format_ok"], "answered": ds["status"].get("answered", 0) / ran,
                  "tool_calls": ds["mean_tool_calls"], "questions": em["questions"],
                  "episodes": ran}
  [cells] = [v for key, v in paired_intervals(traces["sft"], traces["rl"], k).items()
             if key[1] == "em"]
  res["change"] = {"em_avg": res["rl"]["em_avg"] - res["sft"]["em_avg"],
                   "em_pass": res["rl"]["em_pass"] - res["sft"]["em_pass"],
                   "em_avg_interval": cells[f"avg@{k}"], "em_pass_interval": cells[f"pass@{k}"]}
  return res


def summarise(out: str) -> dict:
  """What one finished run scored on the held-out questions, SFT against RL."""
  res = compare(os.path.join(out, "eval_sft"), os.path.join(out, "eval_rl"))
  res["rl_steps"] = len(read_lines(os.path.join(out, "rl", "metrics.jsonl")))
  with open(os.path.join(out, "eval_rl", "report.json")) as f:
    report = json.load(f)
  res["eval"] = {key: report.get(key) for key in ("sampling", "scoring")}
  return res


def trained_questions(seed: int, out: str) -> dict:
  """SFT against RL on the questions whose groups the learner got, evaluated as debug.sh
  evaluates held-out questions (configs/debug.yaml's eval section; once, kept in
  TRAINED_EVALS), and how the groups the rollout worker scored split."""
  qids = {r["qid"] for r in read_lines(os.path.join(out, "rl", "replay", JOURNAL))
          if r.get("op") == "put"}
  data = os.path.join(out, TRAINED)
  if not os.path.exists(data):
    pool = os.path.join(out, "rl_questions.jsonl")  # debug.sh's RL data unless SFT_TRAJ=all
    if not os.path.exists(pool):
      pool = os.path.join(out, "world", "qa_train.jsonl")
    append_lines(data, [q for q in read_lines(pool) if q["qid"] in qids])
  for stage, policy, evals in zip(("sft", "rl"), ("sft", os.path.join("rl", "weights")),
                                  TRAINED_EVALS):
    dest = os.path.join(out, evals)
    if os.path.exists(os.path.join(dest, "report.json")):
      continue
    print(f"seed {seed}: {stage} policy on the {len(qids)} questions RL trained on", flush=True)
    code = subprocess.call(
        [sys.executable, "-m", "asearcher_jax.cli", "eval", "--serve", "--config",
         os.path.join(ROOT, "configs", "debug.yaml"), "model.arch=null", f"model.seed={seed}",
         f"model.path={os.path.join(out, policy)}",
         f"retrieval.index={os.path.join(out, 'world', 'index')}", "eval.limit=null",
         "--data", data, "--out", dest, "--no-progress"],
        cwd=ROOT, stdout=subprocess.DEVNULL)
    if code != 0:
      raise SystemExit(f"seed {seed}: evaluating {policy} on {data} failed ({code})")
  res = compare(*(os.path.join(out, evals) for evals in TRAINED_EVALS))
  groups = read_rollout_logs(os.path.join(out, "rl"))
  res["scored_groups"] = {
      "all": len(groups), "all_right": sum(g["filtered"] and g["success"] == 1 for g in groups),
      "all_wrong": sum(g["filtered"] and g["success"] == 0 for g in groups),
      "mixed": sum(not g["filtered"] for g in groups)}
  return res


def spread(values: list[float]) -> dict:
  return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  p.add_argument("--work", default="runs/debug_seeds")
  p.add_argument("--results", help="JSON output (default: benchmarks/results/debug_seeds_cpu.json)")
  p.add_argument("--reevaluate", action="store_true",
                 help="evaluate finished runs again (RESUME=1), keeping their policies")
  p.add_argument("--rerun-rl", action="store_true",
                 help="train the RL stage of finished runs again from their SFT policies")
  p.add_argument("--trained-questions", action="store_true",
                 help="also compare SFT and RL on the questions whose groups the learner got")
  p.add_argument("overrides", nargs="*", help="RL-stage overrides passed to launch/debug.sh")
  args = p.parse_args()
  work = os.path.abspath(args.work)
  os.makedirs(work, exist_ok=True)
  env = dict(os.environ)
  env.pop("RESUME", None)
  runs = {}
  for seed in args.seeds:
    out = os.path.join(work, f"seed{seed}")
    # A trained run (its RL policy exported) is evaluated again, even one whose earlier
    # re-evaluation was interrupted; only a run that never finished training runs whole.
    if args.reevaluate and os.path.isdir(os.path.join(out, "rl", "weights")):
      reevaluate(seed, out, args.overrides, env)
    wall = None
    if args.rerun_rl and os.path.exists(os.path.join(out, "sft", "config.json")):
      wall = rerun_rl(seed, out, args.overrides, env)
    wall = run_seed(seed, out, args.overrides, env) or wall
    runs[seed] = summarise(out)
    if args.trained_questions:
      runs[seed]["trained_questions"] = trained_questions(seed, out)
    times = os.path.join(out, "wall_s")
    if wall is not None:
      with open(times, "w") as f:
        f.write(f"{wall:.0f}\n")
    runs[seed]["wall_s"] = None
    if os.path.exists(times):
      with open(times) as f:
        runs[seed]["wall_s"] = float(f.read())
  pct = lambda x: f"{100 * x:5.1f}"  # noqa: E731
  first = runs[args.seeds[0]]
  print(f"\nheld-out EM Avg@{first['k']} / Pass@{first['k']} ({first['sft']['questions']} "
        f"questions), SFT -> RL, change [95% paired interval], format gate passed, wall time")
  for seed, r in runs.items():
    c = r["change"]
    lo, hi = c["em_avg_interval"]
    print(f"seed {seed}: SFT {pct(r['sft']['em_avg'])} / {pct(r['sft']['em_pass'])}  "
          f"RL {pct(r['rl']['em_avg'])} / {pct(r['rl']['em_pass'])}  "
          f"change {100 * c['em_avg']:+5.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] / "
          f"{100 * c['em_pass']:+5.1f}  format SFT {pct(r['sft']['format_ok'])}% RL "
          f"{pct(r['rl']['format_ok'])}%  {r['wall_s'] or 0:.0f}s")
    if "trained_questions" in r:
      t, g = r["trained_questions"], r["trained_questions"]["scored_groups"]
      lo, hi = t["change"]["em_avg_interval"]
      print(f"        on the {t['sft']['questions']} questions RL trained on: SFT "
            f"{pct(t['sft']['em_avg'])} / {pct(t['sft']['em_pass'])}  RL {pct(t['rl']['em_avg'])} "
            f"/ {pct(t['rl']['em_pass'])}  change {100 * t['change']['em_avg']:+5.1f} "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}]; of {g['all']} groups scored {g['all_right']} "
            f"all right, {g['all_wrong']} all wrong, {g['mixed']} mixed")
  summary = {
      "sft_em_avg": spread([r["sft"]["em_avg"] for r in runs.values()]),
      "sft_em_pass": spread([r["sft"]["em_pass"] for r in runs.values()]),
      "rl_em_avg": spread([r["rl"]["em_avg"] for r in runs.values()]),
      "rl_em_pass": spread([r["rl"]["em_pass"] for r in runs.values()]),
      "change_em_avg": spread([r["change"]["em_avg"] for r in runs.values()]),
      "change_em_pass": spread([r["change"]["em_pass"] for r in runs.values()]),
      "sft_format_ok": spread([r["sft"]["format_ok"] for r in runs.values()]),
      "rl_format_ok": spread([r["rl"]["format_ok"] for r in runs.values()]),
      "gain_clear_of_zero": sum(r["change"]["em_avg_interval"][0] > 0 for r in runs.values()),
  }
  if args.trained_questions:
    trained = [r["trained_questions"]["change"] for r in runs.values()]
    summary["trained_change_em_avg"] = spread([c["em_avg"] for c in trained])
    summary["trained_gain_clear_of_zero"] = sum(c["em_avg_interval"][0] > 0 for c in trained)
  if all(r["wall_s"] for r in runs.values()):
    summary["wall_s"] = spread([r["wall_s"] for r in runs.values()])
  for key in ("sft_em_avg", "rl_em_avg", "change_em_avg", "sft_em_pass", "rl_em_pass",
              "change_em_pass"):
    s = summary[key]
    print(f"{key:>15}: median {100 * s['median']:+6.1f}, range [{100 * s['min']:+.1f}, "
          f"{100 * s['max']:+.1f}]")
  print(f"RL gain clear of zero (paired interval above 0) in {summary['gain_clear_of_zero']} of "
        f"{len(runs)} seeds")
  if args.trained_questions:
    s = summary["trained_change_em_avg"]
    print(f"on the questions RL trained on: change median {100 * s['median']:+.1f}, range "
          f"[{100 * s['min']:+.1f}, {100 * s['max']:+.1f}], clear of zero in "
          f"{summary['trained_gain_clear_of_zero']} of {len(runs)} seeds")
  write_result({"benchmark": "debug_seeds", **run_info(), "args": vars(args),
                "stage_env": {k: env[k] for k in STAGE_ENV if k in env},
                "runs": {str(s): r for s, r in runs.items()}, "summary": summary},
               args.results, "debug_seeds_cpu")


if __name__ == "__main__":
  main()
