"""The agent end to end on loopback: a real retrieval server over a generated world and a real
decode server whose tiny policy was briefly trained (SFT) on expert trajectories, so greedy
decoding replays them deterministically. Then `evaluate` over the same questions, resumed."""

import asyncio
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import single_device_mesh, tiny_config
from flax import nnx

from asearcher_jax.agent import Agent, AgentSection, Completion, DecodePolicy, OpenAIPolicy, score
from asearcher_jax.config import Config
from asearcher_jax.data import QAItem
from asearcher_jax.eval import evaluate
from asearcher_jax.inference import Driver, Engine
from asearcher_jax.inference.client import DecodeClient
from asearcher_jax.inference.server import DecodeServer
from asearcher_jax.models import build_tokenizer, create_model
from asearcher_jax.reward import RewardSection, Scorer
from asearcher_jax.tools.client import LocalSearchClient
from asearcher_jax.tools.config import SearchClientSection
from asearcher_jax.tools.index import SearchIndex, build_index
from asearcher_jax.tools.retrieval_server import ServerThread, create_app
from asearcher_jax.train.config import OptimizerSection
from asearcher_jax.train.lm import PackedBatch, make_sft_step
from asearcher_jax.train.optimizer import make_optimizer
from asearcher_jax.train.packing import pack_sequences
from asearcher_jax.world import WorldConfig, generate_world, write_world

pytestmark = pytest.mark.e2e

MESH = single_device_mesh()
ARCH = tiny_config("qwen3", vocab_size=300, eos_token_id=258, hidden_size=128,
                   intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
VERSION = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("agent") / "w")
  write_world(generate_world(WorldConfig(seed=5, num_people=40, num_cities=10, num_orgs=8,
                                         num_works=8, num_countries=3, questions_per_hop=10)),
              path)
  build_index(os.path.join(path, "corpus.jsonl"), os.path.join(path, "index"),
              pages=os.path.join(path, "pages.jsonl"), log=lambda *_: None)
  with open(os.path.join(path, "corpus.jsonl")) as f:
    url_of = {d["id"]: d["url"] for d in map(json.loads, f)}
  with open(os.path.join(path, "qa_train.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if r["hops"] == 1][:2]
  items = [QAItem(r["qid"], r["question"], (r["answer"],), source="world") for r in rows]
  urls = {r["qid"]: url_of[r["supporting_facts"][0]] for r in rows}
  with ServerThread(create_app(SearchIndex(os.path.join(path, "index")))) as srv:
    yield items, urls, f"http://127.0.0.1:{srv.port}", path


def agent_cfg(tmp_path_factory):
  prompt = tmp_path_factory.getbasetemp() / "prompt.txt"
  prompt.write_text("Question: ${question}\n<think>\n")
  return AgentSection(prompt=str(prompt), max_turns=8, max_new_tokens=96,
                      max_context_tokens=2000, temperature=0.0, stub_chars=24)


def search_cfg(url):
  return SearchClientSection(url=url, topk=2, chunk_chars=200, max_chunks=2)


class Spy:
  """Wraps a policy and keeps every prompt and completion it passed on."""

  def __init__(self, inner):
    self.inner, self.tokenizer, self.chat = inner, inner.tokenizer, False
    self.calls: list[tuple[list[int], Completion]] = []

  async def complete(self, prompt, sampling, session_id=None):
    c = await self.inner.complete(prompt, sampling, session_id)
    self.calls.append((list(prompt.ids), c))
    return c

  async def end_session(self, session_id):
    await self.inner.end_session(session_id)


class Expert:
  """The scripted expert: search the question, open the supporting page, read it, answer."""

  chat = False

  def __init__(self, tokenizer, items, urls):
    self.tokenizer = tokenizer
    self.script = {it.question: [f"<search> {it.question} </search>",
                                 f"<access> {urls[it.qid]} </access>",
                                 "noted.</think>", "noted.</think>",
                                 f"<answer> {it.answers[0]} </answer>"] for it in items}
    self.turn: dict[str, int] = {}

  async def complete(self, prompt, sampling, session_id=None):
    question = next(q for q in self.script if q in prompt.text)
    i = self.turn.get(session_id, 0)
    self.turn[session_id] = i + 1
    text = self.script[question][i]
    ids = self.tokenizer.encode(text)
    return Completion(text, ids, [0.0] * len(ids), [0] * len(ids), "stop", False, len(prompt.ids))

  async def end_session(self, session_id):
    pass


def run_agent(cfg, policy, url, items):
  async def go():
    tools = LocalSearchClient(search_cfg(url))
    try:
      agent = Agent(cfg, policy, tools)
      return [await agent.run(it, seed=0) for it in items]
    finally:
      await tools.close()
  return asyncio.run(go())


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
  """A tiny policy trained on the expert's trajectories until greedy decoding replays them."""
  items, urls, url, _ = world
  tok = build_tokenizer()
  cfg = agent_cfg(tmp_path_factory)
  experts = run_agent(cfg, Expert(tok, items, urls), url, items)
  assert [t.status for t in experts] == ["answered", "answered"]
  seqs = [{"tokens": t.tokens[s], "loss_mask": t.loss_mask[s]} for t in experts
          for s in t.sequences()]
  row_len = -(-max(len(s["tokens"]) for s in seqs) // 128) * 128
  rows, _ = pack_sequences(seqs, row_len)
  batch = PackedBatch(tokens=jnp.asarray(rows["tokens"]), positions=jnp.asarray(rows["positions"]),
                      segment_ids=jnp.asarray(rows["segment_ids"]),
                      loss_mask=jnp.asarray(rows["loss_mask"]))
  model = create_model(ARCH, MESH, seed=0, dtype="float32")
  params, opt_state, step = make_sft_step(model, make_optimizer(OptimizerSection(
      learning_rate=3e-3, weight_decay=0.0, grad_clip=1.0)))
  for i in range(400):
    params, opt_state, metrics = step(params, opt_state, batch)
    if float(metrics["loss"]) < 2e-3:
      break
  nnx.update(model, params)
  return model, tok, cfg, experts


@pytest.fixture(scope="module")
def decode_server(trained):
  model, tok, _, _ = trained
  driver = Driver(Engine(model, slots=2, max_len=2048, mesh=MESH), version=VERSION, tokenizer=tok)
  srv = DecodeServer(driver, tok, grpc_port=0, http_port=0,
                     default_stop_ids=(tok.eos_id,)).start_in_thread()
  yield srv
  srv.stop_thread()


def test_agent_replays_the_expert_and_the_record_is_exact(world, trained, decode_server):
  items, urls, url, _ = world
  _, tok, cfg, experts = trained

  async def go():
    async with DecodeClient(decode_server.grpc_address, timeout=120) as client:
      spy = Spy(DecodePolicy(client, tok))
      tools = LocalSearchClient(search_cfg(url))
      try:
        traj = await Agent(cfg, spy, tools).run(items[0], seed=0)
        return traj, spy.calls
      finally:
        await tools.close()

  traj, calls = asyncio.run(go())
  traj.check()
  # The trained policy does what the expert did, turn for turn.
  assert traj.status == "answered" and traj.prediction == items[0].answers[0]
  assert [t.action for t in traj.turns] == ["search", "access", "none", "none", "answer"]
  assert [t.kind for t in traj.turns] == ["act", "act", "read", "read", "act"]
  assert traj.tool_calls() == 2 and all(t.tool_ok for t in traj.turns[:2])
  scored = asyncio.run(score(traj, Scorer(RewardSection(metric="em"))))
  assert scored.reward == 1.0 and scored.metrics["em"] == 1.0

  seq_of = np.searchsorted(traj.seq_starts, np.arange(len(traj.tokens)), side="right") - 1
  for turn, (prompt, c) in zip(traj.turns, calls):
    # The sampled tokens are exactly the engine's, with its log-probs and its version.
    np.testing.assert_array_equal(traj.tokens[turn.start:turn.end], c.ids)
    np.testing.assert_array_equal(traj.behav_logp[turn.start:turn.end],
                                  np.asarray(c.logprobs, np.float32))
    assert (traj.version[turn.start:turn.end] == VERSION).all()
    assert traj.loss_mask[turn.start:turn.end].all()
    # What precedes them in their sequence is exactly the prompt the engine was sent.
    seq_start = traj.seq_starts[seq_of[turn.start]]
    np.testing.assert_array_equal(traj.tokens[seq_start:turn.start], prompt)
  # Everything not sampled is prompt, template or tool text: mask 0, version -1, and it
  # decodes to the prompt or to <information> blocks.
  outside = ~traj.loss_mask
  assert (traj.version[outside] == -1).all() and (traj.behav_logp[outside] == 0).all()
  for (p0, c0), (p1, _) in zip(calls, calls[1:]):
    if p1[:len(p0) + len(c0.ids)] == p0 + c0.ids and len(p1) > len(p0) + len(c0.ids):
      between = tok.decode(p1[len(p0) + len(c0.ids):])
      assert between.startswith("\n\n<information>\n")
      assert between.endswith("</information>\n<think>\n")

  # Page stubs: each chunk is in the prompt of its reading turn, and replaced by its stub
  # (a new sequence) in every later prompt.
  chunk1 = tok.decode(calls[2][0]).split("<information>\n")[-1].split("\n</information>")[0]
  assert len(chunk1) > cfg.stub_chars + 20
  later = tok.decode(calls[3][0])
  marker, _, body = chunk1.partition(">>>> Page 1 >>>>\n")
  assert body not in later
  assert marker + ">>>> Page 1 >>>>\n" + body[:cfg.stub_chars].rstrip() + " ... (read)" in later
  assert len(traj.seq_starts) == 3  # one new sequence after each read chunk is stubbed
  assert traj.loss_tokens == sum(len(c.ids) for _, c in calls)


def test_eval_reports_and_resumes(world, trained, decode_server, tmp_path):
  items, urls, url, world_dir = world
  _, tok, agent, _ = trained
  data = tmp_path / "qa.jsonl"
  data.write_text("".join(json.dumps({"qid": it.qid, "question": it.question,
                                      "answer": list(it.answers)}) + "\n" for it in items)
                  + '{"qid": "broken", "answer": ["x"]}\n')
  cfg = Config(model={"arch": ARCH}, agent=agent, search=search_cfg(url),
               eval={"data": [str(data)], "k": 2, "out_dir": str(tmp_path / "out"),
                     "concurrency": 2, "seed": 1})
  calls = []

  def run_eval():
    async def go():
      async with DecodeClient(decode_server.grpc_address, timeout=120) as client:
        spy = Spy(DecodePolicy(client, tok))
        report = await evaluate(cfg, policy=spy, progress=False, echo=lambda *_: None)
        calls.append(len(spy.calls))
        return report
    return asyncio.run(go())

  report = run_eval()
  ds = report["datasets"]["qa"]  # a file without a source field: its name
  assert ds["questions"] == 2 and ds["samples"] == 4 and report["skipped_rows"] == 1
  assert ds["metrics"]["em"] == {"avg@2": 1.0, "pass@2": 1.0, "questions": 2}
  traces = (tmp_path / "out" / "traces.jsonl").read_text().splitlines()
  assert len(traces) == 4
  first = json.loads(traces[0])
  assert first["status"] == "answered" and first["transcript"][0]["role"] == "prompt"
  # A rerun finds everything done; a torn or missing line is run again.
  assert run_eval()["datasets"] == report["datasets"] and calls[-1] == 0
  (tmp_path / "out" / "traces.jsonl").write_text("\n".join(traces[:3]) + "\n" + traces[3][:20])
  assert run_eval()["datasets"] == report["datasets"] and calls[-1] == 5  # one 5-turn episode
  written = json.loads((tmp_path / "out" / "report.json").read_text())
  assert written["datasets"] == report["datasets"]


def test_the_same_policy_over_the_openai_endpoint(world, trained, decode_server):
  """Text in, text out through our OpenAI-compatible server: stop strings are cut by the server
  and restored by the agent, and the episode matches the token-level one."""
  items, _, url, _ = world
  _, _, cfg, _ = trained
  policy = OpenAIPolicy(decode_server.http_address + "/v1")

  async def go():
    tools = LocalSearchClient(search_cfg(url))
    try:
      return await Agent(cfg, policy, tools).run(items[1], seed=0)
    finally:
      await tools.close()
      await policy.close()

  traj = asyncio.run(go())
  assert traj.status == "answered" and traj.prediction == items[1].answers[0]
  assert [t.action for t in traj.turns] == ["search", "access", "none", "none", "answer"]
  assert len(traj.tokens) == 0 and traj.generations()[0].endswith("</search>")


def test_a_decode_server_that_disappears_aborts_the_episode(world, tmp_path_factory):
  items, _, url, _ = world
  tok = build_tokenizer()
  model = create_model(ARCH, MESH, seed=1, dtype="float32")
  srv = DecodeServer(Driver(Engine(model, slots=1, max_len=1024, mesh=MESH), tokenizer=tok), tok,
                     grpc_port=0, http_port=None).start_in_thread()
  cfg = agent_cfg(tmp_path_factory).model_copy(update={"max_new_tokens": 4, "max_turns": 50})

  class StopsAfterTwoTurns(Spy):
    async def complete(self, prompt, sampling, session_id=None):
      if len(self.calls) == 2:
        srv.stop_thread()
      return await super().complete(prompt, sampling, session_id)

  async def go():
    async with DecodeClient(srv.grpc_address, timeout=30) as client:
      spy = StopsAfterTwoTurns(DecodePolicy(client, tok))
      tools = LocalSearchClient(search_cfg(url))
      try:
        return await Agent(cfg, spy, tools).run(items[0], seed=0), spy
      finally:
        await tools.close()

  traj, spy = asyncio.run(go())
  assert traj.status == "aborted" and "decode server" in traj.error
  assert len(traj.turns) == 2 and len(spy.calls) == 2
  traj.check()
