"""The agent's LLM calls: prompt files, one `OpenAIChat` per endpoint, JSON replies checked for
the fields each prompt asks for (a reply without them is asked again, then counted as a failed
round), endpoint trouble raised as `LLMUnavailable` (the seed is retried on the next run)."""

from __future__ import annotations

import os
import re
from importlib import resources
from typing import Any

from asearcher_jax.errors import ConfigError
from asearcher_jax.reward.judge import OpenAIChat, check_template, parse_json_reply
from asearcher_jax.synth.state import LLMUnavailable, Rejected

# Prompt name -> its placeholders. Files: asearcher_jax/synth/prompts/<name>.txt, or the same
# name in `synth.prompts_dir` (a missing file there falls back to the packaged one).
PROMPTS: dict[str, tuple[str, ...]] = {
    "base_qa": ("title", "fact", "page"),
    "seed_fact": ("question", "answer", "title", "page"),
    "choose_action": ("question", "answer", "facts", "entities", "history", "actions"),
    "inject": ("question", "answer", "entity", "title", "page"),
    "compose": ("question", "answer", "entity", "description", "fact"),
    "fuzz": ("question", "answer", "facts"),
    "quality": ("question", "answer", "facts"),
    "solve": ("question",),
    "alternative": ("question", "answer", "candidate", "facts"),
}

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def _answer_value(value) -> str | None:
  if isinstance(value, (list, tuple)):  # ["X", "Y"]: several names for one answer
    value = ", ".join(str(v) for v in value if isinstance(v, (str, int, float)))
  if not isinstance(value, (str, int, float)):
    return None
  return str(value).strip() or None


def direct_answer(text: str | None) -> str | None:
  """A tool-free answer: the JSON "answer", else an <answer> tag, else the last line of text.
  Small models drift from the format; their answer still counts for difficulty. None when the
  reply holds no answer (empty, a JSON object whose answer is null or missing, only a code
  fence): that is no sample, not a wrong one."""
  if not text or not text.strip():
    return None
  obj = parse_json_reply(text, lambda o: "answer" in o) or parse_json_reply(text)
  if obj is not None:
    return _answer_value(obj.get("answer"))
  tags = _ANSWER_TAG.findall(text)
  if tags:
    return tags[-1].strip() or None
  lines = [line.strip() for line in text.splitlines()
           if line.strip() and not line.strip().startswith("```")]
  return lines[-1][:200] if lines else None


# A request the endpoint refuses for what it is (too long a prompt, a parameter it rejects)
# fails its round; any other refusal (401, 404: a wrong key or URL) is endpoint trouble.
_REFUSED = (400, 413, 422)


def _raise(name: str, reply) -> None:
  if reply.status in _REFUSED:
    raise Rejected(f"{name}:refused", reply.error or "")
  if reply.unavailable:
    raise LLMUnavailable(f"{name}: {reply.error}")
  raise Rejected(f"{name}:unparseable", reply.error or "")


def load_prompts(prompts_dir: str | None = None) -> dict[str, str]:
  if prompts_dir is not None and not os.path.isdir(prompts_dir):
    raise ConfigError(f"synth.prompts_dir={prompts_dir}: no such directory")
  out = {}
  for name, fields in PROMPTS.items():
    path = os.path.join(prompts_dir, f"{name}.txt") if prompts_dir else None
    if path is not None and os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        text = f.read()
    else:
      path = f"{name}.txt"
      text = resources.files("asearcher_jax.synth").joinpath("prompts", path).read_text("utf-8")
    try:
      out[name] = check_template(text, fields, path)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  return out


def _typed(fields: dict[str, type | tuple[type, ...]]):
  """A reply object has every field, of its type (JSON true is not a number here)."""
  def ok(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))

  return lambda obj: all(ok(obj.get(k), t) for k, t in fields.items())


class SynthLLM:
  """`ask(name, fields, **values)`: the prompt `name` filled with `values`, sent to the action
  model, and its JSON object with `fields` (name -> type) returned. `solve` asks the solver."""

  def __init__(self, synth):
    self.cfg = synth
    self.prompts = load_prompts(synth.prompts_dir)
    self.chat = OpenAIChat(synth.llm, seed=synth.seed)
    self.solver = OpenAIChat(synth.solver, seed=synth.seed + 1) if synth.solver else self.chat

  @property
  def requests(self) -> int:
    return self.chat.requests + (self.solver.requests if self.solver is not self.chat else 0)

  def render(self, name: str, **values: Any) -> str:
    return self.prompts[name].format(**{k: str(v) for k, v in values.items()})

  async def ask(self, name: str, fields: dict, **values: Any) -> dict:
    accept = _typed(fields)
    reply = await self.chat.ask(self.render(name, **values),
                                lambda text: parse_json_reply(text, accept),
                                what=f"{name} reply")
    if reply.value is not None:
      return reply.value
    _raise(name, reply)

  async def solve(self, question: str) -> str:
    """One tool-free answer from the solver (`direct_answer` of its reply); a reply that holds
    none, asked again, is `Rejected` ("solve:unparseable")."""
    reply = await self.solver.ask(self.render("solve", question=question), direct_answer,
                                  temperature=self.cfg.solver_temperature, what="solve reply")
    if reply.value is None:
      _raise("solve", reply)
    return reply.value

  async def close(self) -> None:
    await self.chat.close()
    if self.solver is not self.chat:
      await self.solver.close()
