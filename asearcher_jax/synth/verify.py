"""Verification after every change, in ASearcher's three steps, cheapest first.

1. Quality: one question (ends with its only "?"), the answer not given away, every fact
   quoted verbatim from the page it cites, the answer inside the facts (all checked by the
   program); then, with `quality_judge`, the LLM's view of clarity, groundedness and
   uniqueness. In the world, facts must also be true statements of the world.
2. Difficulty: the solver answers `difficulty_samples` times without tools; the question is
   hard when no answer is right (EM; F1 >= threshold or the gold inside the answer; or the
   reward's LLM judge). A reply that holds no answer is no sample: fewer answers than asked
   for reject the round, as hard must not rest on silence.
3. Uniqueness: each distinct wrong answer is put to the LLM: is it also a valid answer? One
   yes rejects. In the world the check is exact instead (`world_check`) and runs before any
   LLM call, since it is free.

`verify` returns the verdict (recorded as provenance) or raises `Rejected` carrying it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from asearcher_jax.reward.qa_metrics import cover_exact_match, exact_match, f1, normalize_answer
from asearcher_jax.synth.llm import SynthLLM
from asearcher_jax.synth.pages import PageSource
from asearcher_jax.synth.state import (
    LLMUnavailable,
    QAState,
    Rejected,
    holds_answer,
    on_page,
    render_facts,
)
from asearcher_jax.synth.world_check import WorldFacts


class Verifier:
  def __init__(self, synth, llm: SynthLLM, pages: PageSource, world: WorldFacts | None = None,
               judge=None):
    self.cfg, self.llm, self.pages, self.world, self.judge = synth, llm, pages, world, judge
    if synth.answer_check == "judge" and judge is None:
      raise ValueError("answer_check=judge needs a Judge")

  def basic(self, state: QAState) -> dict[str, Any]:
    """The program's quality checks; raises `Rejected` on the first that fails."""
    q = state.question.strip()
    if not q.endswith("?"):
      raise Rejected("quality:not_a_question", q[-80:])
    if q.count("?") > 1:
      raise Rejected("quality:several_questions", q)
    if holds_answer(q, state.golds):
      raise Rejected("quality:answer_in_question", state.answer)
    if not state.facts:
      raise Rejected("quality:no_facts")
    for fact in state.facts:
      page = self.pages.page(fact.url)
      if page is None or not on_page(fact.text, page["contents"]):
        raise Rejected("quality:fact_not_on_page", f"{fact.text!r} not on {fact.url}")
    if not any(holds_answer(f.text, state.golds) for f in state.facts):
      raise Rejected("quality:answer_not_in_facts", state.answer)
    checks = {"one_question": True, "answer_hidden": True, "facts_on_pages": len(state.facts),
              "answer_in_facts": True}
    if self.world is not None:
      bad = self.world.ungrounded(state.facts)
      if bad:
        raise Rejected("quality:not_a_world_fact", bad[0])
      checks["world_facts"] = True
    return checks

  async def judge_quality(self, state: QAState) -> dict[str, Any]:
    reply = await self.llm.ask("quality", {"clear": bool, "grounded": bool, "unique": bool},
                               question=state.question, answer=state.answer,
                               facts=render_facts(state.facts))
    verdict = {k: reply[k] for k in ("clear", "grounded", "unique")}
    verdict["reason"] = str(reply.get("reason", ""))
    for key, reason in (("clear", "unclear"), ("grounded", "ungrounded"),
                        ("unique", "not_unique")):
      if not verdict[key]:
        raise Rejected(f"quality:judge_{reason}", verdict["reason"])
    return verdict

  async def _correct(self, state: QAState, answer: str) -> bool:
    if self.cfg.answer_check == "em":
      return exact_match(answer, state.golds) == 1.0
    if self.cfg.answer_check == "f1":  # "The capital is X." is right too, whatever its F1
      return (f1(answer, state.golds, variant="set") >= self.cfg.f1_threshold
              or cover_exact_match(answer, state.golds) == 1.0)
    verdict = await self.judge.judge(state.question, answer, state.golds)
    if verdict.correct is None:
      raise LLMUnavailable(f"judge: {verdict.error}")
    return verdict.correct

  async def _answers(self, question: str) -> list[str]:
    """The solver's answers; `Rejected` unless every sample gave one (a solver that stays
    silent or breaks format would otherwise make every question look hard)."""
    n = self.cfg.difficulty_samples
    replies = await asyncio.gather(*[self.llm.solve(question) for _ in range(n)],
                                   return_exceptions=True)
    for r in replies:
      if isinstance(r, BaseException) and not isinstance(r, Rejected):
        raise r
    answers = [r for r in replies if isinstance(r, str) and r.strip()]
    if len(answers) < n:
      errors = [r.detail or r.reason for r in replies if isinstance(r, Rejected)]
      raise Rejected("difficulty:no_answer", f"{n - len(answers)} of {n} solver replies held "
                     f"no answer" + (f" ({errors[0]})" if errors else ""), {"answers": answers})
    return answers

  async def difficulty(self, state: QAState) -> dict[str, Any]:
    answers = await self._answers(state.question)
    first: dict[str, str] = {}  # each distinct normalized answer is checked once, as first seen
    for a in answers:
      first.setdefault(normalize_answer(a), a)
    checks = await asyncio.gather(*[self._correct(state, a) for a in first.values()])
    by_norm = dict(zip(first, checks))
    correct = [by_norm[normalize_answer(a)] for a in answers]
    return {"answers": answers, "correct": correct, "hard": not any(correct)}

  async def uniqueness(self, state: QAState, wrong: list[str]) -> dict[str, Any]:
    """Each distinct wrong answer: is it an alternative valid answer? (LLM)"""
    distinct = list({normalize_answer(a): a for a in wrong if normalize_answer(a)}.values())
    replies = await asyncio.gather(*[
        self.llm.ask("alternative", {"alternative": bool}, question=state.question,
                     answer=state.answer, candidate=a, facts=render_facts(state.facts))
        for a in distinct])
    checked = [{"answer": a, "alternative": r["alternative"], "reason": str(r.get("reason", ""))}
               for a, r in zip(distinct, replies)]
    alternatives = [c["answer"] for c in checked if c["alternative"]]
    if alternatives:
      raise Rejected("uniqueness:alternative_answer", alternatives[0], {"checked": checked})
    return {"checked": checked}

  def world_uniqueness(self, state: QAState) -> dict[str, Any]:
    found, finished = self.world.readings(state.question, state.answer, state.facts)
    result = {"readings": found, "finished": finished}
    if not finished:
      raise Rejected("uniqueness:undecided", "constraint search ran out of steps",
                     {"world": result})
    if not found:  # unique means exactly one reading: none is not a question of this world
      raise Rejected("uniqueness:unanchored", "the answer is none of the supporting facts' "
                     "entities or values", {"world": result})
    wanted = normalize_answer(state.answer)
    others = [a for a in found if normalize_answer(a) != wanted]
    if others:
      raise Rejected("uniqueness:ambiguous", f"also {others}", {"world": result})
    return result

  async def verify(self, state: QAState) -> dict[str, Any]:
    verdict: dict[str, Any] = {}
    try:
      verdict["quality"] = {"checks": self.basic(state)}
      if self.world is not None:
        verdict["uniqueness"] = {"world": self.world_uniqueness(state)}
      if self.cfg.quality_judge:
        verdict["quality"]["judge"] = await self.judge_quality(state)
      verdict["difficulty"] = await self.difficulty(state)
      wrong = [a for a, ok in zip(verdict["difficulty"]["answers"],
                                  verdict["difficulty"]["correct"]) if not ok]
      if self.world is None:
        verdict["uniqueness"] = await self.uniqueness(state, wrong)
      else:
        verdict["uniqueness"]["checked"] = [{"answer": a, "alternative": False} for a in
                                            dict.fromkeys(w for w in wrong if w.strip())]
    except Rejected as r:
      if r.verdict is not None:
        verdict.setdefault(r.reason.split(":", 1)[0], {}).update(r.verdict)
      raise Rejected(r.reason, r.detail, verdict) from None
    verdict["hard"] = verdict["difficulty"]["hard"]
    return verdict
