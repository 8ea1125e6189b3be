"""`asearcher eval`: the agent on QA datasets, k samples per question, Avg@k / Pass@k.

Outputs in `eval.out_dir`: `traces.jsonl` (one readable line per episode: question, gold,
prediction, status, metrics and the transcript), `report.json` and the printed table;
`trajectories.jsonl` with the full token records when `eval.save_trajectories`. Each finished
episode is appended and fsynced at once, so an interrupted run loses at most the episodes in
flight, and a rerun with the same out_dir skips what is done. Not done, so run again: episodes
the infrastructure ended (`aborted`: a decode server went away; `env_error`: a tool server,
or the judge that is the reward, failed), episodes whose question's golds have changed since,
and, with `eval.judge`, episodes the judge has not scored. A rerun that would score otherwise
(another normalisation or F1), sample otherwise, or run the agent otherwise (turn and token
limits, prompt, tools) than the episodes it keeps is refused: one score never mixes the two.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import TYPE_CHECKING, Any

from asearcher_jax.agent import Agent, DecodePolicy, OpenAIPolicy, Trajectory, score, write_jsonl
from asearcher_jax.agent.episode import derive_seed
from asearcher_jax.agent.trajectory import INFRA_STATUSES
from asearcher_jax.data.datasets import load_datasets
from asearcher_jax.data.qa import DataError, QAItem
from asearcher_jax.eval.report import aggregate, format_table, scoring_line
from asearcher_jax.jsonl import append_lines, read_lines, write_atomic
from asearcher_jax.models.tokenizer import policy_tokenizer
from asearcher_jax.reward.scorer import Scorer

if TYPE_CHECKING:  # annotations only: config.py assembles every section, above this module
  from asearcher_jax.config import Config

_SAMPLING = ("temperature", "top_p", "top_k")


def sampling_of(agent_cfg) -> dict[str, Any]:
  """What a score depends on besides the policy: the sampling the episodes drew with."""
  return {k: getattr(agent_cfg, k) for k in _SAMPLING}


def agent_settings_of(agent_cfg) -> dict[str, Any]:
  """The agent's other settings an episode's outcome depends on (its turn, token and time
  limits, prompt, tools): a resumed run must not mix episodes run otherwise."""
  return agent_cfg.model_dump(mode="json", exclude={*_SAMPLING, "valid_instruction_ratio"})


def scoring_of(reward_cfg) -> dict[str, str]:
  """How answers were scored: a resumed run must not mix episodes scored otherwise."""
  return {"normalization": reward_cfg.normalization, "f1_variant": reward_cfg.f1_variant}


def trace_line(dataset: str, t: Trajectory, scoring: dict[str, str] | None = None,
               agent: dict[str, Any] | None = None) -> dict[str, Any]:
  return {
      "dataset": dataset, "qid": t.qid, "sample": t.sample,
      "sampling": {k: t.sampling[k] for k in _SAMPLING} if t.sampling else None,
      "scoring": scoring, "agent": agent,
      "question": t.question,
      "answers": t.answers, "prediction": t.prediction, "status": t.status, "error": t.error,
      "metrics": t.metrics, "reward": t.reward, "format_ok": t.format_ok,
      "turns": t.num_turns, "tool_calls": t.tool_calls(),
      "tool_errors": sum(tn.tool_ok is False for tn in t.turns),
      "wall_s": round(t.timings.get("wall_s", 0.0), 3), "transcript": t.transcript}


def latest_traces(path: str, k: int) -> dict[tuple[str, str, int], dict[str, Any]]:
  """The last trace line of each (dataset, qid, sample < k): a retried episode replaces its
  aborted attempt."""
  return {(t["dataset"], t["qid"], t["sample"]): t for t in read_lines(path) if t["sample"] < k}


def build_policy(cfg: Config):
  """The policy `eval.backend` names, with the tokenizer it needs."""
  e = cfg.eval
  tokenizer = policy_tokenizer(cfg.model, e.tokenizer, required=e.backend == "decode")
  if e.backend == "openai":
    return OpenAIPolicy(e.openai_base_url, e.openai_model, chat=e.openai_chat,
                        api_key_env=e.api_key_env, timeout_s=e.request_timeout_s,
                        tokenizer=tokenizer)
  from asearcher_jax.inference.client import DecodeClient
  from asearcher_jax.placement import client_token
  address = e.decode_address or f"127.0.0.1:{cfg.serve.grpc_port}"
  return DecodePolicy(DecodeClient(address, token=client_token(cfg), timeout=e.request_timeout_s),
                      tokenizer)


async def _close(policy) -> None:
  if isinstance(policy, DecodePolicy):
    await policy.client.close()
  elif hasattr(policy, "close"):
    await policy.close()


async def evaluate(cfg: Config, *, policy=None, tools=None, progress: bool = True,
                   echo=print) -> dict[str, Any]:
  """Runs what `cfg.eval` asks; returns the report (also written to report.json)."""
  from tqdm.auto import tqdm

  from asearcher_jax.tools.client import make_client
  e = cfg.eval
  if not e.data:
    raise DataError("eval.data is empty: name QA files or TFDS dataset directories")
  out_dir = e.out_dir or os.path.join(cfg.run.output_dir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  traces_path = os.path.join(out_dir, "traces.jsonl")
  items, notes, skipped = load_datasets(e.data, e.split, e.limit,
                                        e.seed if e.sample else None)
  for n in notes:
    echo(n)
  agent_cfg = (cfg.agent if e.temperature is None
               else cfg.agent.model_copy(update={"temperature": e.temperature}))
  scoring, settings = scoring_of(cfg.reward), agent_settings_of(agent_cfg)
  settings["topk"] = agent_cfg.topk or cfg.search.topk  # unset: the search client's
  golds = {(ds, it.qid): list(it.answers) for ds, it in items}
  # Done: not ended by the infrastructure, scored against the golds the data has now, and
  # judged when this run asks for the judge (a judge that failed, or was off, is asked again
  # by rerunning the episode).
  done = {key: t for key, t in latest_traces(traces_path, e.k).items()
          if t["status"] not in INFRA_STATUSES and t["answers"] == golds.get(key[:2])
          and (not e.judge or "judge" in t["metrics"])}
  for key, asked, what in (("sampling", sampling_of(agent_cfg), "sampled"),
                           ("scoring", scoring, "scored"), ("agent", settings, "run")):
    other = {json.dumps(t.get(key), sort_keys=True) for t in done.values()} - \
        {json.dumps(asked, sort_keys=True), "null"}
    if other:  # a resumed run must not mix episodes sampled or scored otherwise into one score
      was = json.loads(sorted(other)[0])
      if key == "agent":  # a long section: name what differs
        diff = sorted(k for k in set(was) | set(asked) if was.get(k) != asked.get(k))
        was = {k: was.get(k) for k in diff}
        asked = {k: asked.get(k) for k in diff}
      raise DataError(f"{traces_path} holds episodes {what} with {json.dumps(was)}, this run "
                      f"asks {json.dumps(asked)}: use another eval.out_dir")
  work = [(ds, it, i) for ds, it in items for i in range(e.k) if (ds, it.qid, i) not in done]
  if done:
    echo(f"resuming: {len(done)} episodes already in {traces_path}, {len(work)} to run")
  own_policy, own_tools = policy is None, tools is None
  policy = policy or build_policy(cfg)
  tools = tools or make_client(cfg.search, cfg.web)
  agent = Agent(agent_cfg, policy, tools)
  scorer = Scorer(cfg.reward)
  sem, lock = asyncio.Semaphore(e.concurrency), asyncio.Lock()
  bar = tqdm(total=len(work), desc="eval", unit="episode", disable=not progress)
  answered = 0

  async def one(ds: str, item: QAItem, sample: int) -> None:
    nonlocal answered
    async with sem:
      try:
        traj = await agent.run(item, sample=sample, group_id=item.qid,
                               seed=derive_seed(e.seed, item.qid, sample), valid_instruction=True)
        if traj.status not in INFRA_STATUSES:
          await score(traj, scorer, with_judge=True if e.judge else None)
      except Exception as exc:  # noqa: BLE001 -- one episode's failure is reported, not fatal
        traj = Trajectory(qid=item.qid, question=item.question, answers=list(item.answers),
                          sample=sample, status="aborted", error=f"{type(exc).__name__}: {exc}")
    async with lock:  # the record first: once its trace line is down, the episode is done
      if e.save_trajectories:
        write_jsonl(os.path.join(out_dir, "trajectories.jsonl"), [traj])
      append_lines(traces_path, [trace_line(ds, traj, scoring, settings)],
                   encode=lambda r: json.dumps(r, ensure_ascii=False))
      answered += traj.status == "answered"
      bar.update(1)
      bar.set_postfix(answered=f"{answered}/{bar.n}", refresh=False)

  try:
    await asyncio.gather(*(one(*w) for w in work))
  finally:
    bar.close()
    await scorer.close()
    if own_policy:
      await _close(policy)
    if own_tools:
      await tools.close()

  wanted = {(ds, it.qid) for ds, it in items}
  samples = [t for key, t in latest_traces(traces_path, e.k).items() if key[:2] in wanted]
  report = {"k": e.k, "sampling": sampling_of(agent_cfg), "scoring": scoring, "agent": settings,
            "datasets": aggregate(samples, e.k), "skipped_rows": skipped,
            "traces": traces_path, "problems": problems(samples)}
  write_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2))
  echo(f"scoring: {scoring_line(scoring)}")
  echo(format_table(report["datasets"], e.k))
  for p in report["problems"]:
    echo(f"warning: {p}")
  if skipped:
    echo(f"warning: {skipped} dataset rows skipped (see the loader summaries above)")
  echo(f"report: {os.path.join(out_dir, 'report.json')}; traces: {traces_path}")
  return report


def problems(samples: list[dict[str, Any]]) -> list[str]:
  """What went wrong with the infrastructure, counted, with the first message of each kind."""
  out = []
  for status, what in (("aborted", "aborted"),
                       ("env_error", "ended by a failing tool server or judge")):
    ended = [s for s in samples if s["status"] == status]
    if ended:
      out.append(f"{len(ended)} episodes {what} (rerun to retry them): {ended[0]['error']}")
  tool = [s for s in samples if s["status"] == "tool_error"]
  if tool:
    out.append(f"{len(tool)} episodes ended on repeated tool errors: {tool[0]['error']}")
  calls = sum(s.get("tool_errors", 0) for s in samples)
  if calls:
    out.append(f"{calls} tool calls failed")
  judge = [s for s in samples if s.get("error") and str(s["error"]).startswith("judge:")]
  if judge:
    out.append(f"{len(judge)} episodes could not be judged: {judge[0]['error']}")
  return out
