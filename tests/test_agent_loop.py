"""The agent loop (`Agent.run`, base and reasoning variants) against a scripted policy and fake
search tools: statuses, the token record, page reading with stubs, the reasoning prompts, and
the eval harness resuming a run."""

import asyncio
import dataclasses
import itertools
import json
import re
import time

import numpy as np
import pytest

from asearcher_jax.agent import (
  Agent,
  AgentSection,
  Completion,
  ContextTooLong,
  PolicyUnavailable,
  reasoning,
)
from asearcher_jax.agent.episode import ACT_STOPS, turn_seed
from asearcher_jax.agent.prompts import ANSWER_INSTRUCTION
from asearcher_jax.data.qa import DataError, QAItem
from asearcher_jax.models.tokenizer import build_tokenizer
from asearcher_jax.tools.config import SearchClientSection
from asearcher_jax.tools.types import Page, SearchHit, ToolResult

VERSION = 7
ITEM = QAItem("q1", "Who founded Xyz Corp?", ("Ann Lee",))
URL = "https://ex.org/xyz"
# Three paragraphs of 90 characters: with chunk_chars=100 the page is exactly three chunks.
PARAS = [(w + " ") * (90 // (len(w) + 1)) for w in ("alpha", "bravo", "charlie")]
PARAS = [p.ljust(90, ".") for p in PARAS]
PAGE = Page(URL, "Xyz Corp", "\n\n".join(PARAS))


@dataclasses.dataclass
class Step:
  text: str
  eos: bool = False
  finish: str = "stop"
  sleep: float = 0.0
  error: Exception | None = None


class ScriptedPolicy:
  """The Policy protocol with scripted turns; records every prompt and sampling it gets."""

  chat = False

  def __init__(self, steps):
    self.tokenizer = build_tokenizer()
    self.steps = iter(steps)
    self.prompts, self.samplings, self.outputs, self.ended = [], [], [], []

  async def complete(self, prompt, sampling, session_id=None):
    self.prompts.append(prompt)
    self.samplings.append(sampling)
    step = next(self.steps, None)
    assert step is not None, "the agent asked for more turns than were scripted"
    if step.sleep:
      await asyncio.sleep(step.sleep)
    if step.error is not None:
      raise step.error
    ids = self.tokenizer.encode(step.text)
    logprobs = [-((i % 7) + 1) / 3 for i in range(len(ids))]  # not exact in float32
    c = Completion(step.text, ids, logprobs, [VERSION] * len(ids), step.finish, step.eos,
                   len(prompt.ids))
    self.outputs.append(c)
    return c

  async def end_session(self, session_id):
    self.ended.append(session_id)


class FakeTools:
  """The SearchClient protocol: queries in `failing` give tool errors; one known page."""

  def __init__(self, failing=(), chunk_chars=100, max_chunks=10):
    self.cfg = SearchClientSection(chunk_chars=chunk_chars, max_chunks=max_chunks)
    self.failing = set(failing)
    self.calls = []

  async def search(self, queries, topk=None):
    self.calls.append(("search", list(queries), topk))
    return [ToolResult.failure("search", q, "timeout", "no reply within 30s") if q in self.failing
            else ToolResult("search", q, hits=(
                SearchHit("d1", "Xyz Corp", f"Xyz Corp was founded by Ann Lee ({q}).", url=URL),))
            for q in queries]

  async def access(self, url):
    self.calls.append(("access", url))
    if url in self.failing:
      return ToolResult.failure("access", url, "timeout", "no reply within 30s")
    if url != URL:
      return ToolResult.failure("access", url, "not_found", f"no page for {url}", 404)
    return ToolResult("access", url, page=PAGE)

  async def close(self):
    pass


def run_agent(steps, tools=None, seed=3, **cfg):
  policy, tools = ScriptedPolicy(steps), tools or FakeTools()
  agent = Agent(AgentSection(**cfg), policy, tools)
  traj = asyncio.run(agent.run(ITEM, seed=seed))
  return traj, policy, tools


def assert_record(traj, policy):
  """The token record is exactly what the engine saw and sampled, turn by turn."""
  traj.check()
  assert len(traj.turns) == len(policy.outputs)
  sampled = np.zeros(len(traj.tokens), bool)
  for turn, prompt, out in zip(traj.turns, policy.prompts, policy.outputs):
    assert traj.tokens[turn.start:turn.end].tolist() == out.ids
    assert traj.behav_logp[turn.start:turn.end].tobytes() == np.float32(out.logprobs).tobytes()
    assert (traj.version[turn.start:turn.end] == VERSION).all()
    seq = max(s for s in traj.seq_starts if s < turn.start)
    assert traj.tokens[seq:turn.start].tolist() == prompt.ids  # the context of this call
    assert turn.prompt_tokens == len(prompt.ids)
    sampled[turn.start:turn.end] = True
  assert (traj.loss_mask == sampled).all()
  assert (traj.version[~sampled] == -1).all() and (traj.behav_logp[~sampled] == 0).all()


# -- the base agent --------------------------------------------------------------------------

def test_answered_episode():
  t0 = "<think>I should look it up.</think>\n<search> Xyz Corp founder </search>"
  t1 = "<think>Doc 1 names her.</think>\n<answer> Ann Lee </answer>"
  traj, policy, tools = run_agent([Step(t0), Step(t1)], max_new_tokens=256)
  assert (traj.status, traj.prediction, traj.error) == ("answered", "Ann Lee", None)
  assert traj.num_turns == 2 and traj.tool_calls() == 1 and traj.tool_calls("access") == 0
  assert tools.calls == [("search", ["Xyz Corp founder"], None)]
  assert [(t.kind, t.action, t.argument, t.tool_ok) for t in traj.turns] == [
      ("act", "search", "Xyz Corp founder", True), ("act", "answer", "Ann Lee", None)]
  assert_record(traj, policy)
  assert traj.seq_starts == [0]  # one growing context: one sequence
  # The second prompt is the first, the model's turn and the observation, verbatim.
  first, second = policy.prompts[0].text, policy.prompts[1].text
  assert first.startswith("A conversation between User and Assistant") and ITEM.question in first
  assert first.endswith("Assistant:\n<think>\n")
  assert second == (first + t0 + "\n\n<information>\nDoc 1(Title: Xyz Corp) URL: " + URL
                    + " Xyz Corp was founded by Ann Lee (Xyz Corp founder).\n</information>\n"
                    "<think>\n")
  assert [s.stop for s in policy.samplings] == [ACT_STOPS, ACT_STOPS]
  assert [s.seed for s in policy.samplings] == [turn_seed(3, 0), turn_seed(3, 1)]
  assert all(s.max_new_tokens == 256 for s in policy.samplings)
  assert [m["role"] for m in traj.transcript] == ["prompt", "policy", "tool", "policy"]
  assert traj.generations() == [t0, t1]
  assert len(policy.ended) == 1 and policy.ended[0].startswith("q1/0/")
  assert traj.timings["wall_s"] >= 0 and traj.sampling["seed"] == 3


def test_chat_template_episode_closes_each_message_once():
  t0 = "<think>look</think>\n<search> founder </search>"  # stopped at a stop string
  t1 = "<think>Doc 1 names"  # cut by max_new_tokens: the next turn continues the message
  t2 = " Ann Lee.</think>\n<answer> Ann Lee </answer><|im_end|>"
  traj, policy, _ = run_agent([Step(t0), Step(t1, finish="length"), Step(t2, eos=True)],
                              template="chat")
  assert traj.status == "answered"
  tok = policy.tokenizer
  p0 = policy.prompts[0]
  question = p0.messages[0]["content"]
  assert question.startswith("Answer the question below by searching")  # asearcher_chat
  assert p0.text == tok.apply_chat_template(p0.messages, add_generation_prompt=True)
  obs = ("<information>\nDoc 1(Title: Xyz Corp) URL: " + URL
         + " Xyz Corp was founded by Ann Lee (founder).\n</information>")
  assert policy.prompts[1].text == tok.apply_chat_template(
      [{"role": "user", "content": question}, {"role": "assistant", "content": t0},
       {"role": "user", "content": obs}], add_generation_prompt=True)
  assert policy.prompts[2].text == policy.prompts[1].text + t1
  assert_record(traj, policy)


def test_access_reads_one_chunk_per_turn_and_stubs_it():
  steps = [Step(f"<think>read it</think>\n<access> <{URL}> </access>"),
           Step("Part 1 says alpha.</think>"), Step("Part 2 says bravo.</think>"),
           Step("Part 3 says charlie.</think>"), Step("<answer> Ann Lee </answer>")]
  traj, policy, tools = run_agent(steps, stub_chars=30)
  assert traj.status == "answered" and traj.prediction == "Ann Lee"
  assert tools.calls == [("access", URL)]
  assert [t.kind for t in traj.turns] == ["act", "read", "read", "read", "act"]
  assert traj.turns[0].action == "access" and traj.turns[0].argument == URL
  assert [s.stop for s in policy.samplings] == [ACT_STOPS] + [ACT_STOPS + ("</think>",)] * 3 + [
      ACT_STOPS]
  texts = [p.text for p in policy.prompts]
  # A stub: the part's header, the start of the chunk (at most stub_chars), "... (read)".
  stubs = [re.compile(re.escape(f"<information>\n{URL} (part {i + 1} of 3)\n>>>> Page {i + 1} "
                                f">>>>\n{PARAS[i][:10]}") + r"[^\n]{0,20} \.\.\. \(read\)\n"
                      "</information>") for i in range(3)]
  for i in range(3):
    # Reading turn i+1 shows chunk i in full, after the stubs of the chunks already read.
    shown = texts[i + 1]
    assert f"<information>\n{URL} (part {i + 1} of 3)\n>>>> Page {i + 1} >>>>\n{PARAS[i]}" in shown
    assert shown.endswith("</information>\n<think>\n")
    for j in range(i):
      assert PARAS[j] not in shown and stubs[j].search(shown)
    for j in range(i + 1, 3):
      assert PARAS[j][:20] not in shown
  final = texts[4]
  assert all(p not in final for p in PARAS) and all(s.search(final) for s in stubs)
  assert "Part 3 says charlie.</think>" in final
  # A new sequence after each replacement: the act turn + read 1, then reads 2, 3 and the answer.
  assert len(traj.seq_starts) == 4
  assert [sum(traj.seq_starts[k] <= t.start for k in range(4)) - 1 for t in traj.turns] == [
      0, 0, 1, 2, 3]
  assert_record(traj, policy)


def test_chat_template_reading_turns_end_with_eos_and_go_on():
  steps = [Step(f"<access> {URL} </access>"), Step("Alpha notes.<|im_end|>", eos=True),
           Step("Bravo notes.<|im_end|>", eos=True), Step("Charlie notes.<|im_end|>", eos=True),
           Step("<answer> Ann Lee </answer>")]
  traj, policy, _ = run_agent(steps, template="chat", stub_chars=30)
  assert traj.status == "answered"
  assert [t.kind for t in traj.turns] == ["act", "read", "read", "read", "act"]
  assert all(s.stop == ACT_STOPS for s in policy.samplings)  # a chat note ends its message
  tok = policy.tokenizer
  for i in (1, 2, 3):  # each chunk arrives as a user message after the closed note
    p = policy.prompts[i]
    assert p.text == tok.apply_chat_template(p.messages, add_generation_prompt=True)
    assert p.text.count("<|im_end|><|im_end|>") == 0
  last = policy.prompts[4]
  assert all(p not in last.text for p in PARAS) and last.text.count("... (read)") == 3
  assert_record(traj, policy)


def test_chat_template_act_turn_after_the_last_note_gets_a_generation_prompt():
  steps = [Step(f"<access> {URL} </access>"), Step("Alpha notes.<|im_end|>", eos=True),
           Step("Bravo notes.<|im_end|>", eos=True), Step("Charlie notes.<|im_end|>", eos=True),
           Step("<answer> Ann Lee </answer>")]
  traj, policy, _ = run_agent(steps, template="chat")
  assert traj.status == "answered"
  assert policy.prompts[4].text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_reading_turn_cut_by_max_new_tokens_continues():
  t1 = "Part 1 is about alpha. <search> alpha"
  steps = [Step(f"<access> {URL} </access>"), Step(t1, finish="length"),
           Step(" founder </search>"), Step("<answer> Ann Lee </answer>")]
  _, policy, tools = run_agent(steps)
  assert tools.calls[-1] == ("search", ["alpha founder"], None)
  assert policy.prompts[2].text.endswith(t1)  # the cut text goes on: no chunk spliced in


def test_tool_call_while_reading_drops_the_rest_of_the_page():
  steps = [Step(f"<access> {URL} </access>"), Step("Part 1: alpha. <search> bravo </search>"),
           Step("<answer> Ann Lee </answer>")]
  traj, policy, _ = run_agent(steps)
  assert traj.status == "answered"
  assert [t.kind for t in traj.turns] == ["act", "read", "act"]
  assert PARAS[1] not in policy.prompts[2].text and "(bravo)" in policy.prompts[2].text
  assert_record(traj, policy)


def test_max_turns():
  traj, policy, tools = run_agent(itertools.repeat(Step("<search> again </search>")), max_turns=3)
  assert traj.status == "max_turns" and traj.prediction is None
  assert traj.num_turns == 3 and traj.tool_calls() == 3 and len(tools.calls) == 3
  assert_record(traj, policy)


def test_context_full_before_the_first_turn():
  traj, policy, _ = run_agent([Step("<answer> x </answer>")], max_context_tokens=16)
  assert traj.status == "context_full" and traj.num_turns == 0 and not policy.prompts
  traj.check()


def test_context_full_after_an_observation_and_the_budget_caps_generation():
  _, p, _ = run_agent([Step("<answer> x </answer>")])
  n = len(p.prompts[0].ids)
  t0 = "<search> q </search>"
  traj, policy, _ = run_agent([Step(t0)], max_context_tokens=n + 40, max_new_tokens=1000)
  assert traj.status == "context_full" and traj.num_turns == 1
  assert policy.samplings[0].max_new_tokens == 40  # prompt + generation within the budget
  assert_record(traj, policy)


@pytest.mark.parametrize("step,status", [
    (Step("", error=ContextTooLong("maximum context length is 4096")), "context_full"),
    (Step("<think>still thinking", finish="max_len"), "context_full"),
    (Step("<think>", finish="cancelled"), "aborted"),
])
def test_context_full_and_cancelled_from_the_policy(step, status):
  traj, _, _ = run_agent([Step("<search> q </search>"), step])
  assert traj.status == status and traj.prediction is None
  traj.check()


def test_timeout_cuts_a_slow_policy():
  t = time.monotonic()
  traj, _, _ = run_agent([Step("<search> q </search>"), Step("<answer> x </answer>",
                                                                  sleep=5.0)], max_wall_s=0.3)
  assert time.monotonic() - t < 3.0
  assert traj.status == "timeout" and traj.num_turns == 1 and traj.prediction is None
  assert traj.timings["wall_s"] < 3.0
  traj.check()


def test_env_error_after_consecutive_server_failures():
  steps = [Step("<search> bad </search>"), Step("<search> good </search>"),
           Step("<search> bad </search>"), Step("<search> bad </search>")]
  traj, policy, _ = run_agent(steps, tools=FakeTools(failing={"bad"}), max_tool_errors=2)
  # bad, good (the count starts over), bad, bad: the second failure in a row ends it, and
  # a server that timed out is the environment's failure, not the policy's.
  assert traj.status == "env_error" and traj.num_turns == 4
  assert traj.error == "Tool error (timeout): no reply within 30s"
  assert [t.tool_ok for t in traj.turns] == [False, True, False, False]
  assert "<information>\nTool error (timeout): no reply within 30s\n</information>" in (
      policy.prompts[1].text)
  assert_record(traj, policy)


@pytest.mark.parametrize("urls, status", [
    (["https://a.org", "https://b.org"], "tool_error"),  # the policy's own bad calls
    (["https://a.org", "TIMEOUT"], "env_error"),  # a server failure among them
    (["TIMEOUT", "https://a.org"], "env_error"),
    (["TIMEOUT", URL, "https://a.org", "https://b.org"], "tool_error"),  # a success resets
])
def test_a_run_of_failures_ends_as_the_environments_when_a_server_failed_in_it(urls, status):
  steps = [Step(f"<access> {u} </access>") for u in urls]
  traj, _, _ = run_agent(steps, tools=FakeTools(failing={"TIMEOUT"}), max_tool_errors=2)
  assert traj.status == status and traj.num_turns == len(urls)
  traj, _, _ = run_agent(steps, tools=FakeTools(failing={"TIMEOUT"}), max_tool_errors=2,
                         variant="reasoning")
  assert traj.status == status and traj.num_turns == len(urls)


def test_failed_access_is_a_tool_error_observation():
  steps = [Step("<access> https://nowhere.org </access>"), Step("<answer> Ann Lee </answer>")]
  traj, policy, _ = run_agent(steps)
  assert traj.status == "answered" and traj.turns[0].tool_ok is False
  assert "Tool error (not_found): no page for https://nowhere.org" in policy.prompts[1].text
  assert traj.turns[0].tool_error == "Tool error (not_found): no page for https://nowhere.org"


def test_aborted_when_the_policy_is_unavailable():
  steps = [Step("<search> q </search>"), Step("", error=PolicyUnavailable("decode server gone"))]
  traj, policy, _ = run_agent(steps)
  assert traj.status == "aborted" and traj.error == "decode server gone"
  assert traj.num_turns == 1 and len(policy.ended) == 1  # the session is still ended
  assert_record(traj, policy)


def test_no_answer_when_the_model_ends_without_a_call():
  traj, policy, _ = run_agent([Step("<think>I give up.</think> I do not know.", eos=True)])
  assert traj.status == "no_answer" and traj.num_turns == 1 and traj.prediction is None
  assert_record(traj, policy)
  # The same text cut by max_new_tokens goes on in the next turn, as a continuation.
  steps = [Step("<think>Let me think about", finish="length"), Step(" it.</think><answer> A")]
  traj, policy, _ = run_agent(steps)
  assert traj.status == "answered" and traj.prediction == "A" and traj.num_turns == 2
  assert policy.prompts[1].text == policy.prompts[0].text + "<think>Let me think about"
  assert traj.seq_starts == [0]
  assert_record(traj, policy)


def test_empty_query_is_a_tool_error_and_the_loop_goes_on():
  steps = [Step("<search>   </search>"), Step("<search> Xyz </search>"),
           Step("<answer> Ann Lee </answer>")]
  traj, policy, tools = run_agent(steps, max_tool_errors=2)
  assert traj.status == "answered" and traj.num_turns == 3
  assert tools.calls == [("search", ["Xyz"], None)]  # the empty call never reached the tools
  assert traj.turns[0].action == "invalid" and traj.turns[0].tool_ok is False
  assert ("<information>\nTool error (bad_request): empty <search> call\n</information>"
          in policy.prompts[1].text)
  assert_record(traj, policy)


def test_same_seed_same_sampling_seeds():
  a = run_agent([Step("<search> q </search>"), Step("<answer> x </answer>")], seed=11)[1]
  b = run_agent([Step("<search> q </search>"), Step("<answer> x </answer>")], seed=11)[1]
  seeds = [s.seed for s in a.samplings]
  assert seeds == [s.seed for s in b.samplings] and len(set(seeds)) == 2
  assert run_agent([Step("<answer> x </answer>")], seed=None)[1].samplings[0].seed is None


# -- the reasoning agent ---------------------------------------------------------------------

def _assert_fresh_chat_prompts(traj, policy):
  tok = policy.tokenizer
  for p in policy.prompts:
    assert len(p.messages) == 1 and p.messages[0]["role"] == "user"
    assert p.text == tok.apply_chat_template(p.messages, add_generation_prompt=True)
    assert p.ids == tok.encode(p.text)
  # Each call saw a fresh prompt: one sequence per turn.
  assert len(traj.seq_starts) == traj.num_turns
  assert_record(traj, policy)


def test_reasoning_prompts_carry_the_notes_history():
  steps = [Step("<think>secret reasoning</think>\n<thought>Need the founder.</thought>\n"
                "<search> Xyz founder </search> and then <search> ignored </search>"),
           Step("<think>more hidden</think><thought>Doc 1 names Ann Lee.</thought>"
                "<answer> Ann Lee </answer>", eos=True)]
  traj, policy, tools = run_agent(steps, variant="reasoning")
  assert traj.status == "answered" and traj.prediction == "Ann Lee" and traj.num_turns == 2
  assert tools.calls == [("search", ["Xyz founder"], None)]
  first, second = (p.messages[0]["content"] for p in policy.prompts)
  assert ITEM.question in first and "(nothing yet)" in first
  assert ANSWER_INSTRUCTION in first  # answer_after_acts=0: answering is allowed at once
  assert "<thought>Need the founder.</thought>\n<search> Xyz founder </search>" in second
  assert "Xyz Corp was founded by Ann Lee (Xyz founder)." in second
  assert "secret reasoning" not in second and "ignored" not in second
  _assert_fresh_chat_prompts(traj, policy)


def test_reasoning_ignores_calls_inside_hidden_reasoning():
  steps = [Step("<think>maybe <search> wrong idea </search>?</think>"
                "<thought>Plan.</thought><search> right idea </search>"),
           Step("<answer> Ann Lee </answer>")]
  traj, _, tools = run_agent(steps, variant="reasoning")
  assert tools.calls == [("search", ["right idea"], None)]
  assert traj.turns[0].argument == "right idea"


@pytest.mark.parametrize("opened_by", ["reply", "prompt"])
def test_reasoning_acts_on_nothing_a_reply_cut_inside_its_reasoning_says(opened_by, monkeypatch):
  """A reply cut by max_new_tokens before </think> said nothing yet: the calls its reasoning
  weighs are not run, whether the reply opened <think> or the prompt's template did (QwQ)."""
  cut = ("Maybe the answer is <answer> Bob </answer>? I should check with <search> Bob Xyz "
         "</search> before I")
  think = "<think>" if opened_by == "reply" else ""  # what the reply itself opens
  steps = [Step(think + cut, finish="length"),
           Step(think + "ok</think><thought>Search.</thought><search> Xyz founder </search>"),
           Step(think + "done</think><answer> Ann Lee </answer>")]
  if opened_by == "prompt":  # the chat template's generation prompt ends in "<think>\n"
    original = reasoning._prompt
    monkeypatch.setattr(reasoning, "_prompt", lambda agent, text: dataclasses.replace(
        original(agent, text), text=original(agent, text).text + "<think>\n"))
  traj, _, tools = run_agent(steps, variant="reasoning")
  assert traj.turns[0].action == "none" and traj.prediction == "Ann Lee"
  assert tools.calls == [("search", ["Xyz founder"], None)]
  # Its turns are separate messages: the format gate reads each alone (a cut one is not glued
  # onto the next, which would read as two <think> blocks and zero a right answer's reward).
  assert len(traj.generations()) == 3 and not any(t.continues for t in traj.turns)


def test_reasoning_early_answer_is_ignored_until_enough_acts():
  steps = [Step("<thought>I guess.</thought><answer> Bob </answer>"),
           Step("<thought>Search then.</thought><search> Xyz </search>"),
           Step("<thought>Found it.</thought><answer> Ann Lee </answer>")]
  traj, policy, _ = run_agent(steps, variant="reasoning", answer_after_acts=1)
  assert traj.status == "answered" and traj.prediction == "Ann Lee"
  assert [t.action for t in traj.turns] == ["ignored_answer", "search", "answer"]
  prompts = [p.messages[0]["content"] for p in policy.prompts]
  assert ANSWER_INSTRUCTION not in prompts[0] and ANSWER_INSTRUCTION not in prompts[1]
  assert ANSWER_INSTRUCTION in prompts[2]
  assert "<thought>I guess.</thought>\n(answering is not allowed yet" in prompts[1]
  _assert_fresh_chat_prompts(traj, policy)


def test_reasoning_reads_each_chunk_in_its_own_turn():
  steps = [Step(f"<thought>Read the page.</thought><access> {URL} </access>"),
           Step("<thought>alpha part</thought>"), Step("<thought>bravo part</thought>"),
           Step("<think>h</think><thought>charlie part</thought>"),
           Step("<thought>Done.</thought><answer> Ann Lee </answer>")]
  traj, policy, _ = run_agent(steps, variant="reasoning")
  assert traj.status == "answered"
  assert [t.kind for t in traj.turns] == ["act", "read", "read", "read", "act"]
  prompts = [p.messages[0]["content"] for p in policy.prompts]
  for i in range(3):
    shown = prompts[i + 1]
    assert f"You are reading part {i + 1} of 3 of the page {URL}" in shown
    assert PARAS[i] in shown
    assert all(PARAS[j] not in shown for j in range(3) if j != i)
  assert f"[read {URL} part 1/3] alpha part" in prompts[2]
  assert f"[read {URL} part 3/3] charlie part" in prompts[4]
  assert all(p not in prompts[4] for p in PARAS)  # notes replace the raw chunks
  _assert_fresh_chat_prompts(traj, policy)


def test_reasoning_tool_call_while_reading_drops_the_rest_of_the_page():
  steps = [Step(f"<access> {URL} </access>"),
           Step("<thought>alpha part</thought><search> bravo </search>"),
           Step("<answer> Ann Lee </answer>")]
  traj, policy, tools = run_agent(steps, variant="reasoning")
  assert traj.status == "answered"
  assert [t.kind for t in traj.turns] == ["act", "read", "act"]
  assert tools.calls == [("access", URL), ("search", ["bravo"], None)]
  last = policy.prompts[2].messages[0]["content"]
  assert "You are reading" not in last and PARAS[1] not in last
  assert f"[read {URL} part 1/3] alpha part" in last


@pytest.mark.parametrize("step,status", [
    (Step("", error=PolicyUnavailable("gone")), "aborted"),
    (Step("", error=ContextTooLong("too long")), "context_full"),
])
def test_reasoning_policy_failures(step, status):
  traj, _, _ = run_agent([Step("<search> q </search>"), step], variant="reasoning")
  assert traj.status == status and traj.num_turns == 1


def test_reasoning_max_turns_and_tool_errors():
  traj, _, _ = run_agent(itertools.repeat(Step("<thought>hm</thought>")), variant="reasoning",
                         max_turns=4)
  assert traj.status == "max_turns" and traj.num_turns == 4
  traj, _, _ = run_agent(itertools.repeat(Step("<search> bad </search>")), variant="reasoning",
                         tools=FakeTools(failing={"bad"}), max_tool_errors=3)
  assert traj.status == "env_error" and traj.num_turns == 3


def test_reasoning_timeout_cuts_a_slow_policy():
  t = time.monotonic()
  traj, _, _ = run_agent([Step("<search> q </search>"), Step("<answer> x </answer>", sleep=5.0)],
                         variant="reasoning", max_wall_s=0.3)
  assert traj.status == "timeout" and traj.prediction is None
  assert time.monotonic() - t < 3.0


# -- eval harness: resuming ------------------------------------------------------------------

class AnsweringPolicy:
  """Answers every question at once; questions in `down` find the endpoint gone."""

  chat = False

  def __init__(self, down=()):
    self.tokenizer = build_tokenizer()
    self.down, self.calls, self.temperatures = set(down), 0, set()

  async def complete(self, prompt, sampling, session_id=None):
    self.calls += 1
    self.temperatures.add(sampling.temperature)
    if any(q in prompt.text for q in self.down):
      raise PolicyUnavailable("decode server gone")
    ids = self.tokenizer.encode("<answer> Ann Lee </answer>")
    return Completion("<answer> Ann Lee </answer>", ids, [-0.5] * len(ids), [1] * len(ids),
                      "stop", False)

  async def end_session(self, session_id):
    pass


def _eval(tmp_path, policy, k=2, tools=None, agent=None, reward=None, **eval_cfg):
  from asearcher_jax.config import Config
  from asearcher_jax.eval import evaluate
  data = tmp_path / "qa.jsonl"
  if not data.exists():
    data.write_text("".join(json.dumps({"qid": q, "question": f"Who founded {q}?",
                                        "answer": ["Ann Lee"]}) + "\n" for q in ("A", "B")))
  cfg = Config(model={"path": str(tmp_path)}, agent=agent or {},  # the policy is given
               reward=reward or {},
               eval={"data": [str(data)], "k": k, "out_dir": str(tmp_path / "out"),
                     "concurrency": 2} | eval_cfg)
  out = []
  report = asyncio.run(evaluate(cfg, policy=policy, tools=tools or FakeTools(), progress=False,
                                echo=out.append))
  return report, out


def test_eval_runs_and_reports(tmp_path):
  report, out = _eval(tmp_path, AnsweringPolicy())
  assert report["scoring"] == {"normalization": "squad", "f1_variant": "set"}
  assert ("scoring: SQuAD v1.1 answer normalisation (official); F1 over token sets "
          "(ASearcher)") in out
  ds = report["datasets"]["qa"]
  assert ds["questions"] == 2 and ds["samples"] == 4 and ds["status"] == {"answered": 4}
  assert ds["metrics"]["em"] == {"avg@2": 1.0, "pass@2": 1.0, "questions": 2}
  policy = AnsweringPolicy()
  assert _eval(tmp_path, policy)[0]["datasets"] == report["datasets"] and policy.calls == 0


def test_eval_rerun_of_an_aborted_episode_counts_it_once(tmp_path):
  report, _ = _eval(tmp_path, AnsweringPolicy(down={"Who founded B?"}))
  ds = report["datasets"]["qa"]
  assert ds["status"] == {"answered": 2, "aborted": 2}
  assert ds["metrics"]["em"] == {"avg@2": 1.0, "pass@2": 1.0, "questions": 1}
  policy = AnsweringPolicy()
  report, _ = _eval(tmp_path, policy)
  assert policy.calls == 2  # only the aborted episodes ran again
  ds = report["datasets"]["qa"]
  assert ds["metrics"]["em"] == {"avg@2": 1.0, "pass@2": 1.0, "questions": 2}
  assert ds["samples"] == 4 and ds["status"] == {"answered": 4}
  assert not any("aborted" in p for p in report["problems"])


class SearchingPolicy(AnsweringPolicy):
  """Searches for the question once, then answers."""

  async def complete(self, prompt, sampling, session_id=None):
    if "</information>" in prompt.text.rsplit("Who founded", 1)[1]:  # a search came back
      return await super().complete(prompt, sampling, session_id)
    self.calls += 1
    question = re.search(r"Who founded .\?", prompt.text)[0]
    text = f"<search> {question} </search>"
    ids = self.tokenizer.encode(text)
    return Completion(text, ids, [-0.5] * len(ids), [1] * len(ids), "stop", False)


def test_eval_leaves_out_and_reruns_episodes_a_tool_server_ended(tmp_path):
  """Episodes that a retrieval server's failures ended are not the policy's wrong answers."""
  policy = SearchingPolicy()
  report, out = _eval(tmp_path, policy, tools=FakeTools(failing={"Who founded B?"}),
                      agent={"max_tool_errors": 1})
  assert policy.calls == 6  # A: search, answer; B: a failed search
  ds = report["datasets"]["qa"]
  assert ds["status"] == {"answered": 2, "env_error": 2}
  assert ds["metrics"]["em"] == {"avg@2": 1.0, "pass@2": 1.0, "questions": 1}
  assert any(p.startswith("2 episodes ended by a failing tool server or judge (rerun to retry")
             for p in report["problems"])
  policy = SearchingPolicy()
  report, _ = _eval(tmp_path, policy, agent={"max_tool_errors": 1})
  assert policy.calls == 4  # only B's episodes ran again
  assert report["datasets"]["qa"]["status"] == {"answered": 4}


def test_eval_resume_never_mixes_scorings_and_rescores_changed_golds(tmp_path):
  """A resumed run reused finished episodes' scores whatever the scoring now asked, and
  scored against golds the data file no longer has."""
  report, _ = _eval(tmp_path, AnsweringPolicy(down={"Who founded B?"}))
  with pytest.raises(DataError, match="scored with"):
    _eval(tmp_path, AnsweringPolicy(), reward={"f1_variant": "bag"})
  data = tmp_path / "qa.jsonl"
  data.write_text(data.read_text().replace('"qid": "A", "question": "Who founded A?", '
                                           '"answer": ["Ann Lee"]',
                                           '"qid": "A", "question": "Who founded A?", '
                                           '"answer": ["Bob Stone"]'))
  policy = AnsweringPolicy()
  report, _ = _eval(tmp_path, policy)
  assert policy.calls == 4  # B (aborted before) and A (its gold changed)
  assert report["datasets"]["qa"]["metrics"]["em"]["avg@2"] == 0.5  # A's "Ann Lee" is wrong now


def test_eval_resume_never_mixes_episodes_run_with_other_agent_settings(tmp_path):
  """A resumed run with another turn limit or prompt kept the episodes run before and put
  them in one score with its own."""
  _eval(tmp_path, AnsweringPolicy(down={"Who founded B?"}), agent={"max_turns": 4})
  with pytest.raises(DataError, match=r'run with \{"max_turns": 4\}, this run asks '
                                      r'\{"max_turns": 3\}'):
    _eval(tmp_path, AnsweringPolicy(), agent={"max_turns": 3})
  traces = tmp_path / "out" / "traces.jsonl"
  lines = [json.loads(line) for line in traces.read_text().splitlines()]
  assert all(t["agent"]["max_turns"] == 4 for t in lines)
  # Lines of a run that did not record its settings are taken at their word.
  traces.write_text("".join(json.dumps({**t, "agent": None}) + "\n" for t in lines))
  policy = AnsweringPolicy()
  report, _ = _eval(tmp_path, policy, agent={"max_turns": 3})
  assert policy.calls == 2 and report["agent"]["max_turns"] == 3  # B's aborted episodes
  assert report["agent"]["topk"] == 5  # unset: the search client's, as the agent uses it


def test_eval_rerun_asks_the_judge_again_where_it_failed(tmp_path, monkeypatch):
  from asearcher_jax.reward.judge import Judge, JudgeVerdict
  up = [False]

  async def judge(self, question, prediction, golds):
    return (JudgeVerdict(True, "same", None, 1) if up[0]
            else JudgeVerdict(None, "", "HTTP 500 (after 4 attempts)", 4))
  monkeypatch.setattr(Judge, "judge", judge)
  report, _ = _eval(tmp_path, AnsweringPolicy(), judge=True)
  assert "judge" not in report["datasets"]["qa"]["metrics"]
  assert any("could not be judged" in p for p in report["problems"])
  up[0] = True
  policy = AnsweringPolicy()
  report, _ = _eval(tmp_path, policy, judge=True)
  assert policy.calls == 4 and not report["problems"]
  assert report["datasets"]["qa"]["metrics"]["judge"] == {"avg@2": 1.0, "pass@2": 1.0,
                                                          "questions": 2}


def test_eval_saved_trajectories_survive_a_crash_between_the_two_files(tmp_path, monkeypatch):
  """The trace line marks an episode done, so the token record must be down before it: a
  crash between the two appends lost the record for good."""
  from asearcher_jax.eval import harness
  real, crash = harness.append_lines, [True]

  def append_lines(path, records, **kw):
    real(path, records, **kw)
    if crash[0] and path.endswith("traces.jsonl"):
      crash[0] = False
      raise SystemError("killed")  # the process dies once the first trace line is down
  monkeypatch.setattr(harness, "append_lines", append_lines)
  with pytest.raises(SystemError, match="killed"):
    _eval(tmp_path, AnsweringPolicy(), k=1, save_trajectories=True, concurrency=1)
  _eval(tmp_path, AnsweringPolicy(), k=1, save_trajectories=True, concurrency=1)
  saved = [json.loads(line)["qid"] for line in
           (tmp_path / "out" / "trajectories.jsonl").read_text().splitlines()]
  assert set(saved) == {"A", "B"}


def test_eval_rerun_after_a_torn_trace_line(tmp_path):
  report, _ = _eval(tmp_path, AnsweringPolicy())
  traces = tmp_path / "out" / "traces.jsonl"
  lines = traces.read_text().splitlines()
  traces.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
  policy = AnsweringPolicy()
  again, _ = _eval(tmp_path, policy)
  assert policy.calls == 1 and again["datasets"] == report["datasets"]


def test_eval_temperature_samples_the_episodes_and_a_resume_cannot_mix_temperatures(tmp_path):
  policy = AnsweringPolicy()
  report, _ = _eval(tmp_path, policy, temperature=0.6)
  assert policy.temperatures == {0.6}  # not agent.temperature (1.0), which rollouts keep
  assert report["sampling"] == {"temperature": 0.6, "top_p": 1.0, "top_k": 0}
  with pytest.raises(DataError, match="sampled with"):
    _eval(tmp_path, AnsweringPolicy())  # the same out_dir at agent.temperature
  policy = AnsweringPolicy()
  assert _eval(tmp_path, policy, temperature=0.6)[0]["datasets"] == report["datasets"]
  assert policy.calls == 0
