"""The reasoning-model agent (ASearcher's QwQ agent): every turn is a fresh single-message prompt
built from the question and a bounded history of the agent's own notes, so a long episode never
needs a long context. Hidden reasoning (`<think>...</think>`) is dropped; only the `<thought>`
note and the action enter the history. A search phase allows only <search>/<access>; answers
are allowed once `answer_after_acts` acts are done (ASearcher's enforced minimum of turns). Each
page chunk is read in its own turn, whose note replaces the chunk."""

from __future__ import annotations

import datetime
import time

from asearcher_jax.agent.episode import ToolFailures
from asearcher_jax.agent.parse import extract_thought, parse_action
from asearcher_jax.agent.policy import Prompt
from asearcher_jax.agent.prompts import ANSWER_INSTRUCTION, render
from asearcher_jax.data.qa import QAItem

SEARCH_NOTE_CHARS = 300  # of each search result kept in the history


def _prompt(agent, text: str) -> Prompt:
  messages = [{"role": "user", "content": text}]
  tok = agent.policy.tokenizer
  rendered = tok.apply_chat_template(messages, add_generation_prompt=True) if tok else text
  return Prompt(tok.encode(rendered) if tok else None, rendered, messages)


def visible(text: str, thinking: bool) -> str:
  """What a reply says outside its hidden reasoning: after the last </think>, up to a <think>
  it leaves open. `thinking`: the prompt opened one (QwQ's template ends in "<think>\n"). A
  reply cut off while it still thinks says nothing, whatever tags its reasoning holds."""
  text = ("<think>" if thinking else "") + text
  return text.rsplit("</think>", 1)[-1].split("<think>", 1)[0]


def _short(content: str) -> str:
  lines = [ln[:SEARCH_NOTE_CHARS] + ("..." if len(ln) > SEARCH_NOTE_CHARS else "")
           for ln in content.splitlines()]
  return "\n".join(lines)


async def run_reasoning(agent, item: QAItem, *, sample: int, group_id: str, seed: int | None,
                        valid_instruction: bool | None, submit_version: int):
  cfg = agent.cfg
  traj = agent.new_trajectory(item, sample=sample, group_id=group_id, seed=seed,
                              valid_instruction=valid_instruction, submit_version=submit_version)
  history: list[str] = []
  reading: list[tuple[str, int, int, str]] = []  # (url, part, parts, content)
  acts, failures = 0, ToolFailures(cfg.max_tool_errors)
  deadline = None if cfg.max_wall_s is None else time.monotonic() + cfg.max_wall_s
  today = datetime.date.today().isoformat()
  prompt_name = "reasoning_act" if cfg.prompt in ("asearcher", "reasoning") else cfg.prompt
  while True:
    if deadline is not None and time.monotonic() > deadline:
      return agent.finish(traj, "timeout")
    if len(traj.turns) >= cfg.max_turns:
      return agent.finish(traj, "max_turns")
    shown = "\n\n".join(history)[-cfg.history_chars:] if cfg.history_chars else ""
    shown = shown or "(nothing yet)"
    answering = acts >= cfg.answer_after_acts
    if reading:
      url, part, parts, content = reading.pop(0)
      text = render("reasoning_read", question=traj.question, date=today, history=shown,
                    url=url, part=str(part), parts=str(parts), content=content)
      kind = "read"
    else:
      text = render(prompt_name, question=traj.question, date=today, history=shown,
                    answer_instruction=ANSWER_INSTRUCTION if answering else "")
      kind = "act"
    prompt = _prompt(agent, text)
    budget = cfg.max_context_tokens - (len(prompt.ids) if prompt.ids else len(text) // 4)
    if budget < 1:
      return agent.finish(traj, "context_full")
    traj.transcript.append({"role": "prompt", "text": text})
    sampling = agent.sampling(seed, len(traj.turns), budget, ())
    c = await agent.call(traj, kind, prompt, sampling, None, deadline, len(prompt.ids or ()))
    if c is None:
      return traj
    turn = traj.turns[-1]
    if c.finish_reason == "cancelled":
      return agent.finish(traj, "aborted", "the generation was cancelled")
    if c.finish_reason == "max_len":
      return agent.finish(traj, "context_full")
    thinking = prompt.text.rstrip().endswith("<think>")  # the template opened the reasoning
    thought = extract_thought(c.text)
    action = parse_action(visible(c.text, thinking))
    if kind == "read":
      history.append(f"[read {url} part {part}/{parts}] {thought or '(no note)'}")
      if action.kind in ("search", "access", "invalid"):
        reading.clear()
      else:
        continue
    if action.kind == "answer" and not answering:
      turn.action = "ignored_answer"  # too early: ASearcher's enforced minimum of acts
      history.append(f"<thought>{thought}</thought>\n(answering is not allowed yet: keep "
                     "searching)")
      continue
    turn.action, turn.argument = action.kind, action.argument
    if action.kind == "answer":
      traj.prediction = action.argument
      return agent.finish(traj, "answered")
    if action.kind == "none":
      history.append(f"<thought>{thought}</thought>")
      continue
    acts += 1
    observations, end = await agent.use_tool(turn, action, failures)
    history.append(f"<thought>{thought}</thought>\n<{action.tool}> {action.argument} "
                   f"</{action.tool}>")
    if end:
      return agent.finish(traj, end, turn.tool_error)
    if action.kind == "access" and turn.tool_ok and observations[0].stub is not None:
      reading = [(action.argument, i + 1, len(observations), o.content)
                 for i, o in enumerate(observations)]
      history.append(f"<information>{action.argument}: {len(observations)} part(s) to read"
                     "</information>")
    else:
      history.append("<information>\n" + "\n".join(_short(o.content) for o in observations)
                     + "\n</information>")
    traj.transcript.append({"role": "tool", "text": "\n".join(o.content for o in observations)})
