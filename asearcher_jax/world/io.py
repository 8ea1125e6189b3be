"""The world on disk: the corpus, pages and QA files that the tools and the trainer read.

Files (all JSONL, UTF-8):
  corpus.jsonl    id, title, contents, url          (the retrieval corpus)
  pages.jsonl     url, title, contents, links       (what `/access` serves)
  qa_train.jsonl  question, answer, aug_answer, qid, hops, start, chain, supporting_facts
  qa_test.jsonl   the same, held-out questions
  entities.jsonl  the graph itself, so `verify` works on a world loaded from disk
  world.json      the WorldConfig that produced it
  fact_passages.json  which passage states each fact ("eid/relation" -> passage id)

`ensure_world` generates the default debug world into a cache directory at first use
(about a second) instead of shipping data files; a directory is written under a temporary
name and renamed into place, so a crash never leaves a half-written world that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid

from asearcher_jax.errors import RetrievalError
from asearcher_jax.outdir import WORLD_MARKERS, check_out_dir, replace_dir
from asearcher_jax.world.config import WorldConfig
from asearcher_jax.world.generator import Entity, World, generate_world

# Bump whenever the generator's output changes for the same config (names, passages, QA or
# the split): cached worlds are keyed by config *and* this, so a code change never serves a
# stale world from the cache. 2: held-out split by final fact; unique org short aliases.
# 3: the held-out facts drawn per final relation. 4: fact_passages.json written.
GENERATOR_VERSION = 4

FILES = ("corpus.jsonl", "pages.jsonl", "qa_train.jsonl", "qa_test.jsonl", "entities.jsonl",
         "world.json")


def _write_jsonl(path: str, rows) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _complete(path: str) -> bool:
  return all(os.path.exists(os.path.join(path, f)) for f in FILES)


def write_world(world: World, out_dir: str, overwrite: bool = False,
                keep_existing: bool = False) -> str:
  """Write under a temporary name, then rename into place. With `keep_existing` (the cache),
  a complete world that appeared at `out_dir` meanwhile -- another process won the race --
  is kept and our copy discarded, instead of deleting the winner's files under its readers.

  `overwrite` replaces a world, never anything else (`outdir.check_out_dir`), by
  `outdir.replace_dir`."""
  check_out_dir(out_dir, overwrite=overwrite, markers=WORLD_MARKERS, what="world",
                flag="out_dir")
  given, out_dir = out_dir, os.path.realpath(out_dir)  # a symlink's target gets replaced
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    _write_files(world, tmp)
    if keep_existing and _complete(out_dir):
      shutil.rmtree(tmp)
      return given
    try:
      replace_dir(tmp, out_dir)
    except OSError:
      if keep_existing and _complete(out_dir):  # another process's world appeared meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        return given
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return given


def _write_files(world: World, path: str) -> None:
  _write_jsonl(os.path.join(path, "corpus.jsonl"), world.passages)
  _write_jsonl(os.path.join(path, "pages.jsonl"), world.pages)
  _write_jsonl(os.path.join(path, "qa_train.jsonl"), world.qa_train)
  _write_jsonl(os.path.join(path, "qa_test.jsonl"), world.qa_test)
  _write_jsonl(os.path.join(path, "entities.jsonl"), (
      {"eid": e.eid, "kind": e.kind, "name": e.name, "url": e.url, "attrs": e.attrs,
       "rels": e.rels} for e in world.entities.values()))
  with open(os.path.join(path, "fact_passages.json"), "w") as f:
    json.dump(world.fact_passage, f)
  with open(os.path.join(path, "world.json"), "w") as f:
    json.dump(world.config.model_dump(), f, indent=2)


def load_world(path: str) -> World:
  missing = [f for f in FILES if not os.path.exists(os.path.join(path, f))]
  if missing:
    raise RetrievalError(f"world directory {path} lacks {', '.join(missing)}")
  with open(os.path.join(path, "world.json")) as f:
    cfg = WorldConfig(**json.load(f))
  ents = {r["eid"]: Entity(r["eid"], r["kind"], r["name"], r["attrs"], r["rels"], r["url"])
          for r in _read_jsonl(os.path.join(path, "entities.jsonl"))}
  passages = _read_jsonl(os.path.join(path, "corpus.jsonl"))
  facts = os.path.join(path, "fact_passages.json")
  fact_passage = {}
  if os.path.exists(facts):  # worlds written before it have none
    with open(facts) as f:
      fact_passage = json.load(f)
  return World(cfg, ents, passages, _read_jsonl(os.path.join(path, "pages.jsonl")),
               _read_jsonl(os.path.join(path, "qa_train.jsonl")),
               _read_jsonl(os.path.join(path, "qa_test.jsonl")), fact_passage=fact_passage)


def config_digest(cfg: WorldConfig) -> str:
  """Cache key of a world: its config and the generator version."""
  key = {"config": cfg.model_dump(), "generator_version": GENERATOR_VERSION}
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> str:
  base = os.environ.get("ASEARCHER_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "asearcher_jax")
  return os.path.join(base, "worlds")


def ensure_world(config: WorldConfig | None = None, cache_dir: str | None = None) -> str:
  """The directory of the world for `config`, generated on first use and reused afterwards."""
  cfg = config or WorldConfig()
  out = os.path.join(cache_dir or default_cache_dir(), f"world-{config_digest(cfg)}")
  if _complete(out):
    return out
  return write_world(generate_world(cfg), out, overwrite=True, keep_existing=True)


def world_index(world_dir: str, log=print) -> str:
  """`<world>/index`, built on first use (BM25 over the corpus, with the pages for /access);
  `log` gets the build's progress."""
  from asearcher_jax.tools.index import build_index
  out = os.path.join(world_dir, "index")
  if not os.path.exists(os.path.join(out, "manifest.json")):
    build_index(os.path.join(world_dir, "corpus.jsonl"), out,
                pages=os.path.join(world_dir, "pages.jsonl"), overwrite=True, log=log)
  return out


def default_world_index(config: WorldConfig | None = None, cache_dir: str | None = None) -> str:
  """The index directory of the world `config` (a config's `world:` section; the debug
  world by default), generating world and index on first use."""
  return world_index(ensure_world(config, cache_dir=cache_dir))
