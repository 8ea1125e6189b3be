"""What the agent reads out of one model turn: the action, by fixed rules that never raise.

Rules (tested as a table in tests/test_agent_units.py):
  1. Tags are `<search>`, `<access>` and `<answer>`, matched case-insensitively.
  2. The action is the first *complete* call in text order (position is the priority: with
     stop strings a turn normally ends at its first closing tag). Complete calls after it are
     counted in `extra_calls` and ignored, as is any text after the action.
  3. A call's argument is the text between its closing tag and the nearest opening tag of the
     same kind before it, so `<search><search> q </search>` searches "q". Arguments are
     stripped; an access URL is its first whitespace-separated word without <>, quotes or
     brackets around it.
  4. An `<answer>` left open at the end of the turn (the model stopped or ran out of tokens)
     still answers, with `closed=False`; an open `<search>`/`<access>` is not executed.
  5. A call whose argument is empty is `invalid` (the agent answers it with a tool error);
     no call at all is `none`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

TOOLS = ("search", "access", "answer")
ActionKind = Literal["search", "access", "answer", "invalid", "none"]

_CLOSE = re.compile(r"</(search|access|answer)\s*>", re.IGNORECASE)
_OPEN = {t: re.compile(rf"<{t}\s*>", re.IGNORECASE) for t in TOOLS}
_THOUGHT = re.compile(r"<thought>(.*?)(?:</thought>|$)", re.IGNORECASE | re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Action:
  kind: ActionKind
  tool: str = ""  # the tag, also for an invalid call
  argument: str = ""
  start: int = 0  # character span of the call in the turn's text
  end: int = 0
  closed: bool = True
  extra_calls: int = 0
  rule: str = ""  # which rule decided, for traces


def _complete_calls(text: str) -> list[tuple[str, int, int, int]]:
  """(tool, start of opening tag, end of opening tag, end of closing tag) in text order."""
  calls = []
  for close in _CLOSE.finditer(text):
    tool = close.group(1).lower()
    opens = [m for m in _OPEN[tool].finditer(text, 0, close.start())]
    if not opens:
      continue
    # The nearest opening tag before this close that is not already used by an earlier call.
    last_end = calls[-1][3] if calls else 0
    opens = [m for m in opens if m.start() >= last_end]
    if opens:
      calls.append((tool, opens[-1].start(), opens[-1].end(), close.end()))
  return calls


def clean_url(arg: str) -> str:
  """The first word, without the quotes or brackets a model wraps it in; a closing bracket the
  URL opened itself stays (".../wiki/Mercury_(planet)")."""
  word = arg.split()[0] if arg.split() else ""
  word = word.lstrip("<\"'([")
  while word and word[-1] in ">\"')]":
    opener = {")": "(", "]": "["}.get(word[-1])
    if opener and word.count(opener) >= word.count(word[-1]):
      break
    word = word[:-1]
  return word


def parse_action(text: str) -> Action:
  calls = _complete_calls(text)
  if calls:
    tool, start, arg_start, end = calls[0]
    close = _CLOSE.match(text, text.rfind("</", arg_start, end))
    argument = text[arg_start:close.start() if close else end].strip()
    if tool == "access":
      argument = clean_url(argument)
    kind = tool if argument else "invalid"
    return Action(kind, tool, argument, start, end, True, len(calls) - 1,
                  "first complete call" if argument else "empty argument")
  opened = [(m.start(), m.end(), t) for t in TOOLS for m in _OPEN[t].finditer(text)]
  if opened:
    start, arg_start, tool = max(opened)
    if tool == "answer":
      argument = text[arg_start:].strip()
      return Action("answer" if argument else "invalid", tool, argument, start, len(text), False,
                    0, "unclosed answer" if argument else "empty argument")
    return Action("none", tool, "", start, len(text), False, 0, f"unclosed {tool} not executed")
  return Action("none", rule="no call")


def extract_thought(text: str) -> str:
  """A reasoning model's note: the last <thought> block after its hidden reasoning (text after
  the last </think>); without one, that text up to the first tool tag."""
  visible = text.rsplit("</think>", 1)[-1]
  found = list(_THOUGHT.finditer(visible))
  if found:
    note = found[-1].group(1)
    if not found[-1].group(0).lower().endswith("</thought>"):  # left open: up to the action
      note = note[:_first_call(note)]
    return note.strip()
  return visible[:_first_call(visible)].strip()


def _first_call(text: str) -> int:
  return min((m.start() for t in TOOLS for m in [_OPEN[t].search(text)] if m), default=len(text))
