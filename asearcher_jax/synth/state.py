"""What a seed's question is at one moment (question, answer, supporting facts, accepted actions),
and the text tests the program applies to the LLM's claims."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from asearcher_jax.errors import AsearcherError
from asearcher_jax.reward.qa_metrics import cover_exact_match


@dataclass(frozen=True)
class Fact:
  """A statement quoted from a page: `text` must occur in the page at `url` (whitespace aside)."""

  url: str
  title: str
  text: str

  def to_dict(self) -> dict[str, str]:
    return {"url": self.url, "title": self.title, "text": self.text}

  @classmethod
  def from_dict(cls, d: dict) -> Fact:
    return cls(str(d["url"]), str(d.get("title", "")), str(d["text"]))


@dataclass(frozen=True)
class QAState:
  """One version of a seed's question. The answer never changes; every accepted action adds a
  provenance entry (and, for an injection, a fact)."""

  question: str
  answers: tuple[str, ...]  # gold answers; the first is the one the prompts show
  aug_answers: tuple[str, ...] = ()
  facts: tuple[Fact, ...] = ()
  actions: tuple[dict, ...] = field(default=(), compare=False)

  @property
  def answer(self) -> str:
    return self.answers[0]

  @property
  def injections(self) -> int:
    return sum(a["type"] == "inject" for a in self.actions)

  @property
  def fuzzes(self) -> int:
    return sum(a["type"] == "fuzz" for a in self.actions)

  @property
  def golds(self) -> list[str]:
    return list(dict.fromkeys([*self.answers, *self.aug_answers]))

  def evolve(self, **changes: Any) -> QAState:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return {"question": self.question, "answers": list(self.answers),
            "aug_answers": list(self.aug_answers), "facts": [f.to_dict() for f in self.facts],
            "injections": self.injections, "fuzzes": self.fuzzes, "actions": list(self.actions)}


class LLMUnavailable(AsearcherError):
  """The endpoint did not answer after its retries: the seed is aborted, and a rerun retries it
  (unlike a reply that never parsed, which counts against the round)."""


class Rejected(Exception):
  """A round (or a seed's base question) fails; `reason` is a short `step:why` key counted in
  the report, `detail` says more, `verdict` is the verification that failed, if any."""

  def __init__(self, reason: str, detail: str = "", verdict: dict | None = None):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail, self.verdict = reason, detail, verdict


def squash(text: str) -> str:
  """Whitespace collapsed: quotes are compared with pages modulo line breaks and spacing."""
  return " ".join(text.split())


def on_page(text: str, contents: str) -> bool:
  return bool(squash(text)) and squash(text) in squash(contents)


def mentions(text: str, name: str) -> bool:
  """`name` occurs in `text` as whole words, in any case ("Alen Varro" is not in "Alen
  Varrow's"; "marval works" names Marval Works): a name in another case is still given away."""
  return bool(name) and re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text,
                                  re.IGNORECASE) is not None


_PUNCT = re.compile(r"[^\w\s]")


def holds_answer(text: str, golds: list[str]) -> bool:
  """A gold answer occurs in `text` (the reward's cover exact match), also when punctuation
  joins it to other words: SQuAD's normalisation deletes punctuation, so "Lordorvale's" and
  "Paris-based" would hide Lordorvale and Paris; here punctuation is also read as a space."""
  return bool(cover_exact_match(text, golds) or cover_exact_match(
      _PUNCT.sub(" ", text), [_PUNCT.sub(" ", g) for g in golds]))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
  """A passage cut after . ! ? followed by space: good enough for quoting facts, as every piece
  is still a verbatim substring of the passage."""
  return [s for s in (p.strip() for p in _SENTENCE_END.split(squash(text))) if s]


def render_facts(facts: tuple[Fact, ...] | list[Fact]) -> str:
  return "\n".join(f"[{i}] ({f.title}) {f.text}" for i, f in enumerate(facts, 1)) or "(none)"
