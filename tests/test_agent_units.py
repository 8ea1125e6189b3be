"""Unit tests of the agent's pieces that need no model: action parsing, the trajectory record,
context construction, stop-string restoration, the OpenAI-compatible policy (against a local
aiohttp server) and the eval report. The agent loop itself is in test_agent_loop.py."""

import asyncio
import contextlib
import json

import numpy as np
import pytest
from aiohttp import web

from asearcher_jax.agent.context import Context
from asearcher_jax.agent.parse import extract_thought, parse_action
from asearcher_jax.agent.policy import (
  ContextTooLong,
  OpenAIPolicy,
  PolicyUnavailable,
  Prompt,
  restore_stop,
)
from asearcher_jax.agent.trajectory import Trajectory, Turn, read_jsonl, write_jsonl
from asearcher_jax.eval.report import (
  aggregate,
  format_comparison,
  format_table,
  incomparable,
  paired_intervals,
)
from asearcher_jax.inference.protocol import SamplingParams
from asearcher_jax.models.tokenizer import build_tokenizer

ACT_STOPS = ("</search>", "</access>", "</answer>")
READ_STOPS = ACT_STOPS + ("</think>",)


@pytest.fixture(scope="module")
def tok():
  return build_tokenizer()


# -- parse_action / extract_thought ----------------------------------------------------------

PARSE_TABLE = [
    # (model output, kind, argument, closed, extra_calls)
    ("<think>plan</think>\n<search> capital of France </search>",
     "search", "capital of France", True, 0),
    ("<access> <https://ex.org/a?b=1> and read it </access>", "access", "https://ex.org/a?b=1",
     True, 0),
    ("<access> \"https://ex.org/a\" please </access>", "access", "https://ex.org/a", True, 0),
    ("<access>'https://ex.org/a'</access>", "access", "https://ex.org/a", True, 0),
    # a title's qualifier keeps its bracket; a bracket around the URL goes
    ("<access> https://en.wikipedia.org/wiki/Mercury_(planet) </access>", "access",
     "https://en.wikipedia.org/wiki/Mercury_(planet)", True, 0),
    ("<access> (https://ex.org/w/A_(b)) </access>", "access", "https://ex.org/w/A_(b)", True, 0),
    ("<access> [https://ex.org/a] </access>", "access", "https://ex.org/a", True, 0),
    ("<answer> Paris </answer>", "answer", "Paris", True, 0),
    ("I am sure now. <answer> Paris, France", "answer", "Paris, France", False, 0),
    ("<answer>   ", "invalid", "", False, 0),  # an open answer with nothing in it
    ("<think>need more</think> <search> who founded", "none", "", False, 0),
    ("<access> https://ex.org/a", "none", "", False, 0),
    ("<search> first </search> <search> second </search>", "search", "first", True, 1),
    ("<search> q </search> then <answer> a </answer>", "search", "q", True, 1),
    ("<answer> Paris </answer> Anything after is ignored, even <search> x </search>",
     "answer", "Paris", True, 1),
    ("<answer> Paris </answer> trailing words", "answer", "Paris", True, 0),
    ("<search>  </search>", "invalid", "", True, 0),
    ("<access>\n</access>", "invalid", "", True, 0),
    ("<answer></answer>", "invalid", "", True, 0),
    ("<search><search> q </search>", "search", "q", True, 0),
    ("<SEARCH> Who Is It </Search>", "search", "Who Is It", True, 0),
    ("<Answer>Paris</ANSWER>", "answer", "Paris", True, 0),
    ("<search >q</search >", "search", "q", True, 0),  # whitespace inside the tag
    ("just thinking aloud, no tags at all", "none", "", True, 0),
    ("", "none", "", True, 0),
    ("stray </search> closing tag", "none", "", True, 0),
    ("stray </search> then <search> real </search>", "search", "real", True, 0),
    ("<search> a <answer> b </answer>", "answer", "b", True, 0),  # the first *complete* call
    ("<search> a </search> <answer> b", "search", "a", True, 0),  # the open answer is not a call
]


@pytest.mark.parametrize("text,kind,argument,closed,extra", PARSE_TABLE,
                         ids=[f"{i}:{row[0][:30]}" for i, row in enumerate(PARSE_TABLE)])
def test_parse_action_table(text, kind, argument, closed, extra):
  a = parse_action(text)
  assert (a.kind, a.argument, a.closed, a.extra_calls) == (kind, argument, closed, extra)
  if kind in ("search", "access", "answer", "invalid"):
    assert a.tool == kind or (kind == "invalid" and a.tool in ("search", "access", "answer"))
    assert 0 <= a.start < a.end <= len(text)
    assert text[a.start:a.start + 1] == "<"  # the span begins at the call's opening tag


def test_parse_action_span_covers_the_call():
  text = "note <search> q1 </search> tail"
  a = parse_action(text)
  assert text[a.start:a.end] == "<search> q1 </search>"
  a = parse_action("x <answer> open to the end")
  assert (a.start, a.end) == (2, len("x <answer> open to the end"))
  a = parse_action("<search><search> q </search>")  # the nearest opening tag starts the call
  assert (a.start, a.end) == (8, 28)


THOUGHT_TABLE = [
    (("<think>hidden <thought>not this</thought></think>\n<thought> the note </thought>"
      "<search> q </search>"), "the note"),
    ("<think>hidden</think> <thought>a</thought> <thought> b </thought>", "b"),
    ("<think>hidden</think>\n<thought> unclosed note", "unclosed note"),
    ("<thought> unclosed note <search> q </search>", "unclosed note"),  # the call is not a note
    ("<thought> closed <search> as text </search> </thought><search> q </search>",
     "closed <search> as text </search>"),
    ("<think>hidden</think> Plain words first. <search> q </search>", "Plain words first."),
    ("<THOUGHT> upper </THOUGHT><answer> x </answer>", "upper"),
    ("<think>only hidden reasoning</think><answer> x </answer>", ""),
    ("no tags at all", "no tags at all"),
]


@pytest.mark.parametrize("text,note", THOUGHT_TABLE)
def test_extract_thought_table(text, note):
  assert extract_thought(text) == note


# -- Trajectory ------------------------------------------------------------------------------

def _traj(**kw):
  return Trajectory(qid="q1", question="Who?", answers=["Ann"], **kw)


def test_record_call_continues_a_sequence_on_prefix_extension():
  t = _traj()
  assert t.record_call([1, 2, 3], [10, 11], [-0.5, -1.25], [4, 4]) == (3, 5)
  # The next context extends what the engine saw (prompt + output) by an observation.
  assert t.record_call([1, 2, 3, 10, 11, 20, 21], [12], [-2.0], [5]) == (7, 8)
  assert t.seq_starts == [0]
  assert t.tokens.tolist() == [1, 2, 3, 10, 11, 20, 21, 12]
  assert t.loss_mask.tolist() == [0, 0, 0, 1, 1, 0, 0, 1]
  assert t.version.tolist() == [-1, -1, -1, 4, 4, -1, -1, 5]
  assert t.behav_logp.tolist() == [0, 0, 0, -0.5, -1.25, 0, 0, -2.0]
  assert t.tokens.dtype == np.int32 and t.behav_logp.dtype == np.float32
  assert t.loss_tokens == 3 and t.versions_range() == (4, 5)
  t.turns = [Turn("act", 3, 5, 3, "stop"), Turn("act", 7, 8, 7, "stop")]
  t.status = "answered"
  t.check()


def test_record_call_starts_a_new_sequence_when_the_context_is_rewritten():
  t = _traj()
  t.record_call([1, 2, 3], [10, 11], [-0.5, -0.5], [1, 1])
  # A chunk (token 2) was replaced by a stub (token 9): the same length, a different prefix.
  assert t.record_call([1, 9, 3, 10, 11, 30], [12], [-1.0], [2]) == (11, 12)
  assert t.seq_starts == [0, 5]
  assert [t.tokens[s].tolist() for s in t.sequences()] == [[1, 2, 3, 10, 11],
                                                           [1, 9, 3, 10, 11, 30, 12]]
  # The repeated context is never trained on again: only the new sample is in the loss.
  assert t.loss_mask[5:].tolist() == [0, 0, 0, 0, 0, 0, 1]
  assert t.version[5:].tolist() == [-1] * 6 + [2]
  # A context shorter than the current sequence is a rewrite too.
  t.record_call([1, 9], [13], [-1.0], [2])
  assert t.seq_starts == [0, 5, 12] and t.tokens[12:].tolist() == [1, 9, 13]
  t.status = "answered"
  t.check()


def _valid_traj():
  t = _traj(status="answered", prediction="Ann")
  a = t.record_call([1, 2, 3], [10, 11], [-0.5, -0.75], [4, 4])
  b = t.record_call([5, 6], [12, 13, 14], [-0.1, -0.2, -0.3], [5, 5, 6])
  t.turns = [Turn("act", *a, 3, "stop", "search", "q", True),
             Turn("read", *b, 2, "stop", "answer", "Ann")]
  t.check()
  return t


@pytest.mark.parametrize("breakage,message", [
    (lambda t: setattr(t, "version", t.version[:-1]), "differ in length"),
    (lambda t: setattr(t, "behav_logp", np.append(t.behav_logp, np.float32(0))),
     "differ in length"),
    (lambda t: t.version.__setitem__(0, 3), "outside the loss mask"),
    (lambda t: t.version.__setitem__(3, -1), "no policy version"),
    (lambda t: setattr(t, "seq_starts", [1, 5]), "bad seq_starts"),
    (lambda t: setattr(t, "seq_starts", [0, 5, 5]), "bad seq_starts"),
    (lambda t: setattr(t, "seq_starts", []), "bad seq_starts"),
    (lambda t: setattr(t.turns[0], "end", 6), "turn span"),
    (lambda t: setattr(t.turns[1], "end", len(t.tokens) + 1), "turn span"),
    (lambda t: setattr(t, "status", "done"), "unknown status"),
])
def test_check_catches_broken_invariants(breakage, message):
  t = _valid_traj()
  breakage(t)
  with pytest.raises(ValueError, match=message):
    t.check()


def test_json_round_trip_is_exact():
  t = _valid_traj()
  # float32 values with no short decimal form: they must come back bit-identical.
  t.behav_logp[3:5] = np.array([-1 / 3, -np.pi], np.float32)
  t.behav_logp[7:] = np.nextafter(np.float32(-0.1), np.float32(0)), np.float32(-1e-30), -7.5
  t.transcript = [{"role": "prompt", "text": "Ünïcode ✓ \"quoted\"\n"}]
  t.metrics, t.timings, t.sampling = {"em": 1.0, "f1": 0.5}, {"wall_s": 1.5}, {"seed": 2**63}
  back = Trajectory.from_json(t.to_json())
  assert back.behav_logp.dtype == np.float32
  assert back.behav_logp.tobytes() == t.behav_logp.tobytes()
  for name in ("tokens", "loss_mask", "version"):
    a, b = getattr(t, name), getattr(back, name)
    assert a.dtype == b.dtype and (a == b).all(), name
  assert back.turns == t.turns and back.seq_starts == t.seq_starts
  assert back.to_dict() == t.to_dict()
  back.check()
  with pytest.raises(ValueError, match="unknown trajectory fields"):
    Trajectory.from_dict({**t.to_dict(), "bogus": 1})


def test_jsonl_a_whole_last_line_without_its_newline_is_kept_by_the_next_append(tmp_path):
  """`read_lines` returns such a line (a file another tool wrote, or a crash just before the
  newline), so the next append must not cut it off: an evaluation counted that episode done
  and then lost it for good."""
  from asearcher_jax.jsonl import append_lines, read_lines
  path = tmp_path / "t.jsonl"
  path.write_text('{"n": 0}\n{"n": 1}')
  assert read_lines(str(path)) == [{"n": 0}, {"n": 1}]
  append_lines(str(path), [{"n": 2}])
  assert read_lines(str(path)) == [{"n": 0}, {"n": 1}, {"n": 2}]
  path.write_text('{"n": 0}\n{"n": 1')  # torn: cut off
  append_lines(str(path), [{"n": 2}])
  assert path.read_text() == '{"n": 0}\n{"n": 2}\n'


def test_jsonl_a_number_too_big_for_its_array_names_the_line(tmp_path):
  path = str(tmp_path / "traj.jsonl")
  d = _valid_traj().to_dict()
  d["tokens"][0] = 2 ** 40
  with open(path, "w") as f:
    f.write(json.dumps(d) + "\n" + json.dumps(d) + "\n")
  with pytest.raises(ValueError, match=r"traj.jsonl:1: unreadable line .*int32"):
    read_jsonl(path)


def test_jsonl_torn_last_line_ignored_bad_middle_line_raises(tmp_path):
  path = str(tmp_path / "sub" / "traj.jsonl")
  a, b = _valid_traj(), _valid_traj()
  b.qid = "q2"
  write_jsonl(path, [a])
  write_jsonl(path, [b])  # appends
  assert [t.qid for t in read_jsonl(path)] == ["q1", "q2"]
  with open(path, "a", encoding="utf-8") as f:
    f.write(a.to_json()[:40])  # a crash mid-write: no newline
  got = read_jsonl(path)
  assert [t.qid for t in got] == ["q1", "q2"]
  assert got[0].behav_logp.tobytes() == a.behav_logp.tobytes()
  # A rerun appends after the torn line: the fragment is dropped, not glued to the new record.
  c = _valid_traj()
  c.qid = "q3"
  write_jsonl(path, [c])
  assert [t.qid for t in read_jsonl(path)] == ["q1", "q2", "q3"]
  with open(path, "a", encoding="utf-8") as f:
    f.write("{torn")
  # The same broken text in the middle of the file is corruption, not a torn write.
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join([lines[0], lines[3], lines[1]]) + "\n")
  with pytest.raises(ValueError, match=r":2: unreadable line"):
    read_jsonl(path)


# -- Context ---------------------------------------------------------------------------------

def _completion(text, tok, eos=False):
  from asearcher_jax.agent.policy import Completion
  ids = tok.encode(text)
  return Completion(text, ids, [-0.5] * len(ids), [0] * len(ids), "stop", eos)


def test_chat_context_prompt_matches_the_template(tok):
  ctx = Context("Question: who?", template="chat", tokenizer=tok, eos_text=tok.eos_token)
  msgs = [{"role": "user", "content": "Question: who?"}]
  rendered = tok.apply_chat_template(msgs, add_generation_prompt=True)
  p = ctx.prompt()
  assert p.text == rendered and p.ids == tok.encode(rendered)
  assert p.messages == msgs
  assert ctx.num_tokens == len(p.ids)


@pytest.mark.parametrize("ends_with_eos", [False, True])
def test_chat_context_delta_equals_the_template_rendering(tok, ends_with_eos):
  ctx = Context("Question: who?", template="chat", tokenizer=tok, eos_text=tok.eos_token)
  turn = "<think>look it up</think>\n<search> who </search>"
  ctx.add_policy(_completion(turn + ("<|im_end|>" if ends_with_eos else ""), tok))
  ctx.add_observation("Doc 1(Title: T) Ann did it.")
  expected = tok.apply_chat_template(
      [{"role": "user", "content": "Question: who?"}, {"role": "assistant", "content": turn},
       {"role": "user", "content": "<information>\nDoc 1(Title: T) Ann did it.\n</information>"}],
      add_generation_prompt=True)
  p = ctx.prompt()
  assert p.text == expected
  assert p.text.count("<|im_end|>") == 3  # the model's message is closed exactly once
  assert p.ids == tok.encode(expected)
  assert ctx.num_tokens == len(p.ids)
  assert p.messages[1] == {"role": "assistant", "content": turn}  # without the EOS text
  assert p.messages[0]["role"] == "user" and p.messages[2] == {
      "role": "user", "content": "<information>\nDoc 1(Title: T) Ann did it.\n</information>"}
  # A second round keeps the history a prefix: what was rendered never changes.
  ctx.add_policy(_completion("<answer> Ann </answer>", tok))
  assert ctx.prompt().text.startswith(expected)


def test_chat_context_replace_swaps_only_the_observation(tok):
  ctx = Context("Q", template="chat", tokenizer=tok, eos_text=tok.eos_token)
  ctx.add_policy(_completion("<access> https://ex.org </access>", tok))
  i = ctx.add_observation("FULL CHUNK TEXT " * 5)
  ctx.add_policy(_completion("Notes on the chunk.<|im_end|>", tok))
  before = [(p.role, p.text, p.ids) for p in ctx.pieces]
  ctx.replace(i, "FULL CHUNK ... (read)")
  after = [(p.role, p.text, p.ids) for p in ctx.pieces]
  assert [b for j, b in enumerate(before) if j != i] == [a for j, a in enumerate(after) if j != i]
  assert "FULL CHUNK TEXT" not in ctx.prompt().text
  assert ctx.pieces[i].content == "<information>\nFULL CHUNK ... (read)\n</information>"
  expected = tok.apply_chat_template(
      [{"role": "user", "content": "Q"},
       {"role": "assistant", "content": "<access> https://ex.org </access>"},
       {"role": "user", "content": "<information>\nFULL CHUNK ... (read)\n</information>"},
       {"role": "assistant", "content": "Notes on the chunk."}], add_generation_prompt=False)
  assert ctx.prompt().text == expected.rstrip("\n")  # the note ended its message itself
  assert ctx.prompt().ids == tok.encode(ctx.prompt().text)


def test_plain_context_observation_and_replace(tok):
  ctx = Context("PROMPT\n<think>\n", template="plain", tokenizer=tok, eos_text=tok.eos_token)
  assert ctx.prompt().text == "PROMPT\n<think>\n"
  ctx.add_policy(_completion("x</think>\n<search> q </search>", tok))
  i = ctx.add_observation("Doc 1 body")
  assert ctx.pieces[i].text == "\n\n<information>\nDoc 1 body\n</information>\n<think>\n"
  assert ctx.pieces[i].content == "<information>\nDoc 1 body\n</information>"
  ctx.add_policy(_completion("note</think>", tok))
  ctx.replace(i, "stub")
  assert ctx.prompt().text == ("PROMPT\n<think>\nx</think>\n<search> q </search>"
                               "\n\n<information>\nstub\n</information>\n<think>\nnote</think>")
  assert ctx.prompt().ids == tok.encode(ctx.prompt().text)
  assert [p.role for p in ctx.pieces] == ["prompt", "policy", "tool", "policy"]


def test_context_without_tokenizer_gives_messages_only():
  ctx = Context("Q", template="chat", tokenizer=None)
  from asearcher_jax.agent.policy import Completion
  ctx.add_policy(Completion("<search> a </search>", None, None, None, "stop", False))
  ctx.add_observation("R")
  p = ctx.prompt()
  assert p.ids is None
  assert p.messages == [{"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "<search> a </search>"},
                        {"role": "user", "content": "<information>\nR\n</information>"}]


# -- restore_stop ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,stops,restored", [
    ("<think>x</think>\n<search> q", ACT_STOPS, "<think>x</think>\n<search> q</search>"),
    ("<access> https://ex.org", ACT_STOPS, "<access> https://ex.org</access>"),
    ("<answer> Paris", ACT_STOPS, "<answer> Paris</answer>"),
    ("<search> a </search> <access> u", ACT_STOPS, "<search> a </search> <access> u</access>"),
    ("<access> u </access> <search> b", ACT_STOPS, "<access> u </access> <search> b</search>"),
    ("<search> q </search>", ACT_STOPS, "<search> q </search>"),  # the server kept the stop
    ("no call at all", ACT_STOPS, "no call at all"),  # an act turn that ended by itself
    ("Part 1 names Ann as founder.", READ_STOPS, "Part 1 names Ann as founder.</think>"),
    ("Part 1 notes.\n<search> more", READ_STOPS, "Part 1 notes.\n<search> more</search>"),
    ("Part 1 notes.</think>", READ_STOPS, "Part 1 notes.</think>"),  # not closed twice
    ("Notes. <search> q </search>", READ_STOPS, "Notes. <search> q </search>"),  # kept stop
    ("<search> q", (), "<search> q"),  # no stop strings, nothing to restore
])
def test_restore_stop_table(text, stops, restored):
  assert restore_stop(text, stops) == restored


# -- OpenAIPolicy against a local server -----------------------------------------------------

class FakeOpenAI:
  """A scripted OpenAI-compatible server: each POST takes the next (status, body) reply."""

  def __init__(self, replies=(), models=("m-1",)):
    self.replies, self.models = list(replies), list(models)
    self.requests: list[tuple[str, dict, str | None]] = []
    app = web.Application()
    app.router.add_get("/v1/models", self._models)
    app.router.add_post("/v1/completions", self._post)
    app.router.add_post("/v1/chat/completions", self._post)
    self.app = app

  async def _models(self, request):
    self.requests.append(("/v1/models", {}, request.headers.get("Authorization")))
    return web.json_response({"object": "list", "data": [{"id": m} for m in self.models]})

  async def _post(self, request):
    self.requests.append((request.path, await request.json(),
                          request.headers.get("Authorization")))
    status, body = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
    if isinstance(body, str):
      return web.Response(status=status, text=body)
    return web.json_response(body, status=status)

  @contextlib.asynccontextmanager
  async def serve(self):
    runner = web.AppRunner(self.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
      yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
      await runner.cleanup()


def _text(text, reason="stop"):
  return 200, {"choices": [{"text": text, "finish_reason": reason}],
               "usage": {"prompt_tokens": 11, "completion_tokens": 3}}


def _chat(text, reason="stop"):
  return 200, {"choices": [{"message": {"role": "assistant", "content": text},
                            "finish_reason": reason}]}


PROMPT = Prompt(None, "PROMPT TEXT", [{"role": "user", "content": "PROMPT TEXT"}])


def _run_policy(server, calls, **kw):
  async def go():
    async with server.serve() as url:
      policy = OpenAIPolicy(url, **kw)
      try:
        return [await policy.complete(PROMPT, s) for s in calls]
      finally:
        await policy.close()
  return asyncio.run(go())


def test_openai_completions_restore_the_cut_stop():
  server = FakeOpenAI([_text("<think>x</think>\n<search> who founded Xyz"),
                       _text("I cannot tell."),
                       _text("<search> long", "length")])
  s = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=64, stop=ACT_STOPS, seed=5)
  a, b, c = _run_policy(server, [s, s, s])
  assert a.text == "<think>x</think>\n<search> who founded Xyz</search>"
  assert parse_action(a.text).argument == "who founded Xyz"
  assert (a.finish_reason, a.eos, a.ids, a.prompt_tokens) == ("stop", False, None, 11)
  assert (b.text, b.finish_reason, b.eos) == ("I cannot tell.", "stop", True)  # ended by itself
  assert (c.text, c.finish_reason, c.eos) == ("<search> long", "length", False)  # cut: no tag
  path, body, _ = server.requests[1]
  assert path == "/v1/completions"
  assert body == {"model": "m-1", "temperature": 0.7, "top_p": 0.9, "max_tokens": 64,
                  "stop": list(ACT_STOPS), "seed": 5, "prompt": "PROMPT TEXT"}
  assert [r[0] for r in server.requests].count("/v1/models") == 1  # asked once


def test_a_search_split_by_max_new_tokens_runs_on_a_server_that_cuts_the_stop():
  """The second half of a call cut by max_new_tokens ends with the stop string cut off, as
  OpenAI and vLLM do: its closing tag is restored from the whole message, so the search runs
  (it read as a message that ended by itself, and the episode ended unanswered)."""
  from test_agent_loop import ITEM, FakeTools

  from asearcher_jax.agent import Agent, AgentSection
  server = FakeOpenAI([_text("<think>look up</think>\n<search> Xyz Corp", "length"),
                       _text(" founder"), _text("<answer> Ann Lee")])

  async def go():
    async with server.serve() as url:
      policy, tools = OpenAIPolicy(url, "m"), FakeTools()
      try:
        return await Agent(AgentSection(max_new_tokens=8), policy, tools).run(ITEM, seed=1), tools
      finally:
        await policy.close()
  traj, tools = asyncio.run(go())
  assert traj.status == "answered" and traj.prediction == "Ann Lee"
  assert tools.calls == [("search", ["Xyz Corp founder"], None)]
  assert [t.continues for t in traj.turns] == [False, True, False]
  assert traj.generations()[0] == "<think>look up</think>\n<search> Xyz Corp founder</search>"


def test_openai_chat_sends_messages():
  server = FakeOpenAI([_chat("<search> q")])
  [c] = _run_policy(server, [SamplingParams(stop=ACT_STOPS)], chat=True, model="given")
  assert c.text == "<search> q</search>"
  path, body, _ = server.requests[-1]
  assert path == "/v1/chat/completions"
  assert body["messages"] == PROMPT.messages and "prompt" not in body
  assert body["model"] == "given"
  assert all(r[0] != "/v1/models" for r in server.requests)  # a configured model is not looked up


def test_openai_retries_a_5xx_then_succeeds():
  server = FakeOpenAI([(500, "overloaded"), _text("<answer> Ann")])
  [c] = _run_policy(server, [SamplingParams(stop=ACT_STOPS)], model="m", max_retries=2)
  assert c.text == "<answer> Ann</answer>"
  assert [r[0] for r in server.requests] == ["/v1/completions"] * 2


def test_openai_always_5xx_is_unavailable():
  server = FakeOpenAI([(503, "down")])
  with pytest.raises(PolicyUnavailable, match="HTTP 503"):
    _run_policy(server, [SamplingParams()], model="m", max_retries=1)
  assert len(server.requests) == 2  # the first try and one retry


def test_openai_unreachable_is_unavailable():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]

  async def go(model):
    policy = OpenAIPolicy(f"http://127.0.0.1:{port}/v1", model, max_retries=0, timeout_s=5)
    try:
      await policy.complete(PROMPT, SamplingParams())
    finally:
      await policy.close()
  for model in (None, "m"):  # the /models lookup and the completion itself
    with pytest.raises(PolicyUnavailable):
      asyncio.run(go(model))


def test_openai_context_length_400_is_context_too_long():
  msg = json.dumps({"error": {"message": "This model's maximum context length is 4096 tokens."}})
  server = FakeOpenAI([(400, msg)])
  with pytest.raises(ContextTooLong, match="maximum context length"):
    _run_policy(server, [SamplingParams()], model="m", max_retries=3)
  assert len(server.requests) == 1  # not retried


def test_openai_sends_the_bearer_key_from_the_named_env_var(monkeypatch):
  monkeypatch.setenv("MY_TEST_LLM_KEY", "sk-test-123")
  monkeypatch.delenv("OPENAI_API_KEY", raising=False)
  server = FakeOpenAI([_text("done")])
  _run_policy(server, [SamplingParams()], api_key_env="MY_TEST_LLM_KEY")
  assert [r[2] for r in server.requests] == ["Bearer sk-test-123"] * 2  # /models and the call
  server = FakeOpenAI([_text("done")])
  _run_policy(server, [SamplingParams()], model="m", api_key_env="MY_UNSET_LLM_KEY_XYZ")
  assert server.requests[0][2] is None


# -- report ----------------------------------------------------------------------------------

def _s(ds, qid, sample, status, **metrics):
  bad = status == "aborted"  # an aborted episode's turns must not count either
  return {"dataset": ds, "qid": qid, "sample": sample, "status": status, "metrics": metrics,
          "turns": 1 if bad else 4, "tool_calls": 0 if bad else 2, "tool_errors": 0}


def test_aggregate_avg_and_pass_at_k_by_hand():
  aborted = {"status": "aborted", "em": 0.0, "f1": 0.0}  # scores an infrastructure failure got
  samples = [
      _s("hotpot", "q1", 0, "answered", em=0.0, f1=0.5),
      _s("hotpot", "q1", 1, "answered", em=1.0, f1=1.0),
      {**_s("hotpot", "q1", 2, "max_turns", em=0.0, f1=0.0), "format_ok": False},
      _s("hotpot", "q2", 0, **aborted),  # left out of the metrics and of the k samples
      _s("hotpot", "q2", 1, "answered", em=0.0, f1=0.2),
      _s("hotpot", "q2", 2, "answered", em=0.0, f1=0.6),
      _s("hotpot", "q3", 0, **aborted), _s("hotpot", "q3", 1, **aborted),
      _s("hotpot", "q3", 2, **aborted),  # only aborted samples: no question in the metrics
      _s("nq", "n1", 0, "answered", em=1.0), _s("nq", "n1", 1, "no_answer", em=0.0),
      _s("nq", "n2", 0, "answered", em=1.0), _s("nq", "n2", 1, "answered", em=1.0),
  ]
  rep = aggregate(samples, k=3)
  assert list(rep) == ["hotpot", "nq"]
  h = rep["hotpot"]
  # em:  q1 samples 0,1,0 -> mean 1/3, best 1;  q2 samples 0,0 (aborted one left out) -> 0, 0
  #      Avg@3 = (1/3 + 0) / 2 = 1/6;  Pass@3 = (1 + 0) / 2 = 0.5
  # f1:  q1 0.5,1.0,0.0 -> mean 0.5, best 1.0;  q2 0.2,0.6 -> mean 0.4, best 0.6
  #      Avg@3 = (0.5 + 0.4) / 2 = 0.45;  Pass@3 = (1.0 + 0.6) / 2 = 0.8
  assert h["metrics"]["em"] == pytest.approx({"avg@3": 1 / 6, "pass@3": 0.5, "questions": 2})
  assert h["metrics"]["f1"] == pytest.approx({"avg@3": 0.45, "pass@3": 0.8, "questions": 2})
  assert h["questions"] == 3 and h["samples"] == 9
  assert h["status"] == {"answered": 4, "max_turns": 1, "aborted": 4}
  assert h["mean_turns"] == 4 and h["mean_tool_calls"] == 2
  assert h["format_ok"] == pytest.approx(4 / 5)  # of the samples that ran
  # nq: n1 1,0 -> 0.5 / 1;  n2 1,1 -> 1 / 1;  Avg@3 = 0.75, Pass@3 = 1
  assert rep["nq"]["metrics"] == {"em": pytest.approx({"avg@3": 0.75, "pass@3": 1.0,
                                                       "questions": 2})}
  assert rep["nq"]["status"] == {"answered": 3, "no_answer": 1}

  table = format_table(rep, 3).splitlines()
  assert table[0].split()[:4] == ["dataset", "n", "em", "avg@3/pass@3"]
  hot = next(r for r in table if r.startswith("hotpot"))
  nq = next(r for r in table if r.startswith("nq"))
  # answered: 4 of the 5 samples that ran (the 4 aborted ones are not the agent's failures)
  # format: 4 of the same 5 pass the gate
  assert "16.7 /  50.0" in hot and "45.0 /  80.0" in hot and hot.split()[-2:] == ["80%", "80%"]
  assert "75.0 / 100.0" in nq and nq.split()[-5] == "-"  # nq has no f1 column value
  assert nq.split()[-2:] == ["75%", "100%"]


def test_aggregate_keeps_at_most_k_samples_and_skips_missing_metrics():
  samples = [_s("d", "q", i, "answered", em=float(i == 2)) for i in range(3)]
  samples.append(_s("d", "r", 0, "answered"))  # a sample without metrics (not scored)
  rep = aggregate(samples, k=2)["d"]
  # q: only two samples count (em 0, 0) -> avg 0, pass 0; r has no em at all.
  assert rep["metrics"]["em"] == {"avg@2": 0.0, "pass@2": 0.0, "questions": 1}
  assert rep["samples"] == 4


def test_paired_interval_brackets_a_uniform_gain_and_straddles_zero_for_a_swap():
  """Every question gains one of four samples: a paired interval is the gain exactly (each
  question's difficulty cancels). Half the questions gain what the other half lose: the
  interval straddles zero. Questions only one run scored, and aborted samples, are left out."""
  def run(wins):  # {qid: right samples of 4}
    return [_s("d", q, i, "answered", em=float(i < n)) for q, n in wins.items() for i in range(4)]
  hard = {f"q{i}": i % 3 for i in range(40)}  # 0..2 right of 4: varied difficulty
  better = {q: n + 1 for q, n in hard.items()}
  extra = [_s("d", "only_after", i, "answered", em=1.0) for i in range(4)]
  aborted = [{**_s("d", "q0", 4, "aborted", em=1.0), "sample": 0}]
  iv = paired_intervals(run(hard), aborted + run(better) + extra, k=4)
  assert iv["d", "em"]["avg@4"] == pytest.approx((0.25, 0.25))
  lo, hi = iv["d", "em"]["pass@4"]  # the questions with no right sample before now have one
  assert 0 < lo <= hi < 1

  swapped = {q: (n + 1 if i % 2 else max(n - 1, 0)) for i, (q, n) in enumerate(hard.items())}
  lo, hi = paired_intervals(run(hard), run(swapped), k=4)["d", "em"]["avg@4"]
  assert lo < 0 < hi

  before, after = aggregate(run(hard), 4), aggregate(run(better), 4)
  row = format_comparison(before, after, 4, intervals=iv).splitlines()[2]
  assert "+25.0 [+25.0, +25.0]" in row
  assert "[" not in format_comparison(before, after, 4).splitlines()[2]


def test_a_comparison_over_different_questions_says_so_and_pairs_its_change():
  """A baseline over 10 questions (the first 5 right) against a run over those 5: the
  averages differ by 50 points, but over the questions both scored nothing changed. The
  change printed beside the paired interval was the unpaired one, outside its own interval."""
  before = [_s("d", f"q{i}", 0, "answered", em=float(i < 5)) for i in range(10)]
  after = [_s("d", f"q{i}", 0, "answered", em=1.0) for i in range(5)]
  iv = paired_intervals(before, after, k=1)
  assert iv["d", "em"]["change"] == {"avg@1": 0.0, "pass@1": 0.0}
  assert iv["d", "em"]["questions"] == 5
  text = format_comparison(aggregate(before, 1), aggregate(after, 1), 1, intervals=iv)
  assert "+0.0 [+0.0, +0.0]" in text.splitlines()[2]
  assert text.splitlines()[-1] == ("note: d em: the change is over the 5 questions both runs "
                                   "scored (baseline 10, this run 5)")
  text = format_comparison(aggregate(before, 1), aggregate(after, 1), 1)
  assert "+50.0" in text.splitlines()[2]
  assert text.splitlines()[-1] == ("warning: d em: baseline scored 10 questions, this run 5: "
                                   "the change compares different questions")


def test_a_cells_interval_does_not_move_when_another_dataset_joins():
  def run(ds, shift):
    return [_s(ds, f"q{i}", j, "answered", em=float((i + j + shift) % 3 == 0))
            for i in range(30) for j in range(4)]
  alone = paired_intervals(run("d", 0), run("d", 1), k=4)
  joined = paired_intervals(run("a", 0) + run("d", 0), run("a", 2) + run("d", 1), k=4)
  assert joined["d", "em"] == alone["d", "em"]


def test_reports_compare_only_at_the_same_k_and_sampling():
  at = lambda t, k=4: {"k": k, "sampling": {"temperature": t, "top_p": 1.0, "top_k": 0}}
  assert incomparable(at(0.6), at(0.6)) is None
  assert "temperature" in incomparable(at(1.0), at(0.6))
  assert "k=2" in incomparable(at(0.6, k=2), at(0.6))
  assert incomparable({"k": 4}, at(0.6)) is None  # a report from before sampling was recorded
  scored = lambda norm: {**at(0.6), "scoring": {"normalization": norm, "f1_variant": "set"}}
  assert "lenient" in incomparable(scored("squad"), scored("lenient"))
