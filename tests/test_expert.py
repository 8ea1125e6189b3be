"""The world's expert solver: question parsing, fact reading, and whole episodes through the
real agent loop and retrieval server whose records are valid and earn full reward; the
world tokenizer trained for the debug policy."""

import asyncio
import dataclasses
import os

import pytest

from asearcher_jax.agent import AgentSection, parse_action
from asearcher_jax.agent.tokenizer import train_tokenizer
from asearcher_jax.config import load_config
from asearcher_jax.data.qa import load_qa
from asearcher_jax.errors import DataError
from asearcher_jax.expert.policy import find_fact, parse_question
from asearcher_jax.expert.trajectories import solve_command, solve_items, summary, world_index
from asearcher_jax.jsonl import read_lines
from asearcher_jax.tools.client import LocalSearchClient
from asearcher_jax.tools.index import SearchIndex
from asearcher_jax.tools.retrieval_server import ServerThread, create_app
from asearcher_jax.tools.types import ToolResult
from asearcher_jax.world import WorldConfig, generate_world, write_world

SMALL = {"num_people": 60, "num_cities": 14, "num_countries": 4, "num_orgs": 12,
         "num_works": 12, "questions_per_hop": 12}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("solver") / "world")
  w = generate_world(WorldConfig(seed=3, max_hops=5, **SMALL))
  write_world(w, path)
  world_index(path)
  return w, path


@pytest.fixture(scope="module")
def tokenizer(world):
  return train_tokenizer([world[1]], 1024)


def test_every_world_question_parses_to_its_chain(world):
  w, _ = world
  for item in w.qa_train + w.qa_test:
    plan = parse_question(item["question"])
    assert plan is not None, item["question"]
    assert plan.start == w.entities[item["start"]].name
    assert len(plan.hops) == item["hops"]
    for keys, step in zip(plan.hops, item["chain"]):
      assert step["relation"] in keys
  assert parse_question("What is the airspeed of an unladen swallow?") is None


def test_find_fact_reads_exactly_the_subject_and_the_most_specific_fact():
  text = ('"Alen Varrow"\nAlen Varrow was born in Kelport. Alen Varro was born in the year 1931.\n'
          "Alen Varro was born in Marholm. Sela is a city in Dorland. Sela is a city in this "
          "world. The Glass Tide is a ballet. Bo Ren is a poet by profession.")
  assert find_fact(text, "Alen Varro", ("born_in",)) == ("Marholm",
                                                         "Alen Varro was born in Marholm.")
  assert find_fact(text, "Alen Varro", ("birth_year",))[0] == "1931"
  assert find_fact(text, "Alen Varrow", ("born_in",))[0] == "Kelport"
  assert find_fact(text, "Sela", ("country",))[0] == "Dorland"
  # "X is a Y." is a genre only when no more specific fact (city in, profession) reads it.
  assert find_fact(text, "Sela", ("genre",)) is None
  assert find_fact(text, "Bo Ren", ("genre",)) is None
  assert find_fact(text, "Bo Ren", ("occupation",))[0] == "poet"
  assert find_fact(text, "The Glass Tide", ("genre",))[0] == "ballet"
  assert find_fact(text, "Ren", ("occupation",)) is None  # not a name's tail


def _cfg(**agent):
  cfg = load_config("configs/debug.yaml")
  return cfg.model_copy(update={"agent": AgentSection(**{**cfg.agent.model_dump(), **agent})})


def _solve(world, tokenizer, items, wrap=lambda tools: tools, **agent):
  """The solver through the agent against a real retrieval server over the world."""
  cfg = _cfg(**agent)
  with ServerThread(create_app(SearchIndex(os.path.join(world[1], "index")))) as srv:
    tools = wrap(LocalSearchClient(cfg.search.model_copy(update={"url": srv.url})))
    return asyncio.run(solve_items(cfg, items, tokenizer, tools, progress=False))


def test_solver_trajectories_are_valid_and_earn_full_reward(world, tokenizer):
  _, path = world
  items = load_qa(os.path.join(path, "qa_test.jsonl")).items
  trajs = _solve(world, tokenizer, items, max_context_tokens=2048)  # up to 5 hops here
  stats = summary(trajs)
  assert stats["solved"] == 1.0, stats
  assert {t.status for t in trajs} == {"answered"}
  for traj, item in zip(trajs, items):
    traj.check()
    assert traj.reward == 1.0 and traj.format_ok
    assert traj.prediction == item.answers[0]
    # Each turn's sampled text is exactly the recorded tokens; each generation (a call and
    # the calls continuing it past the token budget) parses to the recorded call.
    policy_texts = [m["text"] for m in traj.transcript if m["role"] == "policy"]
    assert len(policy_texts) == len(traj.turns)
    for turn, text in zip(traj.turns, policy_texts):
      assert tokenizer.decode(traj.tokens[turn.start:turn.end]) == text
      assert all(traj.loss_mask[turn.start:turn.end])
    calls = [(t.action, t.argument) for t in traj.turns if t.action != "none"]
    assert [(a.kind, a.argument) for a in map(parse_action, traj.generations())] == calls
    # One search per hop (a second where the question fits two kinds of entity: "In what year
    # was X founded?" asks a city's "founded in" or an organisation's "established in"), then
    # the answer.
    hops = parse_question(item.question).hops
    kinds = [kind for kind, _ in calls]
    assert kinds[-1] == "answer" and set(kinds[:-1]) == {"search"}
    assert len(hops) <= len(kinds) - 1 <= sum(map(len, hops))


def test_solver_searches_again_when_the_question_fits_two_kinds_of_entity(tmp_path, tokenizer):
  """"In what year was X founded?" asks a city's founding or an organisation's establishment;
  with one fact per passage and one hit per search, the expert searches again with the other
  fact's words rather than opening the page."""
  from asearcher_jax.data.qa import QAItem
  w = generate_world(WorldConfig(seed=3, max_hops=2, max_facts_per_passage=1, **SMALL))
  path = str(tmp_path / "world")
  write_world(w, path)
  world_index(path)
  items = [QAItem(e.eid, f"In what year was {e.name} founded?", (str(e.attrs[f"{kind}_founded"]),))
           for kind in ("org", "city") for e in w.entities.values() if e.kind == kind][::5]
  trajs = _solve((w, path), tokenizer, items, topk=1)
  for traj in trajs:
    traj.check()
    assert traj.reward == 1.0
    queries = [t.argument for t in traj.turns if t.action == "search"]
    if w.entities[traj.qid].kind == "org":
      assert len(queries) == 2 and queries[1].endswith("established in"), queries
    else:
      assert len(queries) == 1 and queries[0].endswith("founded in"), queries
    assert [(a.kind, a.argument) for a in map(parse_action, traj.generations())] == \
        [(t.action, t.argument) for t in traj.turns if t.action != "none"]


def test_a_call_cut_by_the_token_budget_is_continued_by_the_next(tokenizer):
  from asearcher_jax.agent.policy import Prompt
  from asearcher_jax.expert.policy import WorldSolver
  from asearcher_jax.inference.protocol import SamplingParams
  q = "Who is the mayor of the birthplace of Alen Varro?"
  solver = WorldSolver(tokenizer, [q])
  prompt = Prompt(tokenizer.encode(q), q)

  async def go(budget):
    return await solver.complete(prompt, SamplingParams(max_new_tokens=budget,
                                                        stop=("</search>",)), "s")
  first = asyncio.run(go(6))
  assert first.finish_reason == "length" and len(first.ids) == 6
  rest = asyncio.run(go(100))
  assert rest.finish_reason == "stop"
  # Nothing fits 6 tokens: the shortest thought (none), then the rest of the call.
  assert first.text + rest.text == "</think>\n<search> Alen Varro born in </search>"


class HidesFacts:
  """A search tool that never returns a passage stating a fact (page access still works), so
  the solver must open the entity's page and read it."""

  def __init__(self, inner):
    self.inner, self.cfg = inner, inner.cfg

  async def search(self, queries, topk=None):
    return [ToolResult(r.tool, r.query, hits=tuple(
        dataclasses.replace(h, contents=f'"{h.title}"\n(summary withheld)') for h in r.hits))
        for r in await self.inner.search(queries, topk)]

  async def access(self, url):
    return await self.inner.access(url)

  async def close(self):
    await self.inner.close()


def test_solver_opens_and_reads_the_page_when_search_hides_the_fact(world, tokenizer):
  _, path = world
  items = [it for it in load_qa(os.path.join(path, "qa_train.jsonl")).items][:6]
  trajs = _solve(world, tokenizer, items, wrap=HidesFacts, max_context_tokens=4096,
                 max_turns=40)
  for traj in trajs:
    traj.check()
    assert traj.reward == 1.0, [m["text"][:200] for m in traj.transcript]
    kinds = [t.action for t in traj.turns]
    assert "access" in kinds
    assert any(t.kind == "read" for t in traj.turns)


def test_world_tokenizer_has_the_requested_size_and_compresses_the_prompt(world, tokenizer):
  from asearcher_jax.agent.prompts import render
  from asearcher_jax.models import build_tokenizer
  assert tokenizer.vocab_size == 1024
  assert tokenizer.decode(tokenizer.encode("<|im_end|>")) == "<|im_end|>"
  assert tokenizer.eos_id == 1023
  prompt = render("compact", question="Who founded Marval Works?")
  assert len(tokenizer.encode(prompt)) < len(build_tokenizer().encode(prompt)) / 3
  with pytest.raises(DataError, match="no room"):
    train_tokenizer([world[1]], 200)
  with pytest.raises(DataError, match="no such file"):
    train_tokenizer(["/nonexistent/world"], 1024)


def test_solve_refuses_a_rest_that_the_sample_leaves_empty(world, tmp_path):
  """`world solve --rest` gives RL the questions SFT left; a sample of all of them leaves none."""
  rest = tmp_path / "rest.jsonl"
  with pytest.raises(DataError, match="takes every question"):
    solve_command(_cfg(), world_dir=world[1], split="train", out=str(tmp_path / "expert.jsonl"),
                  limit=None, keep="solved", concurrency=1, rest=str(rest))
  assert not rest.exists() and not (tmp_path / "expert.jsonl").exists()


def test_solve_writes_rest_into_a_new_directory_and_refuses_no_concurrency(world, tmp_path,
                                                                          capsys):
  from asearcher_jax.cli import main
  from asearcher_jax.expert.trajectories import _write_rest
  qa = os.path.join(world[1], "qa_train.jsonl")
  out = tmp_path / "new" / "rest.jsonl"
  assert _write_rest(qa, set(), str(out)) == len(read_lines(qa)) == len(read_lines(str(out)))
  # A semaphore of 0 never let an episode start: the command hung for good.
  for flags in (["--concurrency", "0"], ["--limit", "-1"]):
    assert main(["world", "solve", "--world", world[1], "--out", str(tmp_path / "x.jsonl"),
                 *flags]) == 2
    assert "--concurrency and --limit must be at least 1" in capsys.readouterr().err


def test_episodes_a_failing_server_ended_are_neither_scored_nor_kept(world, tokenizer):
  """`world solve --keep all` wrote them for SFT, which then learned a failing server's
  transcript as the expert's."""
  class Down:
    def __init__(self, tools):
      self.tools, self.cfg = tools, tools.cfg

    async def search(self, queries, topk=None):
      return [ToolResult.failure("search", q, "timeout", "no reply") for q in queries]

    async def access(self, url):
      return ToolResult.failure("access", url, "timeout", "no reply")

    async def close(self):
      await self.tools.close()
  items = load_qa(os.path.join(world[1], "qa_test.jsonl")).items[:2]
  trajs = _solve(world, tokenizer, items, wrap=Down, max_tool_errors=1)
  assert {t.status for t in trajs} == {"env_error"}
  assert all(t.metrics == {} for t in trajs)  # never scored
