"""A programmatic expert for the synthetic world: an agent policy that solves a question by
searching the real retrieval server hop by hop, in the agent's exact format.

It knows the world's *language* (the question templates and fact sentences of
generator.py) but not its facts: it parses a question into a start name and a chain of
relations, then for each hop searches `"<entity> <keyword>"`, reads the fact sentence about
exactly that entity out of the returned passages (near-duplicate names do not match), and
moves on to the entity it names. When no passage states the fact it opens the entity's page
(`<access>`, read one chunk per turn) and, failing that, searches for the name alone. Its
trajectories are what `asearcher sft` warm-starts the debug policy on, so their text is
short and regular: a thought that copies the fact found and names the next hop, then one
call.

It plugs into the real `Agent` as a `Policy` (the agent's parser, tools, context and record
apply unchanged); a completion is cut at the caller's stop strings and token budget exactly
as a model's would be.
"""

from __future__ import annotations

import dataclasses
import re

from asearcher_jax.agent.policy import Completion, Prompt
from asearcher_jax.inference.protocol import SamplingParams
from asearcher_jax.models.tokenizer import Tokenizer
from asearcher_jax.world.generator import ATTRIBUTES, RELATIONS, Entity, fact_sentence

# Search keywords per fact: the words of its sentence that are not names.
KEYWORDS = {
    "born_in": "born in", "employer": "worked for", "country": "city in", "mayor": "mayor",
    "capital": "capital", "headquarters": "headquartered in", "founder": "founded by",
    "creator": "created by", "birth_year": "born year", "occupation": "profession",
    "population": "population", "city_founded": "founded in", "currency": "currency",
    "org_founded": "established in", "industry": "industry", "year": "first presented",
    "genre": "is a",
}
_SUBJECT, _VALUE = "\u0001", "\u0002"
_KINDS = {rel: spec[0] for rel, spec in RELATIONS.items()}
_KINDS.update({attr: spec[0] for attr, spec in ATTRIBUTES.items()})


def _sentence_pattern(key: str) -> re.Pattern:
  """The fact sentence of `key` as a regex with a `subject` slot and a `value` group, built
  from generator.fact_sentence itself so the two cannot drift."""
  dummy = Entity("X", _KINDS[key], _SUBJECT, {k: _VALUE for k in ATTRIBUTES}, {}, "")
  target = Entity("Y", "", _VALUE, {}, {}, "")
  if key in RELATIONS:
    dummy.rels[key] = "Y"
  text = fact_sentence(dummy, key, {"Y": target})
  value = r"(?P<value>\d+)" if key in ("birth_year", "population", "city_founded", "org_founded",
                                       "year") else r"(?P<value>[^.\d\n][^.\n]*)"
  return re.compile(re.escape(text).replace(re.escape(_SUBJECT), "{subject}")
                    .replace(re.escape(_VALUE), value))


_PATTERNS = {key: _sentence_pattern(key).pattern for key in KEYWORDS}
# How much literal text a fact's sentence has: "X is a Y." (genre) also reads "X is a city in
# Z." (country), so a sentence belongs to the most specific fact it reads as.
_LITERAL = {key: len(re.sub(r"\{subject\}|\(\?P<value>[^)]*\)", "", p)) for key, p in
            _PATTERNS.items()}
_HEADER = r"{subject} is a \w+ in this world\."  # a page's first line, never a fact


def find_fact(text: str, subject: str, keys: tuple[str, ...]) -> tuple[str, str] | None:
  """(value, sentence) of the first sentence in `text` that states one of `keys` about exactly
  `subject`; a sentence that reads more specifically as another fact, or is a page's header
  line, is not one."""
  subj = re.escape(subject)
  header = re.compile(_HEADER.format(subject=subj))
  for key in keys:
    others = [re.compile(p.format(subject=subj)) for k, p in _PATTERNS.items()
              if k not in keys and _LITERAL[k] > _LITERAL[key]] + [header]
    pattern = re.compile(_PATTERNS[key].format(subject=subj))
    for m in pattern.finditer(text):
      if _sentence_start(text, m.start()) and not any(o.fullmatch(m.group(0)) for o in others):
        return m.group("value").strip(), m.group(0)
  return None


def _sentence_start(text: str, i: int) -> bool:
  """Whether a sentence can start at `i`: "Bo Ren is a poet" says nothing about "Ren"."""
  before = text[:i]
  if not before or before[-1] in '\n"(' or before.endswith(". "):
    return True
  last = before.split()[-1] if before.strip() else ""
  return before[-1] == " " and ("://" in last or last.endswith(")"))  # after a hit's URL/title


@dataclasses.dataclass(frozen=True)
class Plan:
  """A parsed question: the start name and, per hop, the facts it may ask for (a template
  such as "In what year was {x} founded?" fits a city or an organisation)."""

  start: str
  hops: tuple[tuple[str, ...], ...]
  phrases: tuple[str, ...]  # per hop, the request with {x} for the entity reached


def _template_regex(template: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(re.escape("{x}"), "(?P<x>.+)"))


_FINALS: list[tuple[re.Pattern, str, str]] = []
for _key, (_k, _t, _np, _q) in RELATIONS.items():
  _FINALS.append((_template_regex(_q[0].upper() + _q[1:]), _key, _q))
for _key, (_k, _q) in ATTRIBUTES.items():
  _FINALS.append((_template_regex(_q[0].upper() + _q[1:]), _key, _q))
_NOUNS = [(_template_regex(np), key, np) for key, (_k, _t, np, _q) in RELATIONS.items()]


def _inner(phrase: str) -> list[tuple[list[tuple[str, str]], str]]:
  """Every reading of a noun phrase as relations applied to a name: [(hops outermost first,
  name)], the plain name first."""
  out = [([], phrase)]
  for regex, key, np in _NOUNS:
    m = regex.fullmatch(phrase)
    if m:
      out += [([(key, np)] + hops, name) for hops, name in _inner(m.group("x"))]
  return out


def parse_question(question: str) -> Plan | None:
  """The plan of a world question, None for one not in the world's templates. Of several
  readings the longest chain wins: a name never spells a template ("the mayor of ...")."""
  question = question.strip()
  best = None
  for regex, key, template in _FINALS:
    m = regex.fullmatch(question)
    if not m:
      continue
    keys = tuple(k for r, k, t in _FINALS if t == template)  # templates shared by kinds
    for hops, name in _inner(m.group("x")):
      if best is None or len(hops) + 1 > len(best.hops):
        chain = list(reversed(hops))  # innermost relation first
        best = Plan(name, tuple((k,) for k, _ in chain) + (keys,),
                    tuple(np for _, np in chain) + (template,))
  return best


@dataclasses.dataclass
class _Episode:
  plan: Plan | None
  hop: int = 0
  entity: str = ""
  started: bool = False
  key: int = 0  # which of the hop's facts the last search asked for
  tried_access: bool = False
  tried_name: bool = False
  noted: tuple[str, str] | None = None  # a fact found while reading a page
  rest: str = ""  # what the token budget cut off the last call


class WorldSolver:
  """The expert as an agent `Policy` (base variant, plain template). Stateful per session;
  `questions` lets it tell which question a prompt asks (the longest one it contains)."""

  chat = False

  def __init__(self, tokenizer: Tokenizer | None, questions=()):
    self.tokenizer = tokenizer
    self.questions = sorted(set(questions), key=len, reverse=True)
    self.episodes: dict[str, _Episode] = {}

  async def end_session(self, session_id: str) -> None:
    self.episodes.pop(session_id, None)

  async def complete(self, prompt: Prompt, sampling: SamplingParams,
                     session_id: str | None = None) -> Completion:
    ep = self.episodes.get(session_id or "")
    if ep is None:
      question = next((q for q in self.questions if q in prompt.text), None)
      plan = parse_question(question) if question else None
      ep = _Episode(plan, entity=plan.start if plan else "")
      if session_id:
        self.episodes[session_id] = ep
    text = ep.rest if ep.rest else self._next(ep, prompt.text, sampling)
    return self._cut(ep, text, sampling, prompt)

  def _next(self, ep: _Episode, context: str, sampling: SamplingParams) -> str:
    """What the expert writes next, given everything the agent has seen: the longest of its
    thoughts that leaves the call within the token budget (an answer cut by the budget would
    end the episode unclosed)."""
    thoughts, call = self._step(ep, context, sampling)
    texts = [f"{t}</think>" + (f"\n{call}" if call else "") for t in thoughts]
    if self.tokenizer is None:
      return texts[0]
    for text in texts:
      if len(self.tokenizer.encode(text)) <= sampling.max_new_tokens:
        return text
    return texts[-1]

  def _step(self, ep: _Episode, context: str, sampling: SamplingParams
            ) -> tuple[list[str], str]:
    """(thoughts, longest first; the call) for the next turn."""
    if ep.plan is None:
      return ["I cannot parse this question.", ""], "<answer> unknown </answer>"
    if not ep.started:
      ep.started = True
      return [f"Next: {self._request(ep)}", ""], self._search(ep)
    info = _last_observation(context)
    found = ep.noted or find_fact(info, ep.entity, ep.plan.hops[ep.hop])
    if "</think>" in sampling.stop and ">>>> Page" in info:  # reading one page chunk
      if found and not ep.noted:
        ep.noted = found
        return [found[1]], ""
      return [f"Nothing on {KEYWORDS[ep.plan.hops[ep.hop][0]]} here.", ""], ""
    if found:
      value, sentence = found
      ep.hop, ep.entity, ep.noted, ep.key = ep.hop + 1, value, None, 0
      ep.tried_access = ep.tried_name = False
      if ep.hop == len(ep.plan.hops):
        return [f"{sentence} So the answer is {value}.", sentence, ""], \
            f"<answer> {value} </answer>"
      return [f"{sentence} Next: {self._request(ep)}", sentence, ""], self._search(ep)
    if ep.key + 1 < len(ep.plan.hops[ep.hop]):  # a question that fits two kinds of entity
      ep.key += 1
      return [f"Not this fact; search {KEYWORDS[ep.plan.hops[ep.hop][ep.key]]}.", ""], \
          self._search(ep)
    url = _page_url(info, ep.entity)
    if url and not ep.tried_access:
      ep.tried_access = True
      return [f"Open the page of {ep.entity}.", ""], f"<access> {url} </access>"
    if not ep.tried_name:
      ep.tried_name = True
      return [f"Search for {ep.entity} itself.", ""], f"<search> {ep.entity} </search>"
    return [f"Not found: {self._request(ep)}", ""], "<answer> unknown </answer>"

  def _request(self, ep: _Episode) -> str:
    """What this hop asks: "the birthplace of X." or, last, "Who is the mayor of Y?"."""
    phrase = ep.plan.phrases[ep.hop].format(x=ep.entity)
    return phrase if phrase.endswith("?") else phrase + "."

  def _search(self, ep: _Episode) -> str:
    return f"<search> {ep.entity} {KEYWORDS[ep.plan.hops[ep.hop][ep.key]]} </search>"

  def _cut(self, ep: _Episode, text: str, sampling: SamplingParams,
           prompt: Prompt) -> Completion:
    """The completion a model writing `text` would return: cut after the first stop string
    and at `max_new_tokens`; what the budget cut off is written by the next call (the agent
    continues a call cut by the budget)."""
    finish, ep.rest = "stop", ""
    ends = [text.find(s) + len(s) for s in sampling.stop if s in text]
    if ends:
      text = text[:min(ends)]
    if self.tokenizer is None:
      return Completion(text, None, None, None, finish, False)
    ids = self.tokenizer.encode(text)
    if len(ids) > sampling.max_new_tokens:
      ids, finish = ids[:sampling.max_new_tokens], "length"
      head = self.tokenizer.decode(ids)
      text, ep.rest = head, text[len(head):]
    n = len(ids)
    return Completion(text, ids, [0.0] * n, [0] * n, finish, False,
                      len(prompt.ids) if prompt.ids is not None else None)


def _last_observation(text: str) -> str:
  start = text.rfind("<information>")
  return "" if start < 0 else text[start:]


def _page_url(info: str, name: str) -> str | None:
  """The URL of the search hit titled exactly `name`."""
  m = re.search(r"\(Title: " + re.escape(name) + r"\) URL: (\S+)", info)
  return m.group(1) if m else None
