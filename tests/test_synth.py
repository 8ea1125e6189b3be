"""The QA synthesis agent against a scripted OpenAI-compatible LLM on 127.0.0.1.

`ScriptedLLM` plays every prompt from its text, deterministically: it reads the task from the
prompt's heading and the fields from its labelled lines, and answers from the small world's
known facts (it quotes fact sentences from the page it is shown, describes an entity through
the fact it found, answers one-hop template questions correctly and others not at all). So the
loop's mechanics -- seeds, action choice, injection, fuzzing, verification verdicts, k
variants, rejections, resumption -- run for real over HTTP, and the world's facts give an
independent oracle for what verification should accept.
"""

import asyncio
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
from aiohttp import web

from asearcher_jax.config import load_config
from asearcher_jax.errors import ConfigError
from asearcher_jax.synth import synthesize
from asearcher_jax.synth.llm import SynthLLM, direct_answer, load_prompts
from asearcher_jax.synth.pages import PageSource
from asearcher_jax.synth.seeds import load_seeds, resolve_support
from asearcher_jax.synth.state import Fact, LLMUnavailable, QAState, Rejected
from asearcher_jax.synth.verify import Verifier
from asearcher_jax.synth.world_check import WorldFacts
from asearcher_jax.tools.retrieval_server import ServerThread
from asearcher_jax.world import WorldConfig, generate_world, load_world, write_world
from asearcher_jax.world.generator import ATTRIBUTES, RELATIONS, fact_sentence

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SYNTH_YAML = os.path.join(ROOT, "configs", "synth.yaml")
SMALL = WorldConfig(num_people=60, num_cities=12, num_countries=4, num_orgs=12, num_works=16,
                    questions_per_hop=30, max_hops=2, filler_sentences=2)
# Backward descriptions: the entity is the *subject* of the fact, so many may fit it.
INVERSE = {"born_in": "a person born in {b}", "employer": "a person who worked for {b}",
           "country": "a city in {b}", "mayor": "the city whose mayor is {b}",
           "capital": "the country whose capital is {b}",
           "headquarters": "an organisation headquartered in {b}",
           "founder": "an organisation founded by {b}", "creator": "a work created by {b}"}
KIND_WORD = {"person": "person", "city": "city", "country": "country", "org": "organisation",
             "work": "work"}


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  return write_world(generate_world(SMALL), str(tmp_path_factory.mktemp("world") / "w"))


@pytest.fixture(scope="module")
def world(world_dir):
  return load_world(world_dir)


class Knowledge:
  """What the scripted LLM 'knows': the world's fact sentences and one-hop questions."""

  def __init__(self, world):
    self.ents = world.entities
    self.by_name = {e.name: e for e in world.entities.values()}
    self.sentence = {}  # fact sentence -> (eid, key)
    self.template = {}  # one-hop question -> answer
    for e in world.entities.values():
      for key in list(e.rels) + list(e.attrs):
        self.sentence[fact_sentence(e, key, world.entities)] = (e.eid, key)
        if key in e.rels:
          self.template[RELATIONS[key][3].format(x=e.name)] = self.ents[e.rels[key]].name
        else:
          self.template[ATTRIBUTES[key][1].format(x=e.name)] = str(e.attrs[key])

  def subjects(self, key, obj_eid):
    return [e for e in self.ents.values() if e.rels.get(key) == obj_eid]

  def readings(self, question, entity, matches):
    """Answers of `question` (a one-hop template naming `entity`) for each entity that fits
    the description that replaced it."""
    out = set()
    for m in matches:
      answer = self.template.get(question.replace(entity, m.name))
      if answer is not None:
        out.add(answer)
    return out


def _field(prompt, label):
  m = re.search(rf"^{re.escape(label)}: (.*)$", prompt, re.M)
  return m.group(1).strip() if m else None


def _page(prompt):
  m = re.search(r'<page title="(.*?)">\n(.*?)\n</page>', prompt, re.S)
  return m.group(1), m.group(2)


def _sentences(text):
  return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


TASKS = {"Seed question from a page": "base_qa", "Supporting fact": "seed_fact",
         "Choose the next action": "choose", "Injection": "inject", "Composition": "compose",
         "Fuzzing": "fuzz", "Quality check": "quality", "Direct answer": "solve",
         "Answer uniqueness": "alternative", "You are an evaluation assistant": "judge"}


class ScriptedLLM:
  """/v1/chat/completions that plays the synthesis prompts (see the module docstring). Its
  solver answers one-hop questions right and composed ones not at all, except that it names
  another valid reading of a composed question that has one (and its uniqueness judge then
  confirms that reading)."""

  def __init__(self, know, exit_after=99):
    self.know, self.exit_after = know, exit_after
    self.fail_on = ()  # prompts with these substrings get 503 (the endpoint is down)
    self.refuse_on = ()  # ... get 400 (the endpoint refuses this request)
    self.garbage_on = ()  # ... get prose instead of JSON for the action choice
    self.unclear = ()  # questions with these substrings are judged unclear
    self.readings = {}  # composed question -> its valid answers, as this "model" sees them
    self.gold = {}  # composed question -> the answer it was composed for
    self.solve_answers = {}  # question -> scripted tool-free answer
    self.alternatives = set()  # answers the uniqueness judge calls valid alternatives
    self.pending = {}  # description -> (entity, matches), from inject to compose
    self.tamper = {}  # task -> function(reply, prompt) -> reply: a model that misbehaves
    self.requests = []  # (task, prompt)

  def task(self, prompt):
    head = prompt.splitlines()[0].lstrip("# ").strip()
    return next(t for h, t in TASKS.items() if head.startswith(h))

  def reply(self, task, p):
    know = self.know
    if task == "base_qa":
      title, text = _page(p)
      given = _field(p, "Fact to use")
      ent = know.by_name[title]
      if given.startswith("("):
        given = next(s for s in _sentences(text) if know.sentence.get(s, ("",))[0] == ent.eid)
      _, key = know.sentence[given]
      if key in ent.rels:
        return {"question": RELATIONS[key][3].format(x=title),
                "answer": know.ents[ent.rels[key]].name, "fact": given}
      question = given.replace(title, f"which {KIND_WORD[ent.kind]}", 1).rstrip(".") + "?"
      return {"question": question[0].upper() + question[1:], "answer": title, "fact": given}
    if task == "seed_fact":
      answer, (_, text) = _field(p, "Answer"), _page(p)
      return {"fact": next((s for s in _sentences(text) if answer in s), "")}
    if task == "choose":
      offered = re.findall(r"^- (\w+):", p, re.M)
      history = _field(p, "Actions done so far")
      done = 0 if history == "(none)" else history.count(";") + 1
      entities = _field(p, "Entities in the question that have a page (candidates for "
                           "injection)")
      if "exit" in offered and done >= self.exit_after:
        return {"action": "exit", "reason": "hard enough"}
      if "inject" in offered:
        return {"action": "inject", "entity": entities.split(", ")[0], "reason": "add a hop"}
      return {"action": "fuzz", "reason": "blur"}
    if task == "inject":
      entity, (title, text) = _field(p, "Entity"), _page(p)
      a, b = know.by_name[entity], know.by_name[title]
      forward = backward = None
      for s in _sentences(text):
        eid, key = know.sentence.get(s, (None, None))
        if eid == b.eid and b.rels.get(key) == a.eid:
          forward = forward or (s, RELATIONS[key][2].format(x=title), [a])
        elif eid == a.eid and a.rels.get(key) == b.eid:
          backward = backward or (s, INVERSE[key].format(b=title), know.subjects(key, b.eid))
      found = forward or backward
      if found is None:
        return {"fact": "", "description": ""}
      self.pending[found[1]] = (entity, found[2])
      return {"fact": found[0], "description": found[1]}
    if task == "compose":
      q, entity, desc = _field(p, "Question"), _field(p, "Entity"), _field(p, "Description")
      new = q.replace(entity, desc)
      new = new[0].upper() + new[1:]
      _, matches = self.pending[desc]
      self.gold[new] = _field(p, "Answer")
      if q in know.template:
        self.readings[new] = know.readings(q, entity, matches)
      return {"question": new}
    if task == "fuzz":
      q, answer = _field(p, "Question"), _field(p, "Answer")
      year = next((y for y in re.findall(r"\b1\d{3}\b", q) if y != answer), None)
      if year:
        return {"original": year, "fuzzed": f"the {int(year) // 10 * 10}s",
                "question": q.replace(year, f"the {int(year) // 10 * 10}s")}
      names = sorted((n for n in know.by_name if re.search(rf"\b{re.escape(n)}\b", q)),
                     key=len)
      if not names:
        return {"original": "", "fuzzed": "", "question": q}
      kind = KIND_WORD[know.by_name[names[-1]].kind]
      return {"original": names[-1], "fuzzed": f"a certain {kind}",
              "question": q.replace(names[-1], f"a certain {kind}")}
    if task == "quality":
      q = _field(p, "Question")
      clear = q.count("?") == 1 and not any(u in q for u in self.unclear)
      return {"clear": clear, "grounded": True, "unique": True, "reason": "scripted"}
    if task == "solve":
      q = _field(p, "Question")
      if q in self.solve_answers:
        return {"answer": self.solve_answers[q]}
      if q in know.template:
        return {"answer": know.template[q]}
      others = sorted(self.readings.get(q, set()) - {self.gold.get(q)})
      return {"answer": others[0] if others else "I do not know"}
    if task == "alternative":
      q, cand = _field(p, "Question"), _field(p, "Other answer")
      valid = cand in self.alternatives or cand in self.readings.get(q, set())
      return {"alternative": valid, "reason": "scripted"}
    if task == "judge":
      pred = _field(p, "Predicted Answer").lower()
      gold = [g.strip().lower() for g in _field(p, "Labeled Answer").split("|")]
      verdict = "correct" if any(g in pred for g in gold) else "incorrect"
      return {"rationale": "scripted", "judgement": verdict}
    raise AssertionError(task)

  def app(self):
    app = web.Application()

    async def chat(request):
      body = await request.json()
      prompt = body["messages"][0]["content"]
      task = self.task(prompt)
      self.requests.append((task, prompt))
      if any(f in prompt for f in self.fail_on):
        return web.json_response({"error": "scripted outage"}, status=503)
      if any(f in prompt for f in self.refuse_on):
        return web.json_response({"error": {"message": "prompt is too long"}}, status=400)
      if any(g in prompt for g in self.garbage_on) and task == "choose":
        content = "Let me think about which action is best here."
      else:
        reply = self.reply(task, prompt)
        reply = self.tamper.get(task, lambda r, p: r)(reply, prompt)
        content = "```json\n" + json.dumps(reply) + "\n```"
      return web.json_response({"choices": [{"index": 0, "finish_reason": "stop", "message": {
          "role": "assistant", "content": content}}]})

    async def models(request):
      return web.json_response({"object": "list", "data": [{"id": "scripted-model"}]})

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app

  def tasks(self):
    return Counter(t for t, _ in self.requests)


@pytest.fixture
def llm(world):
  fake = ScriptedLLM(Knowledge(world))
  with ServerThread(fake.app()) as server:
    fake.url = server.url + "/v1"
    yield fake


def make_cfg(world_dir, out_dir, url, **synth):
  section = {"llm": {"base_url": url, "model": "scripted", "max_retries": 1, "backoff_s": 0.01,
                     "max_backoff_s": 0.02, "timeout_s": 10},
             "world_dir": world_dir, "out_dir": str(out_dir), "difficulty_samples": 2,
             "concurrency": 4}
  section.update(synth)
  return load_config(SYNTH_YAML, [f"synth={json.dumps(section)}",
                                  f"reward.judge.base_url={url}", "reward.judge.model=scripted"])


def one_hop_seeds(world, path, n, relations_only=True):
  rows = [q for q in world.qa_train if q["hops"] == 1
          and (not relations_only or q["chain"][0]["relation"] in RELATIONS)][:n]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return rows


def run(cfg):
  return asyncio.run(synthesize(cfg, progress=False, echo=lambda s: None))


def journal(out_dir):
  with open(os.path.join(out_dir, "seeds.jsonl")) as f:
    return [json.loads(line) for line in f]


def world_page(world, url):
  return next(p["contents"] for p in world.pages if p["url"] == url)


def qa_rows(out_dir):
  with open(os.path.join(out_dir, "qa.jsonl")) as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------ prompts, seeds

def test_prompts_load_and_overrides_are_checked(tmp_path):
  prompts = load_prompts()
  assert set(prompts) >= {"inject", "fuzz", "quality", "solve", "alternative"}
  (tmp_path / "fuzz.txt").write_text("# Fuzzing\nQ={question} A={answer} F={facts} {{json}}")
  assert load_prompts(str(tmp_path))["fuzz"].startswith("# Fuzzing\nQ={question}")
  assert load_prompts(str(tmp_path))["inject"] == prompts["inject"]  # packaged fallback
  (tmp_path / "solve.txt").write_text("no placeholder")
  with pytest.raises(ConfigError, match="lacks placeholders"):
    load_prompts(str(tmp_path))
  (tmp_path / "solve.txt").write_text("{question} {answer}")
  with pytest.raises(ConfigError, match="bad placeholder"):
    load_prompts(str(tmp_path))
  with pytest.raises(ConfigError, match="no such directory"):
    load_prompts(str(tmp_path / "nope"))


def test_seeds_resolve_from_world_qa_hotpot_rows_pages_and_an_index(world_dir, world, tmp_path):
  pages = PageSource(os.path.join(world_dir, "pages.jsonl"),
                     os.path.join(world_dir, "corpus.jsonl"))
  qa = one_hop_seeds(world, tmp_path / "qa.jsonl", 3)
  subject = world.entities[qa[0]["chain"][0]["subject"]]
  page = pages.by_title(subject.name)
  assert page["url"] == subject.url and pages.by_title(subject.name.upper()) == page
  other = world.entities[world.entities[subject.eid].rels["employer"]]
  hotpot = {"question": "q?", "answer": "a", "supporting_facts": [[other.name, 0]],
            "context": [[other.name, [fact_sentence(other, "industry", world.entities)]]]}
  quoted = {"question": "q?", "answer": "a",
            "supporting_facts": [{"url": subject.url, "text": "Not on the page at all."},
                                 {"title": other.name}]}
  with open(tmp_path / "more.jsonl", "w") as f:
    for row in (hotpot, quoted, {"question": "q?", "answer": "a", "supporting_facts": ["zz"]}):
      f.write(json.dumps(row) + "\n")
  with open(tmp_path / "pages.jsonl", "w") as f:
    f.write(json.dumps({"title": subject.name, "fact": fact_sentence(subject, "born_in",
                                                                      world.entities)}) + "\n")
    f.write(json.dumps({"url": subject.url, "fact": "Invented."}) + "\n")
    f.write(json.dumps({"title": "No Such Page"}) + "\n")
  cfg = make_cfg(world_dir, tmp_path / "o", "http://127.0.0.1:1/v1",
                 seeds=[str(tmp_path / "qa.jsonl"), str(tmp_path / "more.jsonl")],
                 seed_pages=str(tmp_path / "pages.jsonl"), random_pages=2).synth
  seeds, dropped = load_seeds(cfg, pages, echo=lambda s: None)
  assert [s.kind for s in seeds] == ["qa"] * 5 + ["page"] * 3
  assert dropped == Counter({"seed:no_supporting_page": 1, "seed:fact_not_on_page": 1,
                             "seed:page_not_found": 1})
  for s, row in zip(seeds, qa):  # world QA: the cited passage's sentences, on the page
    assert s.question == row["question"] and s.answers[0] == row["answer"]
    passage = world.passage(row["supporting_facts"][0])["contents"].split("\n", 1)[1]
    assert [f.text for f in s.facts] == _sentences(passage) and not s.pages
    assert all(f.text in pages.page(f.url)["contents"] for f in s.facts)
  assert seeds[3].facts == (Fact(other.url, other.name,
                                 fact_sentence(other, "industry", world.entities)),)
  assert seeds[4].facts == () and seeds[4].pages == (other.url,)  # misquote dropped; page kept
  assert seeds[5].facts[0].url == subject.url and seeds[5].pages == ()
  again, _ = load_seeds(cfg, pages, echo=lambda s: None)
  assert [s.seed_id for s in again] == [s.seed_id for s in seeds]  # random pages: seeded
  assert len({s.seed_id for s in seeds}) == len(seeds)

  from asearcher_jax.tools.index import build_index
  index = str(tmp_path / "index")
  build_index(os.path.join(world_dir, "corpus.jsonl"), index,
              pages=os.path.join(world_dir, "pages.jsonl"), log=lambda s: None)
  via_index = PageSource(index)
  try:
    assert via_index.page(subject.url) == page and len(via_index) == len(pages)
    item = load_seeds(cfg.model_copy(update={"seeds": (str(tmp_path / "qa.jsonl"),),
                                             "seed_pages": None, "random_pages": 0}),
                      via_index, echo=lambda s: None)[0]
    assert [s.facts for s in item] == [s.facts for s in seeds[:3]]  # passages from the docs
  finally:
    via_index.close()


def _world_pages(world_dir):
  return PageSource(os.path.join(world_dir, "pages.jsonl"),
                    os.path.join(world_dir, "corpus.jsonl"))


def test_seed_ids_stay_unique_when_a_suffixed_id_is_taken(world_dir, world, tmp_path):
  """Bug: a repeated id got `#N` by count alone, so file A's second "a" and file B's "a" were
  both "a#2": duplicate qids in qa.jsonl, one seed's items lost, resume never settled."""
  rows = [{**r, "qid": "a"} for r in one_hop_seeds(world, tmp_path / "all.jsonl", 3)]
  for name, part in (("A.jsonl", rows[:2]), ("B.jsonl", rows[2:])):
    with open(tmp_path / name, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in part)
  cfg = make_cfg(world_dir, tmp_path / "o", "http://127.0.0.1:1/v1",
                 seeds=[str(tmp_path / "A.jsonl"), str(tmp_path / "B.jsonl")]).synth
  seeds, _ = load_seeds(cfg, _world_pages(world_dir), echo=lambda s: None)
  assert [s.seed_id for s in seeds] == ["a", "a#2", "a#3"]
  assert [s.question for s in seeds] == [r["question"] for r in rows]


def test_limit_counts_only_the_seeds_and_drops_before_it(world_dir, world, tmp_path):
  """Bug: drops were counted over the whole file and the limit cut after, so `--limit 1` on
  2 good and 5 bad rows reported 6 seeds, 5 dropped."""
  good = one_hop_seeds(world, tmp_path / "good.jsonl", 2)
  bad = [{"question": f"q{i}?", "answer": "a", "supporting_facts": ["nope"]} for i in range(3)]
  with open(tmp_path / "qa.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in [bad[0], good[0], good[1], *bad[1:]])
  for limit, n, drops in ((1, 1, 1), (2, 2, 1), (None, 2, 3)):
    cfg = make_cfg(world_dir, tmp_path / "o", "http://127.0.0.1:1/v1",
                   seeds=[str(tmp_path / "qa.jsonl")], limit=limit).synth
    seeds, dropped = load_seeds(cfg, _world_pages(world_dir), echo=lambda s: None)
    assert len(seeds) == n and dropped == Counter({"seed:no_supporting_page": drops}), limit


# -------------------------------------------------------------------------------- verification

def _state(world, question, answer, *facts):
  ents = {e.name: e for e in world.entities.values()}
  out = []
  for name, key in facts:
    e = ents[name]
    out.append(Fact(e.url, e.name, fact_sentence(e, key, world.entities)))
  return QAState(question, (answer,), (), tuple(out))


def _verifier(world_dir, world, fake, tmp_path, exact=False, **synth):
  cfg = make_cfg(world_dir, tmp_path / "o", fake.url, **synth).synth
  pages = PageSource(os.path.join(world_dir, "pages.jsonl"))
  judge = None
  if cfg.answer_check == "judge":
    from asearcher_jax.reward.judge import Judge
    judge = Judge(make_cfg(world_dir, tmp_path, fake.url).reward.judge)
  return Verifier(cfg, SynthLLM(cfg), pages, WorldFacts(world) if exact else None, judge)


def _verify(verifier, state):
  async def go():
    try:
      return await verifier.verify(state)
    finally:
      await verifier.llm.close()
      if verifier.judge is not None:
        await verifier.judge.close()
  return asyncio.run(go())


def _rejected(verifier, state):
  with pytest.raises(Rejected) as e:
    _verify(verifier, state)
  return e.value


def _person_with_two_coworkers_born_apart(world):
  """A person P whose employer O also employs someone born elsewhere (so "a person who
  worked for O" does not pin P's birthplace), found by the test itself."""
  for p in world.entities.values():
    if p.kind != "person":
      continue
    o = p.rels["employer"]
    places = {q.rels["born_in"] for q in world.entities.values()
              if q.kind == "person" and q.rels["employer"] == o}
    if len(places) > 1:
      return p, world.entities[o]
  raise AssertionError("the small world has no such person")


def test_quality_checks_accept_and_reject(world_dir, world, llm, tmp_path):
  p, o = _person_with_two_coworkers_born_apart(world)
  city = world.entities[p.rels["born_in"]]
  good = _state(world, f"Where was {p.name} born?", city.name, (p.name, "born_in"))
  v = _verify(_verifier(world_dir, world, llm, tmp_path), good)
  assert v["quality"]["checks"]["facts_on_pages"] == 1 and v["quality"]["judge"]["clear"]
  assert v["hard"] is False and v["difficulty"]["answers"] == [city.name, city.name]

  bad = {
      "quality:not_a_question": good.evolve(question=f"Tell me where {p.name} was born."),
      "quality:several_questions": good.evolve(question=f"Who is {p.name}? Where was he born?"),
      "quality:answer_in_question": good.evolve(question=f"Was {p.name} born in {city.name}?"),
      "quality:fact_not_on_page": good.evolve(facts=(Fact(o.url, o.name, good.facts[0].text),)),
      "quality:answer_not_in_facts": good.evolve(facts=(Fact(
          p.url, p.name, fact_sentence(p, "employer", world.entities)),)),
      "quality:no_facts": good.evolve(facts=()),
  }
  misquote = Fact(p.url, p.name, good.facts[0].text.replace(city.name, city.name + "x"))
  bad["quality:fact_not_on_page#2"] = good.evolve(facts=(misquote,))
  verifier = _verifier(world_dir, world, llm, tmp_path)
  for reason, state in bad.items():
    assert _rejected(verifier, state).reason == reason.split("#")[0], reason

  # A filler sentence is on the page, so the LLM verifier takes it as support; the world
  # verifier knows it states no fact.
  filler = next(s for s in _sentences(verifier.pages.page(p.url)["contents"])
                if p.name in s and s not in {fact_sentence(p, k, world.entities)
                                             for k in list(p.rels) + list(p.attrs)}
                and not s.startswith(("#", "Related", "See also")) and "is a person" not in s)
  noisy = good.evolve(facts=good.facts + (Fact(p.url, p.name, filler),))
  assert _verify(_verifier(world_dir, world, llm, tmp_path), noisy)["quality"]
  r = _rejected(_verifier(world_dir, world, llm, tmp_path, exact=True), noisy)
  assert r.reason == "quality:not_a_world_fact" and r.detail == filler

  llm.unclear = ("Kindly",)
  r = _rejected(_verifier(world_dir, world, llm, tmp_path),
                good.evolve(question=f"Kindly, where was {p.name} born?"))
  assert r.reason == "quality:judge_unclear" and r.verdict["quality"]["checks"]


def _org_and_founder(world):
  o = next(e for e in world.entities.values() if e.kind == "org")
  founder = world.entities[o.rels["founder"]].name
  assert len(founder.split()) == 2  # a first name alone is half the gold
  return o, founder


def test_difficulty_hard_only_when_no_sample_is_right(world_dir, world, llm, tmp_path):
  o, founder = _org_and_founder(world)
  seed = _state(world, f"Who founded {o.name}?", founder, (o.name, "founder"))
  assert _verify(_verifier(world_dir, world, llm, tmp_path), seed)["hard"] is False
  q = "Who founded the organisation in question?"
  first = founder.split()[0]
  llm.solve_answers[q] = first  # set-F1 2/3 against the gold, which it does not hold
  state = seed.evolve(question=q)
  for check, threshold, hard in (("em", 0.8, True), ("f1", 0.8, True), ("f1", 0.6, False),
                                 ("judge", 0.8, True)):
    v = _verify(_verifier(world_dir, world, llm, tmp_path, answer_check=check,
                          f1_threshold=threshold, difficulty_samples=3), state)
    assert v["hard"] is hard, check
    assert v["difficulty"]["answers"] == [first] * 3
  assert llm.tasks()["judge"] == 1  # three equal answers, judged once
  aliased = state.evolve(aug_answers=(first,))
  assert _verify(_verifier(world_dir, world, llm, tmp_path, answer_check="em"), aliased)[
      "hard"] is False


def test_difficulty_counts_a_wordy_right_answer_right(world_dir, world, llm, tmp_path):
  """Bug: a right answer said in a sentence had set-F1 < 0.8, so it counted as wrong and an
  easy question was kept as hard."""
  o, founder = _org_and_founder(world)
  q = "Who founded the organisation in question?"
  state = _state(world, q, founder, (o.name, "founder"))
  llm.solve_answers[q] = f"It was founded by {founder}, as far as I can recall."
  for check in ("f1", "judge"):
    v = _verify(_verifier(world_dir, world, llm, tmp_path, answer_check=check), state)
    assert v["difficulty"]["correct"] == [True, True] and v["hard"] is False, check


def test_a_solver_that_gives_no_answer_is_no_sample(world_dir, world, llm, tmp_path):
  """Bug: an empty or null reply counted as a wrong answer (the last line of a fenced
  {"answer": null}, "```", was taken for one): a silent solver made every question hard, and
  left no wrong answer for the uniqueness check."""
  assert direct_answer("") is None and direct_answer('```json\n{"answer": null}\n```') is None
  assert direct_answer('```json\n{"answer": "Lordorvale"}\n```') == "Lordorvale"
  assert direct_answer("I do not know") == "I do not know"  # a real answer, and wrong
  o, founder = _org_and_founder(world)
  state = _state(world, "Who founded the organisation in question?", founder,
                 (o.name, "founder"))
  llm.tamper = {"solve": lambda r, p: {"answer": None}}
  r = _rejected(_verifier(world_dir, world, llm, tmp_path), state)
  assert r.reason == "difficulty:no_answer" and "hard" not in r.verdict
  assert r.verdict["difficulty"]["answers"] == [] and llm.tasks()["alternative"] == 0


def test_answer_checks_read_punctuation_as_a_word_break(world_dir, world, tmp_path):
  """Bug: SQuAD normalisation deletes punctuation, so "Lordorvale's" hid Lordorvale from the
  answer-hidden check, and a "Paris-based" fact did not hold the answer Paris."""
  c = next(e for e in world.entities.values() if e.kind == "country")
  capital = world.entities[c.rels["capital"]].name
  cfg = make_cfg(world_dir, tmp_path / "o", "http://127.0.0.1:1/v1").synth
  verifier = Verifier(cfg, None, PageSource(os.path.join(world_dir, "pages.jsonl")))
  good = _state(world, f"Which city is the capital of {c.name}?", capital, (c.name, "capital"))
  assert verifier.basic(good)["answer_hidden"]
  for q in (f"Which city is the capital of {c.name} ({capital}'s country)?",
            f"Which {capital}-born city is the capital of {c.name}?"):
    with pytest.raises(Rejected, match="quality:answer_in_question"):
      verifier.basic(good.evolve(question=q))
  text = "Acme is a Paris-based company founded in 1950."
  with open(tmp_path / "pages.jsonl", "w") as f:
    f.write(json.dumps({"url": "https://x/wiki/Acme", "title": "Acme", "contents": text,
                        "links": []}) + "\n")
  acme = Verifier(cfg, None, PageSource(str(tmp_path / "pages.jsonl")))
  state = QAState("In which city is Acme based?", ("Paris",), (),
                  (Fact("https://x/wiki/Acme", "Acme", text),))
  assert acme.basic(state)["answer_in_facts"]


def test_llm_uniqueness_checks_each_distinct_wrong_answer(world_dir, world, llm, tmp_path):
  p, _ = _person_with_two_coworkers_born_apart(world)
  city = world.entities[p.rels["born_in"]].name
  state = _state(world, "Where was the person in question born?", city, (p.name, "born_in"))
  verifier = _verifier(world_dir, world, llm, tmp_path, difficulty_samples=3)

  async def check(wrong):
    try:
      return await verifier.uniqueness(state, wrong)
    finally:
      await verifier.llm.close()

  v = asyncio.run(check(["Lyon", "lyon.", "Paris", "  "]))
  assert [c["answer"] for c in v["checked"]] == ["lyon.", "Paris"]
  assert llm.tasks()["alternative"] == 2 and not any(c["alternative"] for c in v["checked"])
  llm.alternatives.add("Paris")
  with pytest.raises(Rejected) as e:
    asyncio.run(check(["Lyon", "Paris"]))
  assert e.value.reason == "uniqueness:alternative_answer" and e.value.detail == "Paris"
  llm.solve_answers[state.question] = "Paris"
  r = _rejected(verifier, state)
  assert r.reason == "uniqueness:alternative_answer"
  assert r.verdict["difficulty"]["hard"] and r.verdict["uniqueness"]["checked"][0]["alternative"]


def test_world_uniqueness_is_exact(world_dir, world, llm, tmp_path):
  know = Knowledge(world)
  verifier = _verifier(world_dir, world, llm, tmp_path, exact=True, quality_judge=False)
  # Forward: an organisation has one founder, so its founder's birthplace is unique.
  o = next(e for e in world.entities.values() if e.kind == "org")
  f = world.entities[o.rels["founder"]]
  city = world.entities[f.rels["born_in"]].name
  forward = _state(world, f"Where was the founder of {o.name} born?", city,
                   (f.name, "born_in"), (o.name, "founder"))
  v = _verify(verifier, forward)
  assert v["uniqueness"]["world"] == {"readings": [city], "finished": True} and v["hard"]
  # The answer as the reward reads it (case, article, punctuation): the same entity.
  v = _verify(verifier, forward.evolve(answers=(f"the {city.lower()}.",)))
  assert v["uniqueness"]["world"]["readings"] == [city]
  # An answer that is in the facts but is none of their entities or values (a word of a
  # sentence) has no reading: not unique.
  r = _rejected(verifier, forward.evolve(answers=("founded",)))
  assert r.reason == "uniqueness:unanchored"
  # Backward: "a person who worked for O" fits every employee of O.
  p, emp = _person_with_two_coworkers_born_apart(world)
  backward = _state(world, f"Where was a person who worked for {emp.name} born?",
                    world.entities[p.rels["born_in"]].name, (p.name, "born_in"),
                    (p.name, "employer"))
  r = _rejected(verifier, backward)
  assert r.reason == "uniqueness:ambiguous"
  # Spelt otherwise, the answer is still found among the readings, and still ambiguous.
  assert _rejected(verifier, backward.evolve(answers=(backward.answer.upper() + ".",))).reason == \
      "uniqueness:ambiguous"
  truth = {world.entities[q.rels["born_in"]].name for q in know.subjects("employer", emp.eid)}
  assert len(truth) > 1 and set(r.verdict["uniqueness"]["world"]["readings"]) <= truth
  # Backward but unique: every city has its own mayor.
  c = next(e for e in world.entities.values() if e.kind == "city")
  mayor, country = world.entities[c.rels["mayor"]], world.entities[c.rels["country"]]
  assert len(know.subjects("mayor", mayor.eid)) == 1
  v = _verify(verifier, _state(world, f"In which country is the city whose mayor is "
                                      f"{mayor.name} located?", country.name,
                               (c.name, "country"), (c.name, "mayor")))
  assert v["uniqueness"]["world"]["readings"] == [country.name]
  # Blurring the only named entity leaves every organisation's founder as a reading.
  r = _rejected(verifier, forward.evolve(question="Where was the founder of a certain "
                                                  "organisation born?"))
  assert r.reason == "uniqueness:ambiguous"
  # A named value constrains: the works first presented in a year, counted by the test.
  for w in (e for e in world.entities.values() if e.kind == "work"):
    state = _state(world, f"Who created the work first presented in {w.attrs['year']}?",
                   world.entities[w.rels["creator"]].name, (w.name, "year"),
                   (w.name, "creator"))
    creators = {world.entities[x.rels["creator"]].name for x in world.entities.values()
                if x.kind == "work" and x.attrs["year"] == w.attrs["year"]}
    found, finished = verifier.world.readings(state.question, state.answer, state.facts)
    assert finished and set(found) == creators if len(creators) < 3 else len(found) == 2


def test_world_uniqueness_of_a_blurred_answer_value_is_ambiguous(world_dir, world, llm,
                                                                  tmp_path):
  """Bug: with the one value that tied the answer to the question blurred ("born in 1989" ->
  "born in the 1980s"), the search never bound the answer: KeyError, and the seed aborted on
  every rerun. Nothing pins the answer then: every person is a reading."""
  p = next(e for e in world.entities.values() if e.kind == "person")
  decade = p.attrs["birth_year"] // 10 * 10
  state = _state(world, f"Which person was born in the {decade}s?", p.name,
                 (p.name, "birth_year"))
  verifier = _verifier(world_dir, world, llm, tmp_path, exact=True, quality_judge=False)
  r = _rejected(verifier, state)
  assert r.reason == "uniqueness:ambiguous"
  assert len(r.verdict["uniqueness"]["world"]["readings"]) == 2


# ------------------------------------------------------------------------------------- actions

def test_actions_hold_the_llm_to_its_claims(world_dir, world, llm, tmp_path):
  import random

  from asearcher_jax.synth.actions import fuzz, inject, injectable
  o = next(e for e in world.entities.values() if e.kind == "org")
  hq = world.entities[o.rels["headquarters"]]
  state = _state(world, f"In which city is {o.name} headquartered?", hq.name,
                 (o.name, "headquarters"))
  cfg = make_cfg(world_dir, tmp_path / "o", llm.url).synth
  pages = PageSource(os.path.join(world_dir, "pages.jsonl"))
  assert injectable(state, pages) == {o.name: o.url}  # the answer's page is not offered
  assert injectable(state.evolve(question="In which city is it headquartered?"), pages) == {}

  def act(kind, start=state, **tamper):
    llm.tamper = tamper
    client = SynthLLM(cfg)

    async def go():
      try:
        if kind == "fuzz":
          return await fuzz(start, client)
        return await inject(start, o.name, o.url, client, pages, random.Random(0),
                            cfg.model_copy(update={"neighbour_tries": 99}))
      finally:
        await client.close()
    return asyncio.run(go())

  new, action = act("inject")
  assert o.name not in new.question and new.answers == state.answers
  assert new.facts[:1] == state.facts and len(new.facts) == 2
  assert action["fact"] in pages.page(action["neighbour"])["contents"]
  assert hq.url not in action["tried"]  # never the answer's own page
  cases = {
      "inject:fact_not_on_page": {"inject": lambda r, p: {**r, "fact": r["fact"] + " Really."}},
      "inject:fact_lacks_entity": {"inject": lambda r, p: {**r, "fact": next(
          s for s in _sentences(_page(p)[1]) if o.name not in s)}},
      "inject:bad_description": {"inject": lambda r, p: {**r, "description": f"the {o.name}"}},
      "compose:entity_still_named": {"compose": lambda r, p: {
          "question": r["question"].rstrip("?") + f", {o.name}?"}},
      "compose:unchanged": {"compose": lambda r, p: {"question": state.question}},
      "inject:no_fact": {"inject": lambda r, p: {**r, "fact": ""}},
      "fuzz:detail_not_in_question": {"fuzz": lambda r, p: {**r, "original": "Atlantis"}},
      "fuzz:detail_kept": {"fuzz": lambda r, p: {**r, "question": state.question.replace(
          "which city", "which place")}},
      "fuzz:not_blurred": {"fuzz": lambda r, p: {**r, "fuzzed": r["original"]}},
  }
  for reason, tamper in cases.items():
    with pytest.raises(Rejected) as e:
      act("fuzz" if reason.startswith("fuzz") else "inject", **tamper)
    assert e.value.reason == reason
  # Every relation sentence is on both its entities' pages: holding all of O's page's facts
  # makes whatever a neighbour says about O known already.
  know = Knowledge(world)
  known = state.evolve(facts=tuple(Fact(o.url, o.name, x) for x in
                                   _sentences(pages.page(o.url)["contents"])
                                   if x in know.sentence and o.name in x))
  with pytest.raises(Rejected, match="inject:fact_known"):
    act("inject", known)
  # A request the endpoint refuses fails the round; an endpoint that is down aborts the seed.
  llm.refuse_on = ("# Composition",)
  with pytest.raises(Rejected, match="compose:refused"):
    act("inject")
  llm.refuse_on, llm.fail_on = (), ("# Composition",)
  with pytest.raises(LLMUnavailable, match="compose: /chat/completions: HTTP 503"):
    act("inject")
  llm.fail_on = ()
  new, action = act("fuzz")  # the scripted fuzz blurs the named organisation
  assert action["original"] == o.name and o.name not in new.question


def test_a_name_kept_in_another_case_is_still_named(world_dir, world, llm, tmp_path):
  """Bug: `mentions` was case-sensitive, so a fuzz or a composition that wrote the detail it
  was to remove as "marval works" passed."""
  import random

  from asearcher_jax.synth.actions import fuzz, inject
  o = next(e for e in world.entities.values() if e.kind == "org")
  hq = world.entities[o.rels["headquarters"]]
  state = _state(world, f"In which city is {o.name} headquartered?", hq.name,
                 (o.name, "headquarters"))
  cfg = make_cfg(world_dir, tmp_path / "o", llm.url, neighbour_tries=99).synth
  pages = PageSource(os.path.join(world_dir, "pages.jsonl"))

  def act(kind, tamper):
    llm.tamper, client = tamper, SynthLLM(cfg)

    async def go():
      try:
        if kind == "fuzz":
          return await fuzz(state, client)
        return await inject(state, o.name, o.url, client, pages, random.Random(0), cfg)
      finally:
        await client.close()
    return asyncio.run(go())

  for case in (str.lower, str.upper):
    with pytest.raises(Rejected, match="fuzz:detail_kept"):
      act("fuzz", {"fuzz": lambda r, p: {**r, "question": state.question.replace(
          o.name, case(o.name))}})
    with pytest.raises(Rejected, match="compose:entity_still_named"):
      act("inject", {"compose": lambda r, p: {
          "question": r["question"].rstrip("?") + f", {case(o.name)}?"}})


# ------------------------------------------------------------------------------------ the loop

def _oracle_unique(know, action):
  """Independently of the verifier: does the injected fact pin the replaced entity, and so
  (for a one-hop seed) the answer? Forward facts do; backward ones when one entity fits."""
  eid, key = know.sentence[action["fact"]]
  entity = know.by_name[action["entity"]]
  if eid != entity.eid:
    return True  # the neighbour's own relation points at the entity: functional
  matches = know.subjects(key, entity.rels[key])
  return len(know.readings(action["question_before"], entity.name, matches)) == 1


def test_loop_end_to_end_with_the_exact_world_verifier(world_dir, world, llm, tmp_path):
  know = Knowledge(world)
  seeds = one_hop_seeds(world, tmp_path / "qa.jsonl", 10)
  out = tmp_path / "out"
  cfg = make_cfg(world_dir, out, llm.url, seeds=[str(tmp_path / "qa.jsonl")],
                 verifier="world", max_actions=6, variants_per_seed=1)
  report = run(cfg)
  records, rows = journal(out), qa_rows(out)
  assert records and {r["status"] for r in records} == {"done"}
  assert report["seeds"]["done"] == len(seeds) and report["items"] == len(rows) >= 2
  rounds = [e for r in records for e in r["rounds"]]
  assert report["rounds"]["total"] == len(rounds) <= 6 * len(seeds)
  assert sum(report["rejections"].values()) == report["rounds"]["rejected"] >= 1
  assert llm.tasks()["inject"] >= report["rounds"]["accepted"] >= 2

  by_seed = {r["seed_id"]: r for r in records}
  for row in rows:
    rec = by_seed[row["seed"]["seed_id"]]
    seed = next(s for s in seeds if s["question"] == rec["seed"]["question"])
    assert row["answer"] == [seed["answer"]] and row["aug_answer"] == seed["aug_answer"]
    assert row["injections"] == sum(a["type"] == "inject" for a in row["actions"]) >= 1
    assert row["verification"]["hard"] and not any(row["verification"]["difficulty"]["correct"])
    for fact in row["supporting_facts"]:  # true world facts, quoted from their pages
      assert fact["text"] in know.sentence
      assert fact["text"] in " ".join(world_page(world, fact["url"]).split())
    for a in row["actions"]:
      assert a["entity"] not in a["question_after"] and a["fact"] in know.sentence
  assert len({row["qid"] for row in rows}) == len(rows)
  for rec in records:
    assert len(rec["variants"]) <= 1 and rec["pool"] >= len(rec["variants"])
    if rec["variants"]:  # the last k of the pool: the most evolved accepted hard states
      hard_rounds = [e["round"] for e in rec["rounds"] if e["status"] == "accepted"
                     and e["hard"]]
      assert [v["round"] for v in rec["variants"]] == hard_rounds[-1:]
  assert any(rec["pool"] > len(rec["variants"]) for rec in records)  # k did cut
  # Every first injection on a one-hop seed that reached the uniqueness check was judged as the
  # oracle says: accepted iff the fact pins the entity (and so the answer).
  outcomes = Counter()
  for rec in records:
    for e in rec["rounds"]:
      attempt = e.get("attempt")
      if not attempt or attempt["type"] != "inject" or \
          attempt["question_before"] != rec["seed"]["question"]:
        continue
      if e["status"] == "accepted" or e["reason"] == "uniqueness:ambiguous":
        outcomes[e["status"]] += 1
        assert _oracle_unique(know, attempt) == (e["status"] == "accepted"), attempt
  assert outcomes["accepted"] >= 1 and outcomes["rejected"] >= 1


def test_loop_with_llm_verification_page_seeds_fuzzing_and_exit(world_dir, world, llm,
                                                                 tmp_path):
  know = Knowledge(world)
  works = [e for e in world.entities.values() if e.kind == "work"][:3]
  with open(tmp_path / "pages.jsonl", "w") as f:
    for w in works:
      f.write(json.dumps({"url": w.url, "fact": fact_sentence(w, "year", world.entities)})
              + "\n")
  # Five seeds whose injections the judge sees, enough that the default world gives both
  # verdicts (three did under its split by hop alone, not under its split by relation).
  seeds = one_hop_seeds(world, tmp_path / "qa.jsonl", 6)
  llm.exit_after = 1
  llm.garbage_on = (seeds[-1]["question"],)  # this seed's action choice never parses
  out = tmp_path / "out"
  report = run(make_cfg(world_dir, out, llm.url, seeds=[str(tmp_path / "qa.jsonl")],
                        seed_pages=str(tmp_path / "pages.jsonl"), max_actions=3,
                        variants_per_seed=1))
  records = {r["seed"]["origin"].get("url") or r["seed"]["question"]: r for r in journal(out)}
  for w in works:  # "Which work was first presented in YEAR?": already hard; fuzz the year
    rec = records[w.url]
    base = rec["base"]["state"]
    assert base["answers"] == [w.name] and str(w.attrs["year"]) in base["question"]
    assert rec["rounds"][0]["offered"] == ["fuzz"]  # hard already, but no action yet
    assert rec["rounds"][0]["action"] == "fuzz" and rec["rounds"][0]["status"] == "accepted"
    assert "exit" in rec["rounds"][1]["offered"]
    assert rec["rounds"][1]["action"] == "exit" and len(rec["rounds"]) == 2
    (v,) = rec["variants"]
    assert v["fuzzes"] == 1 and f"the {w.attrs['year'] // 10 * 10}s" in v["question"]
  stuck = records[seeds[-1]["question"]]
  assert [e["reason"] for e in stuck["rounds"]] == ["choose_action:unparseable"] * 3
  assert report["rejections"]["choose_action:unparseable"] == 3
  assert report["avg_fuzzes"] > 0 and report["items"] >= len(works)
  # LLM-judged uniqueness: the scripted solver names another reading when the injected fact
  # fits several entities, and the judge confirms it is valid: rejected exactly then.
  outcomes = Counter()
  for q in seeds[:-1]:
    for e in records[q["question"]]["rounds"]:
      attempt = e.get("attempt")
      if not attempt or attempt["type"] != "inject" or attempt["question_before"] != q["question"]:
        continue
      if e["status"] == "accepted" or e["reason"].startswith("uniqueness"):
        outcomes[e["status"]] += 1
        assert _oracle_unique(know, attempt) == (e["status"] == "accepted"), attempt
        if e["status"] == "rejected":
          assert e["reason"] == "uniqueness:alternative_answer"
          assert any(c["alternative"] for c in e["verdict"]["uniqueness"]["checked"])
  assert outcomes["accepted"] >= 1 and outcomes["rejected"] >= 1
  assert report["seeds"]["done"] == len(works) + len(seeds)
  assert os.path.exists(out / "report.json")


def test_choices_off_the_menu_cost_their_round(world_dir, world, llm, tmp_path):
  seeds = one_hop_seeds(world, tmp_path / "qa.jsonl", 2)
  first = seeds[0]["question"]
  llm.tamper = {"choose": lambda r, p: {"action": "exit"} if first in p  # not hard: no exit
                else {"action": "inject", "entity": "Nobody In Particular"}}
  report = run(make_cfg(world_dir, tmp_path / "out", llm.url, seeds=[str(tmp_path / "qa.jsonl")],
                        verifier="world", max_actions=2))
  assert report["rejections"] == {"choose_action:invalid_action": 2,
                                  "choose_action:unknown_entity": 2}
  assert report["items"] == 0 and report["actions_proposed"] == {"exit": 2, "inject": 2}
  assert llm.tasks()["inject"] == 0  # nothing was performed


def test_resume_skips_finished_seeds_and_retries_aborted_ones(world_dir, world, llm,
                                                              tmp_path):
  seeds = one_hop_seeds(world, tmp_path / "qa.jsonl", 3)
  out = tmp_path / "out"
  cfg = make_cfg(world_dir, out, llm.url, seeds=[str(tmp_path / "qa.jsonl")], verifier="world",
                 max_actions=3, variants_per_seed=2)
  llm.fail_on = (seeds[2]["question"],)  # the endpoint is down for this seed's prompts
  first = run(cfg)
  assert first["seeds"]["aborted"] == 1 and first["seeds"]["done"] == 2
  assert "503" in first["first_abort"]
  records = journal(out)
  assert [r["status"] for r in records].count("aborted") == 1
  rows_before = qa_rows(out)
  with open(out / "seeds.jsonl", "a") as f:  # a crash mid-append
    f.write('{"seed_id": "torn", "status": "do')

  llm.fail_on, llm.requests = (), []
  second = run(cfg)
  assert second["seeds"] == {**first["seeds"], "done": 3, "aborted": 0, "with_items":
                             second["seeds"]["with_items"]}
  asked = " ".join(p for _, p in llm.requests)
  assert seeds[2]["question"] in asked
  assert seeds[0]["question"] not in asked and seeds[1]["question"] not in asked
  records = journal(out)  # the torn line is gone; the aborted seed is done after it
  assert sorted(r["status"] for r in records) == ["aborted", "done", "done", "done"]
  assert records[-1]["status"] == "done" and records[-1]["seed"]["question"] == \
      seeds[2]["question"]
  rows = qa_rows(out)
  assert [r for r in rows if r["seed"]["seed_id"] != records[-1]["seed_id"]] == rows_before

  llm.requests = []
  third = run(cfg)
  assert llm.requests == [] and qa_rows(out) == rows and third["items"] == second["items"]

  # The seed file edited (a seed's question changed, its id kept): that seed runs again, and
  # what the old one gave leaves qa.jsonl; the others stay done.
  other = one_hop_seeds(world, tmp_path / "other.jsonl", 4)[3]
  edited = [{**other, "qid": seeds[0]["qid"]}, *seeds[1:]]
  with open(tmp_path / "qa.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in edited)
  llm.requests = []
  run(cfg)
  asked = " ".join(p for _, p in llm.requests)
  assert other["question"] in asked and seeds[1]["question"] not in asked
  assert seeds[0]["question"] not in {r["seed"]["question"] for r in qa_rows(out)}
  assert journal(out)[-1]["seed"]["question"] == other["question"]


def test_a_rerun_with_fewer_seeds_keeps_earlier_items(world_dir, world, llm, tmp_path):
  """Bug: qa.jsonl was rebuilt from this run's seeds only, so a rerun with `--limit 1` (or
  another seed file) silently wiped what earlier runs had kept."""
  one_hop_seeds(world, tmp_path / "qa.jsonl", 4)
  out = tmp_path / "out"
  cfg = make_cfg(world_dir, out, llm.url, seeds=[str(tmp_path / "qa.jsonl")], verifier="world",
                 max_actions=3)
  run(cfg)
  before = qa_rows(out)
  assert len({r["seed"]["seed_id"] for r in before}) >= 2
  llm.requests = []
  report = run(make_cfg(world_dir, out, llm.url, seeds=[str(tmp_path / "qa.jsonl")],
                        verifier="world", max_actions=3, limit=1))
  assert llm.requests == [] and report["seeds"]["total"] == 1
  by_qid = lambda rows: sorted(rows, key=lambda r: r["qid"])  # noqa: E731
  assert by_qid(qa_rows(out)) == by_qid(before) and report["qa_items"] == len(before)


def test_resume_does_not_depend_on_how_the_seed_file_is_named(world_dir, world, llm, tmp_path,
                                                              monkeypatch):
  """Bug: the seed's origin (its file path as given) was part of "is this seed done?", so
  `qa.jsonl`, `./qa.jsonl` and its absolute path each ran every seed again."""
  one_hop_seeds(world, tmp_path / "qa.jsonl", 2)
  monkeypatch.chdir(tmp_path)
  out = tmp_path / "out"

  def cfg(path):
    return make_cfg(world_dir, out, llm.url, seeds=[path], verifier="world", max_actions=2)

  run(cfg("qa.jsonl"))
  rows = qa_rows(out)
  for path in ("./qa.jsonl", str(tmp_path / "qa.jsonl")):
    llm.requests = []
    run(cfg(path))
    assert llm.requests == [] and qa_rows(out) == rows, path


def test_an_output_path_that_is_a_file_is_a_clear_error(world_dir, world, llm, tmp_path):
  from asearcher_jax.errors import ConfigError
  one_hop_seeds(world, tmp_path / "qa.jsonl", 1)
  (tmp_path / "afile").write_text("x")
  with pytest.raises(ConfigError, match="is a file, not a directory"):
    run(make_cfg(world_dir, tmp_path / "afile", llm.url, seeds=[str(tmp_path / "qa.jsonl")],
                 verifier="world"))


def test_output_round_trips_through_the_loaders_and_tfds(world_dir, world, llm, tmp_path):
  from asearcher_jax.data import build_qa_dataset, load_qa, open_qa_dataset
  one_hop_seeds(world, tmp_path / "qa.jsonl", 4)
  out = tmp_path / "out"
  run(make_cfg(world_dir, out, llm.url, seeds=[str(tmp_path / "qa.jsonl")], verifier="world",
               max_actions=3))
  rows = qa_rows(out)
  assert rows
  report = load_qa(out / "qa.jsonl")
  assert report.format == "asearcher" and not report.skipped and len(report.items) == len(rows)
  for item, row in zip(report.items, rows):
    assert (item.qid, item.question, list(item.answers), list(item.aug_answers), item.source) \
        == (row["qid"], row["question"], row["answer"], row["aug_answer"], "synthetic")
    assert item.extra["supporting_facts"] == row["supporting_facts"]
    assert item.extra["actions"] and item.extra["verification"]["hard"]
  path = build_qa_dataset({"train": [str(out / "qa.jsonl")]}, str(tmp_path / "tfds"),
                          name="synth", progress=False)
  assert list(open_qa_dataset(path, "train")) == report.items
  # The output seeds a further run: its supporting facts resolve to the same quotes.
  pages = PageSource(os.path.join(world_dir, "pages.jsonl"))
  facts, bare = resolve_support(report.items[0], pages)
  assert [f.to_dict() for f in facts] == rows[0]["supporting_facts"] and not bare


def test_cli_synth_runs_and_bad_input_exits_2(world_dir, world, llm, tmp_path):
  one_hop_seeds(world, tmp_path / "qa.jsonl", 2)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")

  def synth(*args):
    return subprocess.run([sys.executable, "-m", "asearcher_jax.cli", "synth", "--config",
                           SYNTH_YAML, "--no-progress", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)

  common = [f"synth.world_dir={world_dir}", f"synth.llm.base_url={llm.url}",
            "synth.difficulty_samples=2", "synth.max_actions=2"]
  ok = synth("--seeds", str(tmp_path / "qa.jsonl"), "--out", str(tmp_path / "out"),
             "--k", "1", *common)
  assert ok.returncode == 0, ok.stderr
  assert "items kept:" in ok.stdout and (tmp_path / "out" / "qa.jsonl").exists()
  assert json.loads((tmp_path / "out" / "report.json").read_text())["seeds"]["done"] == 2
  missing = synth("--seeds", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o2"),
                  *common)
  assert missing.returncode == 2 and "no such file" in missing.stderr
  typo = synth("--out", str(tmp_path / "o3"), "synth.max_action=3", *common)
  assert typo.returncode == 2 and "synth.max_action" in typo.stderr
  empty = synth("--out", str(tmp_path / "o4"), *common)
  assert empty.returncode == 2 and "no seeds" in empty.stderr


def test_cli_synth_paths_stay_strings_and_a_foreign_journal_is_a_clear_error(
    world_dir, world, llm, tmp_path, monkeypatch):
  """Bug: `--out 2024` failed (YAML read the path as a number), `--out null` wrote to the
  default directory, and an out_dir whose seeds.jsonl has no seed_id gave a KeyError."""
  import asearcher_jax.synth as synth_pkg
  from asearcher_jax.cli import build_parser
  from asearcher_jax.errors import DataError
  seen = []

  async def fake(cfg, progress=True):
    seen.append(cfg.synth)
    return {"seeds": {"aborted": 0}}

  monkeypatch.setattr(synth_pkg, "synthesize", fake)
  for out in ("2024", "null", "yes"):
    args = build_parser().parse_args(["synth", "--config", SYNTH_YAML, "--out", out,
                                      "--seed-pages", "1e3"])
    assert args.fn(args) == 0 and (seen[-1].out_dir, seen[-1].seed_pages) == (out, "1e3")

  one_hop_seeds(world, tmp_path / "qa.jsonl", 1)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "seeds.jsonl").write_text(json.dumps({"qid": "x", "question": "q?"})
                                                + "\n")
  with pytest.raises(DataError, match="not a synth seed record"):
    run(make_cfg(world_dir, tmp_path / "out", llm.url, seeds=[str(tmp_path / "qa.jsonl")],
                 verifier="world"))
