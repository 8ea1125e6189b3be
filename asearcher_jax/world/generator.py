"""A seeded generator of a synthetic knowledge world: the corpus and QA of single-host debug mode.

Real QA corpora (wiki-18, NQ, HotpotQA) cannot ship with the project and cannot be
downloaded on every machine, yet the agent, the RL loop and the retrieval tools all need a
world whose answers are *known*. This module invents one: people, cities, countries,
organisations and works with attributes and typed relations. Every relation is
functional (a person has one birthplace, a city one mayor), so an answer found by walking
the graph is unique by construction, and multi-hop questions can be chained arbitrarily
long for long-horizon work. Near-duplicate names ("Alen Varro" / "Alen Varrow", same
occupation, adjacent birth year) act as distractors for both the retriever and the agent.

Everything derives from one `random.Random(seed)`; there is no global state, so the same
config always yields byte-identical files.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Any

from asearcher_jax.errors import ConfigError
from asearcher_jax.world.config import WorldConfig

_SYLLABLES = ("al", "ben", "cor", "da", "el", "fen", "gar", "hal", "is", "jor", "kel", "lin",
              "mar", "nor", "os", "pel", "quin", "ros", "sel", "tor", "ul", "val", "wen",
              "yor", "zan", "bri", "cal", "dor", "ev", "fal", "gil", "har", "ith", "kas", "lor",
              "mir", "nes", "or", "pra", "ren", "sta", "tam", "vin", "wyn", "ar", "bel", "rho")
_CITY_SUFFIXES = ("", "", "port", "ford", "holm", "stead", "ton", "mouth", "burg", "vale")
_COUNTRY_SUFFIXES = ("ia", "land", "ora", "istan", "ica", "onia")
_ORG_SUFFIXES = ("Dynamics", "Institute", "Company", "Foundry", "Group", "Laboratories",
                 "Works", "Society", "Bank", "Press", "Academy", "Shipyards")
_OCCUPATIONS = ("architect", "physicist", "novelist", "painter", "composer", "engineer",
                "botanist", "historian", "sculptor", "chemist", "astronomer", "economist",
                "philosopher", "cartographer", "surgeon", "poet", "diplomat", "linguist")
_INDUSTRIES = ("shipping", "textiles", "banking", "publishing", "mining", "aviation",
               "pharmaceuticals", "software", "agriculture", "optics", "railways", "brewing")
_CURRENCIES = ("crown", "mark", "florin", "ducat", "talent", "shilling", "dinar", "real",
               "thaler", "peso", "guilder", "sol", "lira", "rand", "koruna", "escudo")
_GENRES = ("novel", "film", "opera", "symphony", "painting", "play", "poem cycle", "ballet")
_ADJECTIVES = ("Silent", "Golden", "Hidden", "Broken", "Crimson", "Distant", "Frozen",
               "Hollow", "Last", "Northern", "Quiet", "Restless", "Scarlet", "Sleeping",
               "Wandering", "Burning", "Glass", "Iron", "Lonely", "Secret", "Velvet", "Winter")
_NOUNS = ("Harbor", "Garden", "Lantern", "River", "Orchard", "Mirror", "Tower", "Compass",
          "Meadow", "Bridge", "Voyage", "Archive", "Citadel", "Feather", "Labyrinth",
          "Monsoon", "Observatory", "Pilgrim", "Tide", "Violin", "Window", "Cathedral")
_FILLER = (
    "{name} is mentioned in several regional chronicles of the {decade}s.",
    "Accounts of {name} were collected by local archivists over many decades.",
    "Scholars have debated the early history of {name} at length.",
    "A number of letters concerning {name} survive in private collections.",
    "{name} appears in the travel journals of more than one visitor.",
    "Public interest in {name} grew steadily during the {decade}s.",
    "Several exhibitions have been devoted to {name} and its surroundings.",
    "Little is recorded about {name} before the {decade}s.",
    "Commentators often contrast {name} with its neighbours.",
    "The archives hold maps, photographs and correspondence related to {name}.",
)

_PREFIX = {"person": "P", "city": "C", "country": "K", "org": "O", "work": "W"}
# Relation -> (source kind, target kind, noun phrase around {x}, question about {x}).
RELATIONS: dict[str, tuple[str, str, str, str]] = {
    "born_in": ("person", "city", "the birthplace of {x}", "Where was {x} born?"),
    "employer": ("person", "org", "the employer of {x}", "Which organisation employs {x}?"),
    "country": ("city", "country", "the country where {x} is located",
                "In which country is {x} located?"),
    "mayor": ("city", "person", "the mayor of {x}", "Who is the mayor of {x}?"),
    "capital": ("country", "city", "the capital of {x}", "What is the capital of {x}?"),
    "headquarters": ("org", "city", "the city where {x} is headquartered",
                     "In which city is {x} headquartered?"),
    "founder": ("org", "person", "the founder of {x}", "Who founded {x}?"),
    "creator": ("work", "person", "the creator of {x}", "Who created {x}?"),
}
# Attribute -> (kind, question about {x}); attributes only end a chain.
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "birth_year": ("person", "In what year was {x} born?"),
    "occupation": ("person", "What is the occupation of {x}?"),
    "population": ("city", "What is the population of {x}?"),
    "city_founded": ("city", "In what year was {x} founded?"),
    "currency": ("country", "What is the currency of {x}?"),
    "org_founded": ("org", "In what year was {x} founded?"),
    "industry": ("org", "Which industry is {x} in?"),
    "year": ("work", "In what year was {x} first presented?"),
    "genre": ("work", "What kind of work is {x}?"),
}


@dataclasses.dataclass
class Entity:
  eid: str
  kind: str
  name: str
  attrs: dict[str, Any]
  rels: dict[str, str]  # relation -> target eid
  url: str = ""


@dataclasses.dataclass
class World:
  """The generated world in memory; `write_world` puts it on disk, `load_world` reads it back."""

  config: WorldConfig
  entities: dict[str, Entity]
  passages: list[dict]  # corpus rows: id, title, contents, url
  pages: list[dict]  # url, title, contents, links
  qa_train: list[dict]
  qa_test: list[dict]
  fact_passage: dict[str, str]  # "eid/relation-or-attribute" -> passage id

  def passage(self, pid: str) -> dict:
    if not hasattr(self, "_by_id"):
      self._by_id = {p["id"]: p for p in self.passages}
    return self._by_id[pid]


def _word(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
  return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(lo, hi))).capitalize()


def _mutate(rng: random.Random, word: str) -> str:
  """A near-duplicate: one letter changed or inserted, or one appended at the end."""
  i = rng.randrange(1, len(word))
  op = rng.randrange(3)
  letter = rng.choice("aeiourlnst")
  if op == 0:
    return word[:i] + letter + word[i + 1:]
  if op == 1:
    return word[:i] + letter + word[i:]
  return word + word[-1] if word[-1] not in "aeiou" else word + "w"


class _Names:
  """Names unique across the whole world, drawn from a maker until one is new."""

  def __init__(self):
    self.used: set[str] = set()

  def take(self, make) -> str:
    for _ in range(1000):
      name = make()
      if name not in self.used:
        self.used.add(name)
        return name
    raise ConfigError("world: the name space is exhausted: lower the world sizes")


def generate_world(config: WorldConfig | None = None) -> World:
  cfg = config or WorldConfig()
  rng = random.Random(cfg.seed)
  names = _Names()
  first_names = sorted({_word(rng, 1, 2) for _ in range(max(40, cfg.num_people // 6))})
  ents: dict[str, Entity] = {}
  counts: dict[str, int] = {}

  def add(kind: str, name: str, attrs: dict) -> Entity:
    counts[kind] = counts.get(kind, 0) + 1
    e = Entity(f"{_PREFIX[kind]}{counts[kind] - 1:05d}", kind, name, attrs, {},
               cfg.url_prefix + name.replace(" ", "_"))
    ents[e.eid] = e
    return e

  def near_or_fresh(pool: list[Entity], fresh, near) -> tuple[str, Entity | None]:
    """A distractor near a random pool member, or a fresh name."""
    if pool and rng.random() < cfg.distractor_fraction:
      base = rng.choice(pool)
      return names.take(lambda: near(base.name)), base
    return names.take(fresh), None

  countries: list[Entity] = []
  for _ in range(cfg.num_countries):
    name = names.take(lambda: _word(rng, 1, 2) + rng.choice(_COUNTRY_SUFFIXES))
    countries.append(add("country", name, {"currency": rng.choice(_CURRENCIES)}))
  cities: list[Entity] = []
  for _ in range(cfg.num_cities):
    name, base = near_or_fresh(
        cities, lambda: _word(rng, 2, 3) + rng.choice(_CITY_SUFFIXES), lambda n: _mutate(rng, n))
    attrs = {"population": rng.randrange(5_000, 3_000_000, 10),
             "city_founded": rng.randint(900, 1900)}
    if base is not None:  # a distractor: similar name and similar attributes
      attrs["city_founded"] = base.attrs["city_founded"] + rng.choice((-1, 1))
    cities.append(add("city", name, attrs))
  people: list[Entity] = []
  for _ in range(cfg.num_people):
    name, base = near_or_fresh(
        people, lambda: f"{rng.choice(first_names)} {_word(rng, 2, 3)}",
        lambda n: n.split(" ")[0] + " " + _mutate(rng, n.split(" ", 1)[1]))
    attrs = {"birth_year": rng.randint(1850, 1995), "occupation": rng.choice(_OCCUPATIONS)}
    if base is not None:
      attrs = {"birth_year": base.attrs["birth_year"] + rng.choice((-1, 1)),
               "occupation": base.attrs["occupation"]}
    people.append(add("person", name, attrs))
  orgs: list[Entity] = []
  for _ in range(cfg.num_orgs):
    name, base = near_or_fresh(
        orgs, lambda: f"{_word(rng, 2, 2)} {rng.choice(_ORG_SUFFIXES)}",
        lambda n: _mutate(rng, n.split(" ")[0]) + " " + n.split(" ", 1)[1])
    attrs = {"org_founded": rng.randint(1800, 2015), "industry": rng.choice(_INDUSTRIES)}
    if base is not None:
      attrs["industry"] = base.attrs["industry"]
    orgs.append(add("org", name, attrs))
  works: list[Entity] = []
  for _ in range(cfg.num_works):
    def fresh_work() -> str:
      title = f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
      return title if rng.random() < 0.5 else f"{title} of {_word(rng, 2, 2)}"
    name = names.take(fresh_work)
    works.append(add("work", name, {"year": rng.randint(1600, 2020),
                                    "genre": rng.choice(_GENRES)}))

  # Functional relations: every entity has exactly one target per relation of its kind.
  for i, c in enumerate(cities):
    c.rels["country"] = countries[i % len(countries)].eid if i < len(countries) \
        else rng.choice(countries).eid
  by_country: dict[str, list[Entity]] = {}
  for c in cities:
    by_country.setdefault(c.rels["country"], []).append(c)
  for k in countries:
    k.rels["capital"] = rng.choice(by_country[k.eid]).eid
  mayors = rng.sample(people, min(len(people), len(cities)))
  for c, m in zip(cities, mayors):
    c.rels["mayor"] = m.eid
  for c in cities[len(mayors):]:
    c.rels["mayor"] = rng.choice(people).eid
  for p in people:
    p.rels["born_in"] = rng.choice(cities).eid
    p.rels["employer"] = rng.choice(orgs).eid
  for o in orgs:
    o.rels["headquarters"] = rng.choice(cities).eid
    o.rels["founder"] = rng.choice(people).eid
  for w in works:
    w.rels["creator"] = rng.choice(people).eid

  passages, fact_passage = _passages(rng, ents, cfg.max_facts_per_passage)
  pages = _pages(rng, cfg, ents)
  qa_train, qa_test = _questions(rng, cfg, ents, fact_passage)
  return World(cfg, ents, passages, pages, qa_train, qa_test, fact_passage)


def fact_sentence(e: Entity, key: str, ents: dict[str, Entity]) -> str:
  """The sentence that states one fact (a relation or an attribute) of `e`."""
  t = ents[e.rels[key]].name if key in e.rels else None
  a = e.attrs
  return {
      "born_in": f"{e.name} was born in {t}.",
      "employer": f"{e.name} worked for {t}.",
      "country": f"{e.name} is a city in {t}.",
      "mayor": f"The mayor of {e.name} is {t}.",
      "capital": f"The capital of {e.name} is {t}.",
      "headquarters": f"{e.name} is headquartered in {t}.",
      "founder": f"{e.name} was founded by {t}.",
      "creator": f"{e.name} was created by {t}.",
      "birth_year": f"{e.name} was born in the year {a.get('birth_year')}.",
      "occupation": f"{e.name} is a {a.get('occupation')} by profession.",
      "population": f"{e.name} has a population of {a.get('population')}.",
      "city_founded": f"{e.name} was founded in {a.get('city_founded')}.",
      "currency": f"The currency of {e.name} is the {a.get('currency')}.",
      "org_founded": f"{e.name} was established in {a.get('org_founded')}.",
      "industry": f"{e.name} operates in the {a.get('industry')} industry.",
      "year": f"{e.name} was first presented in {a.get('year')}.",
      "genre": f"{e.name} is a {a.get('genre')}.",
  }[key]


def _passages(rng: random.Random, ents: dict[str, Entity], max_facts: int
              ) -> tuple[list[dict], dict[str, str]]:
  """Short passages of 1..max_facts facts each, wiki-18 style: contents = '"Title"\\ntext'."""
  rows: list[dict] = []
  fact_passage: dict[str, str] = {}
  for e in ents.values():
    keys = list(e.rels) + list(e.attrs)
    rng.shuffle(keys)
    i = 0
    while i < len(keys):
      group = keys[i:i + rng.choice(range(1, max_facts + 1))]
      i += len(group)
      pid = f"w{len(rows):07d}"
      text = " ".join(fact_sentence(e, k, ents) for k in group)
      rows.append({"id": pid, "title": e.name, "contents": f'"{e.name}"\n{text}', "url": e.url})
      for k in group:
        fact_passage[f"{e.eid}/{k}"] = pid
  return rows, fact_passage


def _pages(rng: random.Random, cfg: WorldConfig, ents: dict[str, Entity]) -> list[dict]:
  """One longer page per entity: its facts, the facts that point at it, filler, and links."""
  incoming: dict[str, list[tuple[Entity, str]]] = {}
  for e in ents.values():
    for rel, t in e.rels.items():
      incoming.setdefault(t, []).append((e, rel))
  pages = []
  for e in ents.values():
    own = [fact_sentence(e, k, ents) for k in list(e.rels) + list(e.attrs)]
    back = [fact_sentence(src, rel, ents) for src, rel in incoming.get(e.eid, [])]
    decade = 10 * (1800 // 10 + rng.randrange(22))
    filler = [rng.choice(_FILLER).format(name=e.name, decade=decade)
              for _ in range(cfg.filler_sentences)]
    body = [f"{e.name} is a {e.kind if e.kind != 'org' else 'organisation'} in this world."]
    body += own
    if back:
      body.append("Related entries. " + " ".join(back))
    body += filler
    links = sorted({ents[t].url for t in e.rels.values()} |
                   {src.url for src, _ in incoming.get(e.eid, [])})
    see_also = ", ".join(sorted({ents[t].name for t in e.rels.values()}))
    contents = f"# {e.name}\n\n" + "\n\n".join(body) + f"\n\nSee also: {see_also}"
    pages.append({"url": e.url, "title": e.name, "contents": contents, "links": links})
  return pages


def _aliases(e: Entity | None, value: str, ents: dict[str, Entity]) -> list[str]:
  """Accepted spellings of an answer. An organisation's first word ("Marval" for "Marval
  Works") is one only when no other entity's name starts with or is that word, else the
  alias would also accept the wrong organisation."""
  out = [value]
  if e is not None and e.kind == "org":
    short = value.split(" ")[0]
    if short != value and not any(o.eid != e.eid and (o.name == short or o.name.split(" ")[0]
                                                     == short) for o in ents.values()):
      out.append(short)
  if value.isdigit() and len(value) > 4:
    out.append(f"{int(value):,}")
  return out


def _fact(step: dict) -> tuple[str, str]:
  return step["subject"], step["relation"]


def _questions(rng: random.Random, cfg: WorldConfig, ents: dict[str, Entity],
               fact_passage: dict[str, str]) -> tuple[list[dict], list[dict]]:
  """Chains of 1..max_hops steps: walk relations from a start entity, end on a relation or
  attribute; the noun phrase grows one relation per hop.

  The held-out split is by *final fact* (subject, relation): facts are drawn until about
  `test_fraction` of each hop's questions on each final relation end on one, those questions
  are the test set, and any other question whose chain touches a held-out fact anywhere is
  dropped. So a test answer is never the answer of a train question about the same fact, nor
  a step the policy saw rewarded in training: held-out success measures search, not
  memorisation. The draw is stratified by relation because facts differ in how many questions
  end on them (16 countries end every capital and currency question): drawn over all of a
  hop's questions at once, the facts that end many were drawn most often, and capital and
  currency ended 21% of held-out questions but 6% of train ones, so held-out measured mostly
  the relations that training saw least."""
  eids = sorted(ents)
  by_hop: list[list[dict]] = []
  seen: set[str] = set()
  for hops in range(cfg.min_hops, cfg.max_hops + 1):
    items = []
    for _ in range(cfg.questions_per_hop * 3):
      if len(items) >= cfg.questions_per_hop:
        break
      item = _one_question(rng, ents, eids, hops, fact_passage)
      if item is None or item["question"] in seen:
        continue
      seen.add(item["question"])
      items.append(item)
    rng.shuffle(items)
    by_hop.append(items)
  held: set[tuple[str, str]] = set()
  for items in by_hop:
    by_relation: dict[str, list[dict]] = {}
    for q in items:
      by_relation.setdefault(q["chain"][-1]["relation"], []).append(q)
    for group in by_relation.values():
      _hold_out(group, round(len(group) * cfg.test_fraction) if len(group) > 1 else 0, held)
    if len(items) > 1 and not any(_fact(q["chain"][-1]) in held for q in items):
      held.add(_fact(items[0]["chain"][-1]))  # a small world's hop still holds out a fact
  if not held and sum(map(len, by_hop)) > 1:  # one question a hop: the last hop's is held out
    held.add(_fact(next(items for items in reversed(by_hop) if items)[0]["chain"][-1]))
  train: list[dict] = []
  test: list[dict] = []
  for items in by_hop:
    for q in items:
      if _fact(q["chain"][-1]) in held:
        test.append(q)
      elif not any(_fact(step) in held for step in q["chain"]):
        train.append(q)
  for split, rows in (("train", train), ("test", test)):
    for i, row in enumerate(rows):
      row["qid"] = f"{split}-{i:06d}"
  return train, test


def _hold_out(items: list[dict], target: int, held: set[tuple[str, str]]) -> None:
  """Adds final facts of `items` (in their shuffled order) to `held` until about `target` of
  them end on one. A fact that would overshoot the target by more than half its own questions
  is passed over, so one fact that ends many questions cannot take a relation's held-out share
  alone."""
  ends = Counter(_fact(q["chain"][-1]) for q in items)
  n_test = sum(n for f, n in ends.items() if f in held)
  for q in items:
    if n_test >= target:
      break
    f = _fact(q["chain"][-1])
    if f not in held and n_test + ends[f] - target <= ends[f] // 2:
      held.add(f)
      n_test += ends[f]


def _one_question(rng: random.Random, ents: dict[str, Entity], eids: list[str], hops: int,
                  fact_passage: dict[str, str]) -> dict | None:
  start = ents[rng.choice(eids)]
  cur, visited, chain = start, {start.eid}, []
  phrase = start.name
  for _ in range(hops - 1):
    options = [r for r in sorted(cur.rels) if cur.rels[r] not in visited]
    if not options:
      return None
    rel = rng.choice(options)
    nxt = ents[cur.rels[rel]]
    chain.append({"subject": cur.eid, "relation": rel, "object": nxt.eid, "value": nxt.name,
                  "passage": fact_passage[f"{cur.eid}/{rel}"]})
    phrase = RELATIONS[rel][2].format(x=phrase)
    visited.add(nxt.eid)
    cur = nxt
  finals = [r for r in sorted(cur.rels) if cur.rels[r] not in visited] + sorted(cur.attrs)
  if not finals:
    return None
  key = rng.choice(finals)
  if key in cur.rels:
    target = ents[cur.rels[key]]
    answer, question = target.name, RELATIONS[key][3].format(x=phrase)
    chain.append({"subject": cur.eid, "relation": key, "object": target.eid, "value": answer,
                  "passage": fact_passage[f"{cur.eid}/{key}"]})
  else:
    target = None
    answer, question = str(cur.attrs[key]), ATTRIBUTES[key][1].format(x=phrase)
    chain.append({"subject": cur.eid, "relation": key, "object": None, "value": answer,
                  "passage": fact_passage[f"{cur.eid}/{key}"]})
  question = question[0].upper() + question[1:]
  return {"question": question, "answer": answer, "aug_answer": _aliases(target, answer, ents),
          "hops": hops, "start": start.eid, "chain": chain,
          "supporting_facts": [step["passage"] for step in chain]}


def walk(world: World, item: dict) -> str:
  """The answer to a QA item computed by walking the graph from its start entity."""
  cur = world.entities[item["start"]]
  for step in item["chain"]:
    key = step["relation"]
    if key in cur.rels:
      cur = world.entities[cur.rels[key]]
    elif key in cur.attrs:
      return str(cur.attrs[key])
    else:
      raise KeyError(f"{cur.eid} ({cur.name}) has no relation or attribute {key!r}")
  return cur.name


def verify(world: World, item: dict) -> bool:
  """True iff the item's answer is what a graph walk gives, its question names the start
  entity, the chain is as long as `hops`, and each supporting passage states its step."""
  try:
    if walk(world, item) != item["answer"] or len(item["chain"]) != item["hops"]:
      return False
    if world.entities[item["start"]].name not in item["question"]:
      return False
    for step in item["chain"]:
      text = world.passage(step["passage"])["contents"]
      subject = world.entities[step["subject"]].name
      if subject not in text or step["value"] not in text:
        return False
    return True
  except KeyError:
    return False
