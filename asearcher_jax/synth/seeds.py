"""Seeds: QA items whose supporting pages resolve in the page source, or pages (with a fact).

A QA item (any `load_qa` format) names its support in `extra`: `supporting_facts` /
`supporting_pages` / `urls` / `url` / `title`, whose entries may be URLs, page titles,
corpus passage ids (our world's QA), `{url|title, text}` objects, or HotpotQA's
`[title, sentence index]` pairs (the sentence taken from `context` when present). A passage or
a quoted sentence gives facts at once; a bare page leaves the fact to be quoted by the LLM.
Items whose support does not resolve are reported, not synthesised from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from asearcher_jax.data.qa import QAItem, free_id, load_qa
from asearcher_jax.errors import DataError
from asearcher_jax.jsonl import iter_rows
from asearcher_jax.synth.pages import PageSource
from asearcher_jax.synth.state import Fact, on_page, sentences
from asearcher_jax.tools.types import title_from_contents


@dataclass(frozen=True)
class Seed:
  """`facts` are quoted already; `pages` are supporting pages still without a quoted fact."""

  seed_id: str
  kind: str  # "qa" | "page"
  question: str
  answers: tuple[str, ...]  # the first is the one the prompts show
  aug_answers: tuple[str, ...]
  facts: tuple[Fact, ...]
  pages: tuple[str, ...]
  origin: dict

  def content(self) -> dict[str, Any]:
    """What the seed is, as JSON would give it back: a finished seed is done iff its content is
    unchanged. Not where it came from: a seed file named by another path is the same seed."""
    return json.loads(json.dumps({k: v for k, v in self.to_dict().items() if k != "origin"}))

  def to_dict(self) -> dict[str, Any]:
    return {"seed_id": self.seed_id, "kind": self.kind, "question": self.question,
            "answers": list(self.answers), "aug_answers": list(self.aug_answers),
            "facts": [f.to_dict() for f in self.facts], "pages": list(self.pages),
            "origin": self.origin}


def _refs(extra: Mapping[str, Any]) -> list[Any]:
  refs: list[Any] = []
  for key in ("supporting_facts", "supporting_pages", "urls", "url", "title"):
    value = extra.get(key)
    if isinstance(value, (list, tuple)):
      refs.extend(value)
    elif value:
      refs.append(value)
  return refs


def _context_sentence(extra: Mapping[str, Any], title: str, index: int) -> str | None:
  """HotpotQA `context`: [[title, [sentences]]] or {"title": [...], "sentences": [[...]]}."""
  ctx = extra.get("context")
  pairs = []
  if isinstance(ctx, Mapping) and "title" in ctx and "sentences" in ctx:
    pairs = list(zip(ctx["title"], ctx["sentences"]))
  elif isinstance(ctx, (list, tuple)):
    pairs = [tuple(p) for p in ctx if isinstance(p, (list, tuple)) and len(p) == 2]
  for t, sents in pairs:
    if t == title and isinstance(sents, (list, tuple)) and 0 <= index < len(sents):
      return str(sents[index]).strip()
  return None


def _page_of(pages: PageSource, ref: str) -> dict | None:
  return pages.page(ref) or pages.by_title(ref)


def resolve_support(item: QAItem, pages: PageSource) -> tuple[list[Fact], list[str]]:
  """(quoted facts, supporting page URLs without a quote) of a QA item."""
  facts: list[Fact] = []
  bare: list[str] = []

  def add_page(page: dict | None, text: str | None) -> None:
    if page is None:
      return
    if text is None:
      bare.append(page["url"])
      return
    for s in sentences(text):
      if on_page(s, page["contents"]):
        facts.append(Fact(page["url"], page["title"], s))

  for ref in _refs(item.extra):
    if isinstance(ref, Mapping):
      key = ref.get("url") or ref.get("title")
      text = ref.get("text") or ref.get("fact") or ref.get("sentence")
      add_page(_page_of(pages, str(key)) if key else None, str(text) if text else None)
    elif isinstance(ref, (list, tuple)) and len(ref) == 2 and isinstance(ref[1], int):
      add_page(pages.by_title(str(ref[0])), _context_sentence(item.extra, str(ref[0]), ref[1]))
    elif isinstance(ref, (str, int)) and not isinstance(ref, bool):
      ref = str(ref)
      passage = pages.passage(ref)
      if passage is not None:
        contents = passage["contents"]
        if title_from_contents(contents):  # wiki-18 rows open with '"Title"\n'
          contents = contents.partition("\n")[2]
        add_page(pages.page(passage.get("url", "")) or pages.by_title(passage["title"]),
                 contents)
      else:
        add_page(_page_of(pages, ref), None)
  facts = list(dict.fromkeys(facts))
  bare = [u for u in dict.fromkeys(bare) if not any(f.url == u for f in facts)]
  return facts, bare


def _page_seed_id(url: str, fact: str) -> str:
  return "page-" + hashlib.sha1(f"{url}\n{fact}".encode()).hexdigest()[:12]


def page_seed(page: dict, fact: str = "", origin: dict | None = None) -> Seed:
  facts = (Fact(page["url"], page["title"], fact),) if fact else ()
  return Seed(_page_seed_id(page["url"], fact), "page", "", (), (), facts,
              () if fact else (page["url"],), origin or {"url": page["url"]})


def load_seeds(synth, pages: PageSource, echo=print) -> tuple[list[Seed], Counter]:
  """The section's seeds in order (QA files, then seed pages, then random pages), at most
  `synth.limit` of them, and the count of seeds dropped, by reason, before the limit was
  reached. Ids are unique: a repeated one (the same qid in two files, a page drawn twice) gets
  the first free `#N` suffix."""
  seeds: list[Seed] = []
  dropped: Counter = Counter()
  issued: set[str] = set()

  def full() -> bool:
    return synth.limit is not None and len(seeds) >= synth.limit

  def add(seed: Seed) -> None:
    seed_id = free_id(seed.seed_id, issued)
    issued.add(seed_id)
    seeds.append(dataclasses.replace(seed, seed_id=seed_id))

  for path in synth.seeds:
    if full():
      break
    report = load_qa(path)
    echo(report.summary())
    for item in report.items:
      if full():
        break
      facts, bare = resolve_support(item, pages)
      if not facts and not bare:
        dropped["seed:no_supporting_page"] += 1
        continue
      add(Seed(item.qid, "qa", item.question, item.answers, item.aug_answers, tuple(facts),
               tuple(bare), {"file": path, "qid": item.qid, "source": item.source}))
  if synth.seed_pages and not full():
    for n, row, error in iter_rows(_existing(synth.seed_pages)):
      if full():
        break
      if error is not None:
        raise DataError(f"{synth.seed_pages}:{n}: {error}")
      key = row.get("url") or row.get("title")
      page = _page_of(pages, str(key)) if key else None
      fact = str(row.get("fact") or "").strip()
      if page is None:
        dropped["seed:page_not_found"] += 1
      elif fact and not on_page(fact, page["contents"]):
        dropped["seed:fact_not_on_page"] += 1
      else:
        add(page_seed(page, fact, {"file": synth.seed_pages, "line": n, "url": page["url"]}))
  if synth.random_pages and not full():
    urls = sorted(pages.urls())
    rng = random.Random(f"{synth.seed}/random_pages")
    for url in rng.sample(urls, min(synth.random_pages, len(urls))):
      if full():
        break
      add(page_seed(pages.page(url), origin={"random": True, "url": url}))
  return seeds, dropped


def _existing(path: str) -> str:
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such seed pages file")
  return path
