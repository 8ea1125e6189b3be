"""One seed's run: a base question, then up to `max_actions` rounds in which the LLM picks an
action among those on offer (order shuffled each round; exit only once the question is hard
after at least `min_actions` actions), the program performs and checks it, and the verifier
accepts or rejects the result.

As in ASearcher, a failed check costs only its round; the question stays as it was. Every
accepted state that is hard (no tool-free answer right) after at least `min_actions` actions
joins the seed's pool; the last `variants_per_seed` of the pool (the most evolved) are kept.
The record returned is the seed's whole history: every round (the action attempted and the
verdict), the final state (accepted actions with their verdicts), the variants kept; the
journal keeps it as provenance and the report counts it.
"""

from __future__ import annotations

import random
from typing import Any

from asearcher_jax.synth.actions import DESCRIPTIONS, fuzz, inject, injectable
from asearcher_jax.synth.llm import SynthLLM
from asearcher_jax.synth.pages import PageSource
from asearcher_jax.synth.seeds import Seed
from asearcher_jax.synth.state import Fact, QAState, Rejected, on_page, render_facts
from asearcher_jax.synth.verify import Verifier


def _history(state: QAState) -> str:
  steps = [f"inject ({a['entity']} -> {a['description']})" if a["type"] == "inject"
           else f"fuzz ({a['original']} -> {a['fuzzed']})" for a in state.actions]
  return "; ".join(steps) or "(none)"


def variant(state: QAState, verdict: dict, round_: int) -> dict[str, Any]:
  return {**state.to_dict(), "round": round_, "verdict": verdict}


class SeedAgent:
  def __init__(self, synth, llm: SynthLLM, pages: PageSource, verifier: Verifier):
    self.cfg, self.llm, self.pages, self.verifier = synth, llm, pages, verifier

  def _page(self, url: str) -> dict:
    page = self.pages.page(url)
    if page is None:
      raise Rejected("seed:page_not_found", url)
    return page

  async def base(self, seed: Seed) -> QAState:
    """The seed as a question with quoted facts; the LLM writes the question of a page seed
    and quotes the facts of supporting pages that came without one."""
    limit = self.cfg.max_page_chars
    if seed.kind == "page":
      given = seed.facts[0] if seed.facts else None
      page = self._page(given.url if given else seed.pages[0])
      reply = await self.llm.ask("base_qa", {"question": str, "answer": str, "fact": str},
                                 title=page["title"], page=page["contents"][:limit],
                                 fact=given.text if given else "(any fact of the page)")
      fact = given.text if given else reply["fact"].strip()
      if not on_page(fact, page["contents"]):
        raise Rejected("seed:fact_not_on_page", fact)
      answer = reply["answer"].strip()
      if not answer:
        raise Rejected("seed:no_answer")
      return QAState(reply["question"].strip(), (answer,), (),
                     (Fact(page["url"], page["title"], fact),))
    facts = list(seed.facts)
    for url in seed.pages:
      page = self._page(url)
      reply = await self.llm.ask("seed_fact", {"fact": str}, question=seed.question,
                                 answer=seed.answers[0], title=page["title"],
                                 page=page["contents"][:limit])
      fact = reply["fact"].strip()
      if fact and on_page(fact, page["contents"]):
        facts.append(Fact(url, page["title"], fact))
    return QAState(seed.question, seed.answers, seed.aug_answers, tuple(dict.fromkeys(facts)))

  async def run(self, seed: Seed) -> dict[str, Any]:
    """The seed's record (status "done"); `LLMUnavailable` propagates (the seed is aborted)."""
    rng = random.Random(f"{self.cfg.seed}/{seed.seed_id}")
    record: dict[str, Any] = {"seed_id": seed.seed_id, "status": "done", "seed": seed.to_dict(),
                              "base": None, "rejected": None, "rounds": [], "final": None,
                              "pool": 0, "variants": []}
    state = None
    try:
      state = await self.base(seed)
      verdict = await self.verifier.verify(state)
    except Rejected as r:
      record["base"] = {"state": state.to_dict() if state else None, "verdict": r.verdict}
      record["rejected"] = {"reason": r.reason, "detail": r.detail[:500]}
      return record
    record["base"] = {"state": state.to_dict(), "verdict": verdict}
    # Both change only when a round is accepted; `entities` None: to recompute.
    can_exit = verdict["hard"] and len(state.actions) >= self.cfg.min_actions
    entities = None
    pool = [variant(state, verdict, 0)] if can_exit else []
    for rnd in range(1, self.cfg.max_actions + 1):
      if entities is None:
        entities = injectable(state, self.pages)
      offered = (["inject"] if entities else []) + ["fuzz"] + (["exit"] if can_exit else [])
      rng.shuffle(offered)
      entry: dict[str, Any] = {"round": rnd, "offered": offered, "action": None}
      try:
        choice = await self.llm.ask(
            "choose_action", {"action": str}, question=state.question, answer=state.answer,
            facts=render_facts(state.facts), entities=", ".join(entities) or "(none)",
            history=_history(state),
            actions="\n".join(f"- {a}: {DESCRIPTIONS[a]}" for a in offered))
        action = entry["action"] = choice["action"].strip().lower()
        if action not in offered:
          raise Rejected("choose_action:invalid_action", action)
        if action == "exit":
          entry["status"] = "exit"
          record["rounds"].append(entry)
          break
        if action == "inject":
          entity = str(choice.get("entity") or "").strip()
          if entity not in entities:
            raise Rejected("choose_action:unknown_entity", entity)
          candidate, act = await inject(state, entity, entities[entity], self.llm, self.pages,
                                        rng, self.cfg)
        else:
          candidate, act = await fuzz(state, self.llm)
        entry["attempt"] = act
        verdict = await self.verifier.verify(candidate)
        state = candidate.evolve(actions=state.actions + ({**act, "round": rnd,
                                                           "verdict": verdict},))
        entities = None
        entry.update(status="accepted", question=state.question, hard=verdict["hard"])
        can_exit = verdict["hard"] and len(state.actions) >= self.cfg.min_actions
        if can_exit:
          pool.append(variant(state, verdict, rnd))
      except Rejected as r:
        entry.update(status="rejected", reason=r.reason, detail=r.detail[:500],
                     verdict=r.verdict)
      record["rounds"].append(entry)
    record["final"] = state.to_dict()
    record["pool"] = len(pool)
    record["variants"] = pool[-self.cfg.variants_per_seed:]
    return record
