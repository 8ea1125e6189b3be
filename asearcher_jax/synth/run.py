"""`asearcher synth`: seeds in, hard verified QA out, resumable.

Outputs in `synth.out_dir`:
  seeds.jsonl  the journal: one record per finished seed (every round, action and verdict),
               appended and fsynced as each seed ends, so a crash loses only seeds in flight
               and a rerun with the same out_dir skips finished seeds. A seed whose endpoint
               stopped answering is journaled `aborted` and retried by the next run.
  qa.jsonl     the kept variants in ASearcher JSONL (question, answer, aug_answer, source,
               qid) with their provenance (seed, actions, supporting facts, verdicts), rebuilt
               at the end of each run from every seed done in the journal (this run's seeds
               first, in order; then those of earlier runs), so a rerun with fewer or other
               seeds loses nothing; a seed rerun after an edit replaces what it gave before.
  report.json  the statistics of this run's seeds (also printed), and `qa_items`, the rows
               of qa.jsonl.

A seed is done when the journal's latest record for its id is done and holds the same seed
content (question, answers, facts, pages), wherever its file is.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import TYPE_CHECKING, Any

from asearcher_jax.errors import ConfigError, DataError
from asearcher_jax.jsonl import append_lines, read_lines, write_atomic
from asearcher_jax.synth.agent import SeedAgent
from asearcher_jax.synth.llm import SynthLLM
from asearcher_jax.synth.pages import PageSource
from asearcher_jax.synth.report import format_table, summarize
from asearcher_jax.synth.seeds import Seed, load_seeds
from asearcher_jax.synth.state import LLMUnavailable
from asearcher_jax.synth.verify import Verifier

if TYPE_CHECKING:  # annotations only: config.py assembles every section, above this module
  from asearcher_jax.config import Config


def qa_row(record: dict, i: int, v: dict, source: str) -> dict[str, Any]:
  """One kept variant as an ASearcher JSONL row; loaders keep the provenance in `extra`."""
  seed = record["seed"]
  return {"question": v["question"], "answer": v["answers"], "aug_answer": v["aug_answers"],
          "source": source, "qid": f"synth-{record['seed_id']}-{i}",
          "injections": v["injections"], "fuzzes": v["fuzzes"],
          "supporting_facts": v["facts"], "actions": v["actions"], "verification": v["verdict"],
          "seed": {k: seed[k] for k in ("seed_id", "kind", "question", "answers", "origin")}}


def _dumps(row: Any) -> str:
  return json.dumps(row, ensure_ascii=False)


def _latest(journal: str) -> dict[str, dict]:
  """Seed id -> its latest journal record; a row that is no seed record is a clear error (an
  out_dir holding another tool's seeds.jsonl), not a KeyError."""
  latest = {}
  for n, r in enumerate(read_lines(journal), 1):
    if not isinstance(r, dict) or not isinstance(r.get("seed_id"), str) or "status" not in r:
      raise DataError(f"{journal}: record {n} is not a synth seed record (no seed_id or "
                      "status); is synth.out_dir another tool's output directory?")
    latest[r["seed_id"]] = r
  return latest


async def synthesize(cfg: Config, *, progress: bool = True, echo=print) -> dict[str, Any]:
  """Runs what `cfg.synth` asks; returns the report (also in report.json)."""
  from tqdm.auto import tqdm

  s = cfg.synth
  t0 = time.monotonic()
  out_dir = s.out_dir or os.path.join(cfg.run.output_dir, "synth")
  pages, world_dir = PageSource.from_config(s, cfg.world)
  try:
    world = None
    if s.verifier == "world":
      if world_dir is None:
        raise ConfigError("synth.verifier=world checks facts against a world's entities: use "
                          "synth.world_dir (or the default world), not synth.pages")
      from asearcher_jax.synth.world_check import WorldFacts
      from asearcher_jax.world import load_world
      world = WorldFacts(load_world(world_dir))
    seeds, dropped = load_seeds(s, pages, echo)
    if not seeds and not dropped:
      raise DataError("synth: no seeds; set synth.seeds (QA files), synth.seed_pages or "
                      "synth.random_pages")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
      raise ConfigError(f"synth.out_dir {out_dir} is a file, not a directory")
    os.makedirs(out_dir, exist_ok=True)
    journal = os.path.join(out_dir, "seeds.jsonl")
    latest = _latest(journal)

    def done(sd: Seed) -> bool:  # and by this very seed: an edited seed file reuses its ids
      r = latest.get(sd.seed_id, {})
      seed = dict(r.get("seed") or {})
      seed.pop("origin", None)
      return r.get("status") == "done" and seed == sd.content()

    work = [sd for sd in seeds if not done(sd)]
    changed = sum(sd.seed_id in latest and latest[sd.seed_id].get("status") == "done"
                  for sd in work)
    if len(work) < len(seeds) or changed:
      echo(f"resuming: {len(seeds) - len(work)} seeds already done in {journal}, "
           f"{len(work)} to run" + (f" ({changed} changed since they were done)"
                                    if changed else ""))
    for reason, n in dropped.items():
      echo(f"warning: {n} seeds dropped ({reason})")
    llm = SynthLLM(s)
    judge = None
    if s.answer_check == "judge":
      from asearcher_jax.reward.judge import Judge
      judge = Judge(cfg.reward.judge, seed=s.seed)
    agent = SeedAgent(s, llm, pages, Verifier(s, llm, pages, world, judge))
    sem, lock = asyncio.Semaphore(s.concurrency), asyncio.Lock()
    bar = tqdm(total=len(work), desc="synth", unit="seed", disable=not progress)
    kept = 0

    async def one(seed: Seed) -> None:
      nonlocal kept
      async with sem:
        try:
          record = await agent.run(seed)
        except Exception as e:  # noqa: BLE001 -- one seed's failure is journaled, not fatal
          kind = "" if isinstance(e, LLMUnavailable) else f"{type(e).__name__}: "
          record = {"seed_id": seed.seed_id, "status": "aborted", "seed": seed.to_dict(),
                    "error": f"{kind}{e}"}
      async with lock:
        append_lines(journal, [record], encode=_dumps)
        latest[seed.seed_id] = record
        kept += len(record.get("variants", ()))
        bar.update(1)
        bar.set_postfix(kept=kept, refresh=False)

    try:
      await asyncio.gather(*(one(sd) for sd in work))
    finally:
      bar.close()
      await llm.close()
      if judge is not None:
        await judge.close()

    records = [latest[sd.seed_id] for sd in seeds if sd.seed_id in latest]
    ours = {sd.seed_id for sd in seeds}
    journaled = records + [r for i, r in latest.items() if i not in ours]
    rows = [qa_row(r, i, v, s.source_name) for r in journaled if r["status"] == "done"
            for i, v in enumerate(r["variants"])]
    qa_path = os.path.join(out_dir, "qa.jsonl")
    write_atomic(qa_path, "".join(_dumps(row) + "\n" for row in rows))
    report = summarize(records, dropped)
    report.update(qa_items=len(rows), llm_requests=llm.requests,
                  wall_s=round(time.monotonic() - t0, 2), qa=qa_path, journal=journal)
    write_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2) + "\n")
    echo(format_table(report))
    echo(f"qa: {qa_path} ({len(rows)} items); journal: {journal}; report: "
         f"{os.path.join(out_dir, 'report.json')}")
    return report
  finally:
    pages.close()
