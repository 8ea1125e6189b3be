"""Exact verification in the default world, whose facts are known (entities.jsonl).

Groundedness: every supporting fact must be, sentence by sentence, a true statement of the
world (one of `fact_sentence`'s) -- a sentence on the page that states no fact (filler, a
"Related entries." header, an invented claim) is not support.

Uniqueness: the question is read as a constraint problem over its supporting facts. Each fact
is a triple (subject, relation or attribute, object); an entity or value the question names
(as whole words) is fixed, every other one is unknown, the answer included. Every assignment
of the unknowns that makes all triples true is a reading of the question, and the answer is
unique iff all readings give the same answer. So "the city where someone born in 1950 was
born" is ambiguous when two people were born in 1950, and "the birthplace of the founder of
Marval Works" is not: relations are functional forwards, not backwards. A value no question
mentions other than the answer only says "has some such attribute", which every entity of
its kind has, so such triples add no constraint (one about the answer is kept: it ranges the
answer over the entities of that kind). Details the question blurs (a year made a
decade, a name made a description) are not modelled: a blurred entity is simply unknown, so
this check is strict about fuzzing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from asearcher_jax.reward.qa_metrics import normalize_answer
from asearcher_jax.synth.state import Fact, mentions, sentences
from asearcher_jax.world.generator import World, fact_sentence

Node = tuple[str, str]  # ("e", eid) or ("v", value)


@dataclass(frozen=True)
class Triple:
  subject: str  # eid
  key: str  # relation or attribute
  obj: Node


class WorldFacts:
  def __init__(self, world: World):
    self.entities = world.entities
    self.sentences: dict[str, Triple] = {}
    self.inverse: dict[tuple[str, Node], list[str]] = defaultdict(list)
    self.by_key: dict[str, list[tuple[str, Node]]] = defaultdict(list)
    for e in world.entities.values():
      for key in list(e.rels) + list(e.attrs):
        obj = self._value(e.eid, key)
        triple = Triple(e.eid, key, obj)
        self.sentences[fact_sentence(e, key, world.entities)] = triple
        self.inverse[(key, obj)].append(e.eid)
        self.by_key[key].append((e.eid, obj))

  def triples(self, fact: Fact) -> list[Triple] | None:
    """The world facts a quoted fact states; None if any of its sentences states none."""
    out = []
    for s in sentences(fact.text):
      t = self.sentences.get(s)
      if t is None:
        return None
      out.append(t)
    return out

  def ungrounded(self, facts: tuple[Fact, ...]) -> list[str]:
    """The facts that are not (wholly) true statements of the world."""
    return [f.text for f in facts if self.triples(f) is None]

  def surface(self, node: Node) -> str:
    return self.entities[node[1]].name if node[0] == "e" else node[1]

  def _value(self, eid: str, key: str) -> Node | None:
    e = self.entities[eid]
    if key in e.rels:
      return ("e", e.rels[key])
    return ("v", str(e.attrs[key])) if key in e.attrs else None

  def readings(self, question: str, answer: str, facts: tuple[Fact, ...], limit: int = 2,
               budget: int = 200_000) -> tuple[list[str], bool]:
    """(distinct answers of the question's readings, up to `limit`; whether the search finished
    within `budget` steps). Unique iff it finished and found exactly one answer. The answer is
    the facts' entity or value that it names as the reward reads names (`normalize_answer`:
    "the Cornesburg." is Cornesburg); none found gives no reading."""
    triples = [t for f in facts for t in (self.triples(f) or ())]
    answer_node, wanted = None, normalize_answer(answer)
    for t in triples:
      for node in (("e", t.subject), t.obj):
        if normalize_answer(self.surface(node)) == wanted:
          answer_node = node
    if answer_node is None:
      return [], True
    fixed = set()
    for t in triples:
      for node in (("e", t.subject), t.obj):
        if node != answer_node and mentions(question, self.surface(node)):
          fixed.add(node)
    # A hidden non-answer value constrains nothing: its subject surely has some such value.
    # But a triple of the answer stays, as the answer's only tie to the question when the
    # value that pinned it was blurred ("born in the 1980s"): then every entity with such a
    # value is a reading. Deduplicated in order (a set's order would change with the
    # process's string hashing).
    triples = [t for t in dict.fromkeys(triples) if t.obj[0] == "e" or t.obj in fixed
               or answer_node in (t.obj, ("e", t.subject))]
    unknown = sorted({n for t in triples for n in (("e", t.subject), t.obj)} - fixed)
    found: list[str] = []
    steps = 0

    def value(node: Node, env: dict) -> Node | None:
      return node if node in fixed else env.get(node)

    def consistent(env: dict) -> bool:
      for t in triples:
        s, o = value(("e", t.subject), env), value(t.obj, env)
        if s is not None and o is not None and self._value(s[1], t.key) != o:
          return False
      return True

    def candidates(node: Node, env: dict) -> list[Node]:
      best = None
      for t in triples:
        s, o = value(("e", t.subject), env), value(t.obj, env)
        if t.obj == node and s is not None:
          v = self._value(s[1], t.key)
          options = [v] if v is not None else []
        elif ("e", t.subject) == node and o is not None:
          options = [("e", eid) for eid in self.inverse.get((t.key, o), ())]
        else:
          continue
        best = options if best is None or len(options) < len(best) else best
      if best is not None:
        return best
      for t in triples:  # nothing bound next to it: every entity with such a fact
        if ("e", t.subject) == node:
          return list(dict.fromkeys(("e", s) for s, _ in self.by_key[t.key]))
        if t.obj == node:
          return list(dict.fromkeys(o for _, o in self.by_key[t.key]))
      return []

    def search(env: dict) -> None:
      nonlocal steps
      steps += 1
      if steps > budget or len(found) >= limit:
        return
      free = [n for n in unknown if n not in env]
      if not free:
        name = self.surface(env[answer_node])
        if name not in found:
          found.append(name)
        return
      options = {n: candidates(n, env) for n in free}
      node = min(free, key=lambda n: len(options[n]))
      for c in options[node]:
        env[node] = c
        if consistent(env):
          search(env)
        del env[node]
        if len(found) >= limit or steps > budget:
          return

    search({})
    return found, steps <= budget

