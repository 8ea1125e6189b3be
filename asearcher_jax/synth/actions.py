"""The two actions that change a question, performed by the LLM and checked by the program.

Injection (ASearcher's SELECT + compose): an entity the question names is replaced by a
description built from a fact about it found on a *linked* page, so answering now takes one
more hop, while the answer stays the same. The program picks the neighbour (at random among
the entity's links, skipping pages already used and the answer's own page), then holds the
LLM to what it claims: the fact is quoted verbatim from that page, names the entity, is new,
and the rewritten question no longer names the entity.

Fuzzing: one specific detail (a date, a number, a name) is blurred ("1934" -> "the early
1930s"). The program checks that the detail was in the question and is gone from it.
"""

from __future__ import annotations

import random

from asearcher_jax.reward.qa_metrics import normalize_answer
from asearcher_jax.synth.llm import SynthLLM
from asearcher_jax.synth.pages import PageSource, title_from_url
from asearcher_jax.synth.state import (
    Fact,
    QAState,
    Rejected,
    mentions,
    on_page,
    render_facts,
    squash,
)

DESCRIPTIONS = {
    "inject": "replace an entity of the question by a description drawn from a page linked "
              "to it (one more search step)",
    "fuzz": "blur one specific detail (a date into a period, a name into a description)",
    "exit": "stop: the question is already hard and verified",
}


def _gold_keys(state: QAState) -> set[str]:
  return {normalize_answer(a) for a in state.golds}


def _is_answer(title: str, golds: set[str]) -> bool:
  """Is `title` the answer's (golds: `_gold_keys`, built once per caller)?"""
  return normalize_answer(title) in golds


def _fresh_links(page: dict, used: set[str], golds: set[str]) -> list[str]:
  """Links an injection may follow: not to a page in use, nor (by its URL) to the answer's."""
  return [u for u in dict.fromkeys(page["links"]) if u not in used and u != page["url"]
          and not _is_answer(title_from_url(u), golds)]


def injectable(state: QAState, pages: PageSource) -> dict[str, str]:
  """Entity name -> page URL for the entities the question names (as whole words) among the
  fact pages and the pages they link to, if their page links to a page not used yet. Linked
  titles are guessed from URLs and confirmed by reading only the pages whose guess the
  question names."""
  out: dict[str, str] = {}
  used, golds = {f.url for f in state.facts}, _gold_keys(state)
  for fact in state.facts:
    page = pages.page(fact.url)
    if page is None:
      continue
    candidates = [(page["title"], page)] + [(title_from_url(u), u) for u in page["links"]]
    for name, target in candidates:
      if not name or not mentions(state.question, name):
        continue
      if isinstance(target, str):  # a link: read it to confirm the page and its title
        target = pages.page(target)
        if target is None or not mentions(state.question, target["title"]):
          continue
        name = target["title"]
      if name not in out and not _is_answer(name, golds) and _fresh_links(target, used, golds):
        out[name] = target["url"]
  return out


async def inject(state: QAState, entity: str, url: str, llm: SynthLLM, pages: PageSource,
                 rng: random.Random, synth) -> tuple[QAState, dict]:
  page, golds = pages.page(url), _gold_keys(state)
  neighbours = _fresh_links(page, {f.url for f in state.facts}, golds) if page else []
  rng.shuffle(neighbours)
  tried: list[str] = []
  for link in neighbours:
    if len(tried) >= synth.neighbour_tries:
      break
    other = pages.page(link)
    if other is None or _is_answer(other["title"], golds):
      continue
    tried.append(link)
    reply = await llm.ask("inject", {"fact": str, "description": str}, question=state.question,
                          answer=state.answer, entity=entity, title=other["title"],
                          page=other["contents"][:synth.max_page_chars])
    fact, description = reply["fact"].strip(), reply["description"].strip()
    if not fact:
      continue  # nothing on this page: try the next neighbour
    if not on_page(fact, other["contents"]):
      raise Rejected("inject:fact_not_on_page", f"{fact!r} not on {link}")
    if not mentions(fact, entity):
      raise Rejected("inject:fact_lacks_entity", fact)
    if any(on_page(fact, f.text) or on_page(f.text, fact) for f in state.facts):
      raise Rejected("inject:fact_known", fact)
    if not description or mentions(description, entity):
      raise Rejected("inject:bad_description", description)
    composed = await llm.ask("compose", {"question": str}, question=state.question,
                             answer=state.answer, entity=entity, description=description,
                             fact=fact)
    question = composed["question"].strip()
    if squash(question) == squash(state.question):
      raise Rejected("compose:unchanged")
    if mentions(question, entity):
      raise Rejected("compose:entity_still_named", question)
    action = {"type": "inject", "entity": entity, "entity_url": url, "neighbour": link,
              "neighbour_title": other["title"], "fact": fact, "description": description,
              "question_before": state.question, "question_after": question, "tried": tried}
    return state.evolve(question=question,
                        facts=state.facts + (Fact(link, other["title"], fact),)), action
  raise Rejected("inject:no_fact" if tried else "inject:no_neighbour", entity)


async def fuzz(state: QAState, llm: SynthLLM) -> tuple[QAState, dict]:
  reply = await llm.ask("fuzz", {"original": str, "fuzzed": str, "question": str},
                        question=state.question, answer=state.answer,
                        facts=render_facts(state.facts))
  original, fuzzed = reply["original"].strip(), reply["fuzzed"].strip()
  question = reply["question"].strip()
  if not original or not mentions(state.question, original):
    raise Rejected("fuzz:detail_not_in_question", original)
  if not fuzzed or normalize_answer(fuzzed) == normalize_answer(original):
    raise Rejected("fuzz:not_blurred", fuzzed)
  if squash(question) == squash(state.question):
    raise Rejected("fuzz:unchanged")
  if mentions(question, original):
    raise Rejected("fuzz:detail_kept", question)
  action = {"type": "fuzz", "original": original, "fuzzed": fuzzed,
            "question_before": state.question, "question_after": question}
  return state.evolve(question=question), action
