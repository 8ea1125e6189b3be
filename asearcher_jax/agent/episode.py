"""The ASearcher agent loop: one episode of <search>/<access>/<answer> turns against a policy
and the search tools, producing a `Trajectory`.

Turn rules (the `base` variant; `reasoning` is in reasoning.py):
  * every LLM call is a turn, reading turns included; `max_turns` bounds them;
  * an act turn stops at the first closing tool tag; a reading turn (one page chunk) stops at
    `</think>` too. An accessed page is read one chunk per turn; once the model has written its
    notes on a chunk, the chunk is replaced in the context by a stub of `stub_chars` characters;
    a tool call made while reading drops the rest of that page;
  * a turn with no call that ends the model's message (EOS) ends the episode (`no_answer`); one
    cut by `max_new_tokens` continues in the next turn, and a call split across such turns
    counts (the action is parsed from all the model wrote since the last observation);
  * the context budget `max_context_tokens` bounds prompt + generation (`context_full`); the
    wall clock `max_wall_s` bounds the episode (`timeout`); `max_tool_errors` failed tool calls
    in a row end it (`tool_error`, or `env_error` when a tool server failed among them); a
    policy endpoint that disappears ends it (`aborted`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import hashlib
import random
import time
import uuid

from asearcher_jax.agent.config import AgentSection
from asearcher_jax.agent.context import Context
from asearcher_jax.agent.parse import Action, parse_action
from asearcher_jax.agent.policy import Completion, ContextTooLong, Policy, PolicyUnavailable, Prompt
from asearcher_jax.agent.prompts import INVALID_INSTRUCTION, VALID_INSTRUCTION, render
from asearcher_jax.agent.trajectory import Trajectory, Turn
from asearcher_jax.data.qa import QAItem
from asearcher_jax.inference.protocol import SamplingParams
from asearcher_jax.reward.scorer import Scorer
from asearcher_jax.tools.client import SearchClient, chunks

ACT_STOPS = ("</search>", "</access>", "</answer>")


@dataclasses.dataclass
class Observation:
  content: str
  stub: str | None = None  # set for a page chunk: what replaces it once read
  ok: bool = True
  error: str | None = None
  env: bool = False  # the failure was the environment's (`ToolError.environment`)


class ToolFailures:
  """The run of failed tool calls that ends an episode at `max_tool_errors`. The end is the
  environment's (`env_error`) when any failure of the run was: the policy alone would not
  have ended there, and training on it would teach the policy that searching fails."""

  def __init__(self, limit: int):
    self.limit, self.run, self.env = limit, 0, False

  def end(self, observations: list[Observation]) -> str | None:
    """The status that ends the episode after this call's `observations`, or None."""
    failed = [o for o in observations if not o.ok]
    if not failed:
      self.run, self.env = 0, False
      return None
    self.run, self.env = self.run + 1, self.env or any(o.env for o in failed)
    if self.run < self.limit:
      return None
    return "env_error" if self.env else "tool_error"


def derive_seed(*parts) -> int:
  """A 63-bit seed from any parts (stable across processes, unlike `hash`)."""
  digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
  return int.from_bytes(digest[:8], "little") >> 1


def turn_seed(seed: int | None, turn: int) -> int | None:
  """A per-turn sampling seed derived from the episode's, so reruns sample the same tokens."""
  return None if seed is None else derive_seed(seed, turn)


class Agent:
  """Runs episodes; safe to share between concurrent episodes (it holds no episode state)."""

  def __init__(self, cfg: AgentSection, policy: Policy, tools: SearchClient):
    self.cfg, self.policy, self.tools = cfg, policy, tools
    tok = policy.tokenizer
    self.eos_text = tok.eos_token if tok is not None else None

  # -- shared by both variants ----------------------------------------------------------------
  def new_trajectory(self, item: QAItem, *, sample: int, group_id: str, seed: int | None,
                     valid_instruction: bool | None, submit_version: int) -> Trajectory:
    if valid_instruction is None:
      valid_instruction = random.Random(seed).random() < self.cfg.valid_instruction_ratio
    c = self.cfg
    return Trajectory(
        qid=item.qid, question=item.question, answers=list(item.answers),
        aug_answers=list(item.aug_answers), group_id=group_id or item.qid, sample=sample,
        valid_instruction=valid_instruction, submit_version=submit_version,
        sampling={"temperature": c.temperature, "top_p": c.top_p, "top_k": c.top_k,
                  "max_new_tokens": c.max_new_tokens, "seed": seed},
        timings={"start": time.time()})

  def sampling(self, seed: int | None, turn: int, budget: int, stop: tuple[str, ...]):
    c = self.cfg
    return SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                          seed=turn_seed(seed, turn), max_new_tokens=min(c.max_new_tokens, budget),
                          stop=stop)

  async def call_tool(self, action: Action) -> list[Observation]:
    """Runs a search or access; never raises. A page comes back as one observation per chunk
    (when `read_pages`), each with its stub."""
    if action.kind == "invalid":
      msg = f"Tool error (bad_request): empty <{action.tool}> call"
      return [Observation(msg, ok=False, error=msg)]
    if action.kind == "search":
      [result] = await self.tools.search([action.argument], self.cfg.topk)
    else:
      result = await self.tools.access(action.argument)
    if not result.ok:
      return [Observation(result.render(), ok=False, error=result.error.render(),
                          env=result.environment_failed)]
    if action.kind == "search":
      return [Observation(result.render())]
    parts = chunks(self.tools, result)
    if not self.cfg.read_pages or len(parts) == 0:
      return [Observation(result.render(chunk_chars=self.tools.cfg.chunk_chars,
                                        max_chunks=self.tools.cfg.max_chunks))]
    out = []
    for i in range(len(parts)):
      text = result.render(chunk=i, chunk_chars=self.tools.cfg.chunk_chars,
                           max_chunks=self.tools.cfg.max_chunks)
      head = f"{action.argument} (part {i + 1} of {len(parts)})\n"
      marker, _, body = text.partition("\n")
      stub = f"{head}{marker}\n{body[:self.cfg.stub_chars].rstrip()} ... (read)"
      out.append(Observation(head + text, stub=stub))
    return out

  async def use_tool(self, turn: Turn, action: Action,
                     failures: ToolFailures) -> tuple[list[Observation], str | None]:
    """Runs the turn's tool call and records it on the turn: its observations, and the
    status that ends the episode (a run of failures), or None."""
    t0 = time.monotonic()
    observations = await self.call_tool(action)
    turn.tool_s = time.monotonic() - t0
    turn.tool_ok = all(o.ok for o in observations)
    turn.tool_error = next((o.error for o in observations if o.error), None)
    return observations, failures.end(observations)

  def finish(self, traj: Trajectory, status: str, error: str | None = None) -> Trajectory:
    traj.status, traj.error = status, error
    traj.timings["end"] = time.time()
    traj.timings["wall_s"] = traj.timings["end"] - traj.timings["start"]
    traj.timings["llm_s"] = sum(t.llm_s for t in traj.turns)
    traj.timings["tool_s"] = sum(t.tool_s for t in traj.turns)
    return traj

  async def call(self, traj: Trajectory, kind: str, prompt: Prompt, sampling: SamplingParams,
                 session_id: str | None, deadline: float | None,
                 prompt_tokens: int) -> Completion | None:
    """One LLM call, recorded as a turn (its sampled tokens appended to the record). None when
    the call ended the episode (timeout, context_full, aborted): the status is set. A prompt
    with `said` continues a message cut by max_new_tokens."""
    t0 = time.monotonic()
    try:
      coro = self.policy.complete(prompt, sampling, session_id)
      c = await (coro if deadline is None else asyncio.wait_for(
          coro, max(0.0, deadline - time.monotonic())))
    except asyncio.TimeoutError:
      self.finish(traj, "timeout")
      return None
    except ContextTooLong as e:
      self.finish(traj, "context_full", str(e))
      return None
    except PolicyUnavailable as e:
      self.finish(traj, "aborted", str(e))
      return None
    traj.transcript.append({"role": "policy", "text": c.text})
    span = (0, 0)
    if c.ids is not None and prompt.ids is not None:
      span = traj.record_call(prompt.ids, c.ids, c.logprobs, c.versions)
    traj.turns.append(Turn(kind, *span, prompt_tokens=prompt_tokens,
                           finish_reason=c.finish_reason, llm_s=time.monotonic() - t0,
                           continues=bool(prompt.said)))
    return c

  # -- the base agent --------------------------------------------------------------------------
  async def run(self, item: QAItem, *, sample: int = 0, group_id: str = "",
                seed: int | None = None, valid_instruction: bool | None = None,
                submit_version: int = -1) -> Trajectory:
    if self.cfg.variant == "reasoning":
      from asearcher_jax.agent.reasoning import run_reasoning
      return await run_reasoning(self, item, sample=sample, group_id=group_id, seed=seed,
                                 valid_instruction=valid_instruction,
                                 submit_version=submit_version)
    traj = self.new_trajectory(item, sample=sample, group_id=group_id, seed=seed,
                               valid_instruction=valid_instruction, submit_version=submit_version)
    session = f"{traj.group_id}/{sample}/{uuid.uuid4().hex[:8]}"
    try:
      return await self._run_base(traj, session, seed)
    finally:
      await self.policy.end_session(session)

  def _prompt_text(self, traj: Trajectory) -> str:
    name = self.cfg.prompt
    if self.cfg.template == "chat" and name == "asearcher":
      name = "asearcher_chat"
    return render(name, question=traj.question, date=datetime.date.today().isoformat(),
                  instruction=VALID_INSTRUCTION if traj.valid_instruction else INVALID_INSTRUCTION)

  async def _run_base(self, traj: Trajectory, session: str, seed: int | None) -> Trajectory:
    cfg = self.cfg
    ctx = Context(self._prompt_text(traj), template=cfg.template,
                  tokenizer=self.policy.tokenizer, eos_text=self.eos_text)
    traj.transcript.append({"role": "prompt", "text": ctx.pieces[0].text})
    deadline = None if cfg.max_wall_s is None else time.monotonic() + cfg.max_wall_s
    pending: collections.deque[Observation] = collections.deque()
    failures, said, continued = ToolFailures(cfg.max_tool_errors), "", False
    reading = None  # (index, stub) of the chunk being read, until its note is finished
    while True:
      if deadline is not None and time.monotonic() > deadline:
        return self.finish(traj, "timeout")
      if len(traj.turns) >= cfg.max_turns:
        return self.finish(traj, "max_turns")
      if pending and not continued:  # a note cut by max_new_tokens is finished first
        obs = pending.popleft()
        index = ctx.add_observation(obs.content)
        traj.transcript.append({"role": "tool", "text": ctx.pieces[index].content})
        if obs.stub is not None:
          reading = (index, obs.stub)
      elif not continued:
        ctx.reopen()
      kind = "read" if reading else "act"
      budget = cfg.max_context_tokens - ctx.num_tokens
      if budget < 1:
        return self.finish(traj, "context_full")
      stops = ACT_STOPS + ("</think>",) if kind == "read" and cfg.template == "plain" else ACT_STOPS
      sampling = self.sampling(seed, len(traj.turns), budget, stops)
      prompt = ctx.prompt()
      if continued:  # what the message holds so far: a server that cuts the stop string off
        prompt = dataclasses.replace(prompt, said=said)  # restores it from the whole message
      c = await self.call(traj, kind, prompt, sampling, session, deadline, ctx.num_tokens)
      if c is None:
        return traj
      turn = traj.turns[-1]
      ctx.add_policy(c)
      # A call cut by max_new_tokens continues in the next turn: parse all the model wrote
      # since the last observation.
      said = said + c.text if continued else c.text
      action = parse_action(said)
      continued = action.kind == "none" and c.finish_reason == "length"
      if reading and not continued:
        ctx.replace(*reading)
        reading = None
      turn.action, turn.argument = action.kind, action.argument
      if action.kind == "answer":
        traj.prediction = action.argument
        return self.finish(traj, "answered")
      if action.kind == "none":
        if c.finish_reason == "max_len":
          return self.finish(traj, "context_full")
        if c.finish_reason == "cancelled":
          return self.finish(traj, "aborted", "the generation was cancelled")
        if c.eos and kind == "act":
          return self.finish(traj, "no_answer")
        continue
      pending.clear()  # a call made while reading a page ends that page
      observations, end = await self.use_tool(turn, action, failures)
      if end:
        return self.finish(traj, end, turn.tool_error)
      pending.extend(observations)


async def score(traj: Trajectory, scorer: Scorer, *, with_judge: bool | None = None) -> Trajectory:
  """Sets the record's reward, metrics and format flag. A judge that failed where the reward
  is its verdict ends the episode as `env_error`: the 0 it leaves is not the policy's."""
  s = await scorer.score(question=traj.question, prediction=traj.prediction,
                         answers=traj.answers, aug_answers=traj.aug_answers,
                         generations=traj.generations(),
                         valid_instruction=traj.valid_instruction, with_judge=with_judge)
  traj.reward, traj.metrics, traj.format_ok = s.reward, dict(s.metrics), s.format_ok
  if s.verdict is not None and s.verdict.error:
    traj.metrics.pop("judge", None)
    traj.error = traj.error or f"judge: {s.verdict.error}"
    if scorer.cfg.metric == "judge":
      traj.status = "env_error"
  return traj
