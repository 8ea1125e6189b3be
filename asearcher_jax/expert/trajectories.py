"""`asearcher world solve`: the expert solver over a world's questions, through the real agent
loop and a real retrieval server, writing scored trajectories for `asearcher sft`."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
from typing import TYPE_CHECKING, Any

from asearcher_jax.agent import Agent, score, write_jsonl
from asearcher_jax.agent.trajectory import INFRA_STATUSES
from asearcher_jax.data.qa import load_qa
from asearcher_jax.errors import DataError
from asearcher_jax.expert.policy import WorldSolver
from asearcher_jax.jsonl import read_lines, write_atomic
from asearcher_jax.reward import Scorer
from asearcher_jax.world.io import world_index

if TYPE_CHECKING:  # annotations only: config.py assembles every section, above this module
  from asearcher_jax.config import Config


async def solve_items(cfg: Config, items, tokenizer, tools, *, concurrency: int = 16,
                      progress: bool = True) -> list:
  """Scored trajectories of the solver on `items` (QAItems), in order; closes `tools`."""
  from tqdm.auto import tqdm
  solver = WorldSolver(tokenizer, [it.question for it in items])
  agent = Agent(cfg.agent, solver, tools)
  scorer = Scorer(cfg.reward)
  sem = asyncio.Semaphore(concurrency)
  bar = tqdm(total=len(items), desc="solve", unit="question", disable=not progress)

  async def one(i, item):
    async with sem:
      traj = await agent.run(item, group_id=item.qid, seed=i)
      if traj.status not in INFRA_STATUSES:  # a server's failure is not the expert's answer
        await score(traj, scorer)
      bar.update(1)
      return traj

  try:
    return await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))
  finally:
    bar.close()
    await scorer.close()
    await tools.close()


def summary(trajectories) -> dict[str, Any]:
  n = max(1, len(trajectories))
  calls = collections.Counter(t.action for traj in trajectories for t in traj.turns)
  return {
      "questions": len(trajectories),
      "solved": sum(t.reward >= 1.0 for t in trajectories) / n,
      "turns": sum(len(t.turns) for t in trajectories) / n,
      "search_calls": calls["search"] / n,
      "access_calls": calls["access"] / n,
      "statuses": dict(collections.Counter(t.status for t in trajectories)),
  }


def solve_command(cfg: Config, *, world_dir: str, split: str, out: str, limit: int | None,
                  keep: str, concurrency: int, seed: int = 0, progress: bool = True,
                  rest: str | None = None, echo=print) -> dict:
  """Solves a split of the world and writes trajectories (all, or only `keep=solved` ones, the
  SFT data) to `out`; returns the summary. With `limit`, `rest` receives the split's questions
  left out of the sample, as the split's own lines: RL data that SFT never saw."""
  from asearcher_jax.models.tokenizer import policy_tokenizer
  from asearcher_jax.tools.client import LocalSearchClient
  from asearcher_jax.tools.retrieval_server import serve_index
  qa_path = os.path.join(world_dir, f"qa_{split}.jsonl")
  items = load_qa(qa_path).items
  if limit is not None and limit < len(items):  # the files are sorted by hops: sample them
    items = random.Random(seed).sample(items, limit)
  rest_count = _write_rest(qa_path, {it.qid for it in items}, rest) if rest else 0
  tokenizer = policy_tokenizer(cfg.model)
  server = serve_index(world_index(world_dir, log=lambda *_: None), cfg.retrieval)
  try:
    tools = LocalSearchClient(cfg.search.model_copy(update={"url": server.url}))
    trajectories = asyncio.run(solve_items(cfg, items, tokenizer, tools,
                                           concurrency=concurrency, progress=progress))
  finally:
    server.stop()
  # Never an episode the infrastructure ended: SFT would learn a failing server's transcript.
  kept = [t for t in trajectories if t.status not in INFRA_STATUSES
          and (keep == "all" or t.reward >= 1.0)]
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = f"{out}.tmp-{os.getpid()}"
  write_jsonl(tmp, kept)
  os.replace(tmp, out)  # a file that exists is whole: reruns may skip this stage
  stats = summary(trajectories)
  if rest:
    echo(f"{rest_count} {split} questions left out of the sample: {rest}")
  echo(f"solved {stats['solved']:.1%} of {stats['questions']} {split} questions; "
       f"{stats['turns']:.2f} turns, {stats['search_calls']:.2f} searches and "
       f"{stats['access_calls']:.2f} page opens per episode; statuses {stats['statuses']}; "
       f"wrote {len(kept)} trajectories to {out}")
  return stats


def _write_rest(qa_path: str, chosen: set[str], out: str) -> int:
  rows = [r for r in read_lines(qa_path) if r["qid"] not in chosen]
  if not rows:
    raise DataError(f"--rest {out}: the sample takes every question of {qa_path}")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
  return len(rows)
