"""An index directory: the corpus and pages row stores, BM25, optional dense vectors, a manifest.

  DIR/manifest.json        format version, counts, which retrievers exist, encoder settings
  DIR/docs.jsonl (+ .offsets.npy)    corpus rows, memory-mapped
  DIR/pages.jsonl (+ .offsets.npy)   pages for /access, memory-mapped; DIR/page_urls.json
  DIR/bm25/                bm25s arrays, memory-mapped
  DIR/dense/embeddings.npy passage vectors (when built with a dense encoder)

A build writes every part into a staging directory inside DIR, then moves each into place by
a rename, and writes the manifest last: a build that dies half way leaves a directory that
`SearchIndex.load` refuses with a clear message instead of one that serves wrong results,
and a server still serving the old index keeps reading its files (a rename or an unlink
never truncates a memory-mapped file; rewriting one in place killed such a server with
SIGBUS). Every file's presence and size is checked at load against the manifest.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
from typing import Literal, Self

import numpy as np

from asearcher_jax.errors import RetrievalError
from asearcher_jax.procs import pid_alive
from asearcher_jax.tools.bm25_index import BM25Index
from asearcher_jax.tools.corpus import RowStore, build_store, read_corpus, read_pages

FORMAT = "asearcher-index/1"
_PARTS = ("docs.jsonl", "docs.offsets.npy", "bm25", "pages.jsonl", "pages.offsets.npy",
          "page_urls.json", "dense")
Mode = Literal["bm25", "dense", "hybrid"]


def passage_text(row: dict) -> str:
  """What gets indexed: the contents, with the title in front unless contents already start
  with it (wiki-18 rows do)."""
  c, title = row["contents"], row["title"]
  if not title:
    return c
  for head in ('"' + title, title):  # the whole title: "Apples are..." does not hold "Apple"
    if c.startswith(head) and not c[len(head):len(head) + 1].isalnum():
      return c
  return f"{title}\n{c}"


def build_index(corpus: str, out: str, pages: str | None = None,
                dense_encoder: str | None = None, encoder_config=None,
                overwrite: bool = False, log=print) -> dict:
  """Validate the corpus (and pages), build BM25 (and dense vectors), write the manifest."""
  manifest_path = os.path.join(out, "manifest.json")
  if os.path.exists(manifest_path) and not overwrite:
    raise RetrievalError(f"{out} already holds an index (use --overwrite)")
  os.makedirs(out, exist_ok=True)
  for stale in glob.glob(os.path.join(out, ".build-*-*")):  # builds killed before their swap
    pid = os.path.basename(stale).split("-")[1]
    if not (pid.isdigit() and pid_alive(int(pid))):  # not another build still running
      shutil.rmtree(stale, ignore_errors=True)
  staging = tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=out)
  try:
    t0 = time.time()
    n_docs = build_store(read_corpus(corpus), os.path.join(staging, "docs"))
    if n_docs == 0:
      raise RetrievalError(f"{corpus}: no passages")
    docs = RowStore(os.path.join(staging, "docs"))
    try:  # the memory map is released even when a later step fails
      manifest = _build_parts(docs, corpus, staging, pages, dense_encoder, encoder_config, log,
                              t0)
    finally:
      docs.close()
    manifest["build_seconds"] = round(time.time() - t0, 2)
    if os.path.exists(manifest_path):  # no manifest while old and new parts are mixed
      os.remove(manifest_path)
    for part in _PARTS:
      new, old = os.path.join(staging, part), os.path.join(out, part)
      if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
      elif os.path.lexists(old) and not os.path.exists(new):
        os.remove(old)
      if os.path.exists(new):
        os.replace(new, old)
    tmp = os.path.join(out, "manifest.json.tmp")
    with open(tmp, "w") as f:
      json.dump(manifest, f, indent=2)
    os.replace(tmp, manifest_path)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return manifest


def _build_parts(docs: RowStore, corpus: str, out: str, pages: str | None,
                 dense_encoder: str | None, encoder_config, log, t0: float) -> dict:
  n_docs = len(docs)
  texts = [passage_text(r) for r in docs]
  log(f"read {n_docs} passages from {corpus} in {time.time() - t0:.1f}s")
  t1 = time.time()
  BM25Index.build(texts, os.path.join(out, "bm25"))
  log(f"built BM25 in {time.time() - t1:.1f}s")
  n_pages = 0
  if pages:
    rows = list(read_pages(pages))
    n_pages = build_store(rows, os.path.join(out, "pages"))
    with open(os.path.join(out, "page_urls.json"), "w") as f:
      json.dump([r["url"] for r in rows], f)
    log(f"stored {n_pages} pages from {pages}")
  manifest = {"format": FORMAT, "num_docs": n_docs, "num_pages": n_pages,
              "retrievers": ["bm25"], "corpus": os.path.abspath(corpus),
              "pages": os.path.abspath(pages) if pages else None,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  if dense_encoder:
    from asearcher_jax.tools.dense import DenseEncoder, EncoderConfig, build_embeddings
    t2 = time.time()
    enc = DenseEncoder(dense_encoder, encoder_config or EncoderConfig())
    os.makedirs(os.path.join(out, "dense"), exist_ok=True)
    # The same text BM25 indexes (title + contents), so both retrievers see the title.
    build_embeddings(enc, texts, os.path.join(out, "dense", "embeddings.npy"))
    manifest["retrievers"].append("dense")
    manifest["dense"] = {"encoder": enc.path, "dim": enc.dim,
                         "config": enc.config.model_dump()}
    log(f"embedded {n_docs} passages with {dense_encoder} in {time.time() - t2:.1f}s")
  return manifest


class SearchIndex:
  """Everything a retrieval server needs, loaded (memory-mapped) from an index directory."""

  def __init__(self, path: str, dense_encoder: str | None = None):
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
      raise RetrievalError(f"index directory {path} does not exist")
    if not os.path.exists(mpath):
      raise RetrievalError(f"{mpath} missing: {path} is not a finished index "
                           f"(build it with `asearcher index build`)")
    try:
      with open(mpath) as f:
        m = json.load(f)
      if not isinstance(m, dict):
        raise RetrievalError(f"{mpath} is corrupt: expected a JSON object, got "
                             f"{type(m).__name__}")
      if m.get("format") != FORMAT:
        raise RetrievalError(f"{mpath}: format {m.get('format')!r}, expected {FORMAT!r}")
      self.num_docs, self.num_pages = int(m["num_docs"]), int(m["num_pages"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      raise RetrievalError(f"{mpath} is corrupt ({type(e).__name__}: {e})") from None
    retrievers = m.get("retrievers", [])
    if not isinstance(retrievers, list):
      raise RetrievalError(f"{mpath} is corrupt: 'retrievers' must be a list")
    dense_m = m.get("dense")
    if "dense" in retrievers and not (isinstance(dense_m, dict) and "encoder" in dense_m
                                      and isinstance(dense_m.get("config"), dict)):
      raise RetrievalError(f"{mpath} is corrupt: lists a dense retriever but has no 'dense' "
                           f"section with 'encoder' and 'config' (rebuild the index)")
    self.path, self.manifest = path, m
    self.docs = self.pages = self.bm25 = self.dense = None
    try:
      self._load(path, m, dense_encoder)
    except BaseException:
      self.close()  # a failed load must not keep its memory maps
      raise

  def _load(self, path: str, m: dict, dense_encoder: str | None) -> None:
    self.docs = RowStore(os.path.join(path, "docs"))
    if len(self.docs) != self.num_docs:
      raise RetrievalError(f"{path}/docs.jsonl has {len(self.docs)} rows, manifest says "
                           f"{self.num_docs}")
    self.bm25 = BM25Index.load(os.path.join(path, "bm25"))
    if self.bm25.num_docs != self.num_docs:
      raise RetrievalError(f"{path}/bm25 indexes {self.bm25.num_docs} passages, manifest says "
                           f"{self.num_docs}")
    self.pages, self.page_index = None, {}
    if self.num_pages:
      self.pages = RowStore(os.path.join(path, "pages"))
      try:
        with open(os.path.join(path, "page_urls.json")) as f:
          urls = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise RetrievalError(f"{path}/page_urls.json unreadable ({e})") from None
      if len(urls) != len(self.pages) or len(urls) != self.num_pages:
        raise RetrievalError(f"{path}: page_urls.json and pages.jsonl disagree")
      self.page_index = {u: i for i, u in enumerate(urls)}
    if "dense" in m.get("retrievers", []):
      from asearcher_jax.tools.dense import DenseEncoder, DenseIndex, EncoderConfig
      enc_dir = dense_encoder or m["dense"]["encoder"]
      enc = DenseEncoder(enc_dir, EncoderConfig(**m["dense"]["config"]))
      self.dense = DenseIndex.load(os.path.join(path, "dense"), enc)
      if len(self.dense.vectors) != self.num_docs:
        raise RetrievalError(f"{path}/dense/embeddings.npy has {len(self.dense.vectors)} "
                             f"rows, manifest says {self.num_docs}")

  def close(self) -> None:
    """Release the memory maps (docs, pages, BM25 arrays, dense vectors): a long-lived
    process that reloads an index would otherwise keep every old one mapped."""
    for store in (self.docs, self.pages):
      if store is not None:
        store.close()
    self.docs = self.pages = None
    if self.bm25 is not None:
      self.bm25.retriever = None
      self.bm25 = None
    self.dense = None

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def modes(self) -> list[str]:
    return ["bm25"] + (["dense", "hybrid"] if self.dense is not None else [])

  def search(self, queries: list[str], k: int, mode: Mode = "bm25",
             alpha: float = 0.5) -> list[list[tuple[int, float]]]:
    """Per query, (row, score) pairs best first. BM25 drops zero-score rows (no term
    matched); hybrid fuses min-max normalised BM25 and dense scores over both candidate
    lists with weight `alpha` on dense."""
    if mode not in self.modes:
      raise RetrievalError(f"retriever {mode!r} is not available in {self.path} "
                           f"(have {', '.join(self.modes)})")
    if mode == "bm25":
      idx, sc = self.bm25.search(queries, k)
      return [[(int(i), float(s)) for i, s in zip(ri, rs) if s > 0] for ri, rs in zip(idx, sc)]
    if mode == "dense":
      idx, sc = self.dense.search(queries, k)
      return [[(int(i), float(s)) for i, s in zip(ri, rs)] for ri, rs in zip(idx, sc)]
    kk = min(self.num_docs, 4 * k)
    bi, bs = self.bm25.search(queries, kk)
    di, ds = self.dense.search(queries, kk)
    out = []
    for q in range(len(queries)):
      fused: dict[int, float] = {}
      # BM25 rows scoring 0 matched no query term: they are not candidates at all. Without
      # this, a query BM25 cannot match gives every row the same (zero) score, a zero span,
      # and full weight to arbitrary rows that then outrank the real dense hits.
      keep = np.asarray(bs[q]) > 0
      for rows, scores, w in ((np.asarray(bi[q])[keep], np.asarray(bs[q])[keep], 1 - alpha),
                              (di[q], ds[q], alpha)):
        s = np.asarray(scores, np.float64)
        if not len(s):
          continue
        span = s.max() - s.min()
        norm = (s - s.min()) / span if span > 0 else np.ones_like(s)
        for r, v in zip(rows, norm):
          fused[int(r)] = fused.get(int(r), 0.0) + w * float(v)
      out.append(sorted(fused.items(), key=lambda kv: -kv[1])[:k])
    return out

  def doc(self, row: int) -> dict:
    return self.docs[row]

  def page(self, url: str) -> dict | None:
    i = self.page_index.get(url)
    return None if i is None else self.pages[i]
