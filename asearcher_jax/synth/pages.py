"""The page corpus the agent walks: pages with links in the retrieval server's format, read
through the existing page stores, plus the passages that QA files cite as supporting facts.

Sources: a pages JSONL (validated by `read_pages`, held in memory: fine up to some 10^5
pages), or an index directory built with `asearcher index build --pages` (memory-mapped
through `SearchIndex`: the way to use a converted Wikipedia dump), or a world directory (its
pages.jsonl and corpus.jsonl). Title and passage-id lookups are built on first use, since
only QA seeds that cite pages by title or passage id need them; on a corpus of tens of millions
of passages that first use takes minutes, so URL references are the cheap ones there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import unquote

from asearcher_jax.errors import ConfigError, RetrievalError
from asearcher_jax.tools.corpus import read_corpus, read_pages


def title_from_url(url: str) -> str:
  """The title a wiki-style URL spells (`.../wiki/Alen_Varro` -> "Alen Varro"): a cheap guess
  at a linked page's title that is confirmed by reading the page only when it matters."""
  tail = url.rstrip("/").rsplit("/", 1)[-1]
  tail = tail.split("title=", 1)[-1] if "title=" in tail else tail
  return unquote(tail).replace("_", " ").strip()


class PageSource:
  def __init__(self, pages: str, corpus: str | None = None):
    self.path = pages
    self._index = None
    self._pages: dict[str, dict] | None = None
    if os.path.isdir(pages):
      from asearcher_jax.tools.index import SearchIndex
      self._index = SearchIndex(pages)
      if self._index.pages is None:
        self._index.close()
        raise RetrievalError(f"{pages}: this index has no pages (build it with --pages)")
    elif os.path.isfile(pages):
      self._pages = {row["url"]: row for row in read_pages(pages)}
    else:
      raise RetrievalError(f"{pages}: no such pages file or index directory")
    if corpus is not None and not os.path.isfile(corpus):
      raise RetrievalError(f"{corpus}: no such corpus file")
    self.corpus = corpus
    self._titles: dict[str, str] | None = None
    self._passages: dict[str, dict] | None = None

  @classmethod
  def from_config(cls, synth, world) -> tuple[PageSource, str | None]:
    """The section's pages, and the world directory they came from (None for other pages)."""
    if synth.pages is not None:
      return cls(synth.pages, synth.corpus), None
    if synth.world_dir is not None:
      world_dir = synth.world_dir
      if not os.path.isdir(world_dir):
        raise ConfigError(f"synth.world_dir={world_dir}: no such directory")
    else:
      from asearcher_jax.world import ensure_world
      world_dir = ensure_world(world)
    corpus = synth.corpus or os.path.join(world_dir, "corpus.jsonl")
    return cls(os.path.join(world_dir, "pages.jsonl"), corpus), world_dir

  def __len__(self) -> int:
    return len(self._pages) if self._pages is not None else self._index.num_pages

  def urls(self) -> list[str]:
    return list(self._pages) if self._pages is not None else list(self._index.page_index)

  def page(self, url: str) -> dict | None:
    if self._pages is not None:
      return self._pages.get(url)
    return self._index.page(url)

  def _rows(self) -> Iterator[dict]:
    return iter(self._pages.values()) if self._pages is not None else iter(self._index.pages)

  def by_title(self, title: str) -> dict | None:
    """The page titled `title` (exact, else case-insensitive; the first such page wins)."""
    if self._titles is None:
      self._titles = {}
      for row in self._rows():
        for key in (row["title"], row["title"].lower()):
          self._titles.setdefault(key, row["url"])
    url = self._titles.get(title) or self._titles.get(title.lower())
    return None if url is None else self.page(url)

  def passage(self, pid: str) -> dict | None:
    """A corpus passage by id: from the corpus file (held whole: the world's is small), else
    from an index directory's memory-mapped docs (only id -> row is held)."""
    if self._passages is None:
      if self.corpus is not None:
        self._passages = {row["id"]: row for row in read_corpus(self.corpus)}
      elif self._index is not None:
        self._passages = {str(row["id"]): i for i, row in enumerate(self._index.docs)}
      else:
        self._passages = {}
    found = self._passages.get(str(pid))
    return self._index.doc(found) if isinstance(found, int) else found

  def close(self) -> None:
    if self._index is not None:
      self._index.close()
