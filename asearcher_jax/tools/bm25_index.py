"""Sparse retrieval with `bm25s`: build once, save, memory-map at start, search in batches.

bm25s stores the BM25 score matrix as scipy CSC arrays (`.npy`), so loading with
`mmap=True` costs no time and no resident memory until pages are touched, and a batch of
queries is one sparse gather + top-k. Query and passage tokenisation must agree, so both go
through `tokenize` here (lowercase, English stopwords, no stemmer: no extra dependency).

bm25s imports JAX when it is installed and uses `jax.lax.top_k` for selection (about 20x
faster here than its numpy path), initialising JAX's default backend at import. Searches
are pinned to the CPU device so they never queue behind, or allocate on, an accelerator;
a standalone server process sets JAX_PLATFORMS=cpu before import (see `commands/search.py`) so it
never claims the accelerator that the learner and decode servers own.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import bm25s
import numpy as np

from asearcher_jax.errors import RetrievalError

BM25_FILES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy",
              "vocab.index.json", "params.index.json")


def tokenize(texts: list[str], show_progress: bool = False, return_ids: bool = False):
  """The one tokeniser of queries and passages (they must agree): token strings for
  queries, bm25s `Tokenized` ids (`return_ids`) for indexing."""
  return bm25s.tokenize(texts, lower=True, stopwords="en", return_ids=return_ids,
                        show_progress=show_progress)


class BM25Index:
  def __init__(self, retriever: bm25s.BM25, num_docs: int):
    self.retriever = retriever
    self.num_docs = num_docs

  @classmethod
  def build(cls, texts: list[str], out_dir: str | None = None, k1: float = 1.5,
            b: float = 0.75, show_progress: bool = True) -> BM25Index:
    tokens = tokenize(texts, show_progress=show_progress, return_ids=True)
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(tokens, show_progress=show_progress)
    if out_dir is not None:
      os.makedirs(out_dir, exist_ok=True)
      retriever.save(out_dir, show_progress=False)
      with open(os.path.join(out_dir, "num_docs.json"), "w") as f:
        json.dump({"num_docs": len(texts)}, f)
    return cls(retriever, len(texts))

  @classmethod
  def load(cls, path: str, mmap: bool = True) -> BM25Index:
    missing = [f for f in BM25_FILES + ("num_docs.json",)
               if not os.path.exists(os.path.join(path, f))]
    if missing:
      raise RetrievalError(f"BM25 index {path} is missing {', '.join(missing)} "
                           f"(rebuild it with `asearcher index build`)")
    try:
      retriever = bm25s.BM25.load(path, mmap=mmap, show_progress=False)
      with open(os.path.join(path, "num_docs.json")) as f:
        num_docs = int(json.load(f)["num_docs"])
    except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt index
      raise RetrievalError(f"BM25 index {path} is corrupt: {type(e).__name__}: {e}") from None
    indptr = retriever.scores["indptr"]
    n_vocab = len(retriever.vocab_dict)
    if not n_vocab <= len(indptr) <= n_vocab + 1 or int(indptr[-1]) != len(
        retriever.scores["data"]) or len(retriever.scores["indices"]) != len(
        retriever.scores["data"]):
      raise RetrievalError(f"BM25 index {path} is corrupt: vocabulary and score arrays "
                           f"disagree (rebuild it)")
    return cls(retriever, num_docs)

  def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Document indices and scores [len(queries), min(k, num_docs)]; zero scores mean no
    query term matched (callers drop them)."""
    k = min(k, self.num_docs)
    with _on_cpu():
      docs, scores = self.retriever.retrieve(tokenize(queries), k=k, show_progress=False,
                                             n_threads=0)
    return np.asarray(docs), np.asarray(scores)


def _on_cpu():
  jax = sys.modules.get("jax")
  if jax is None:
    return contextlib.nullcontext()
  return jax.default_device(jax.devices("cpu")[0])
