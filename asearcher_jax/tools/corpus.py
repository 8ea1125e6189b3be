"""Corpus and pages files: validation on the way in, a memory-mapped row store on the way out.

A retrieval server holds millions of passages; keeping them as Python dicts would cost
gigabytes and minutes at start. `build_store` writes rows once as JSONL plus an int64
offsets array; `RowStore` memory-maps both, so start-up is instant and rows are decoded
only when a hit is returned. Validation names the file, line and field at fault.

Corpus rows: `id` (str or int), `contents` (str), optional `title` (else taken from a
wiki-18 style '"Title"' first line of `contents`) and `url`. Page rows: `url`, `contents`,
optional `title` and `links` (list of URLs).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator

import numpy as np

from asearcher_jax.errors import RetrievalError
from asearcher_jax.jsonl import iter_rows
from asearcher_jax.tools.types import title_from_contents


def _iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  """Rows of a corpus file; any bad line is fatal (an index must not silently lose passages)."""
  if not os.path.exists(path):
    raise RetrievalError(f"{path}: file not found")
  for n, row, error in iter_rows(path):
    if error:
      raise RetrievalError(f"{path}:{n}: {error}")
    yield n, row


def _str_field(path: str, n: int, row: dict, name: str, required: bool) -> str:
  value = row.get(name)
  if value is None:
    if required:
      raise RetrievalError(f"{path}:{n}: missing field {name!r}")
    return ""
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise RetrievalError(f"{path}:{n}: field {name!r} must be a string, got "
                         f"{type(value).__name__}")
  return str(value)


def read_corpus(path: str) -> Iterator[dict]:
  """Validated corpus rows: {id, title, contents, url}; duplicate ids are an error."""
  seen: set[str] = set()
  for n, row in _iter_jsonl(path):
    doc_id = _str_field(path, n, row, "id", True)
    contents = _str_field(path, n, row, "contents", True)
    if doc_id in seen:
      raise RetrievalError(f"{path}:{n}: duplicate id {doc_id!r}")
    seen.add(doc_id)
    title = _str_field(path, n, row, "title", False) or title_from_contents(contents)
    yield {"id": doc_id, "title": title, "contents": contents,
           "url": _str_field(path, n, row, "url", False)}


def read_pages(path: str) -> Iterator[dict]:
  """Validated page rows: {url, title, contents, links}; duplicate urls are an error."""
  seen: set[str] = set()
  for n, row in _iter_jsonl(path):
    url = _str_field(path, n, row, "url", True)
    if not url:
      raise RetrievalError(f"{path}:{n}: empty 'url'")
    if url in seen:
      raise RetrievalError(f"{path}:{n}: duplicate url {url!r}")
    seen.add(url)
    links = row.get("links") or []
    if not isinstance(links, list) or not all(isinstance(x, str) for x in links):
      raise RetrievalError(f"{path}:{n}: field 'links' must be a list of strings")
    contents = _str_field(path, n, row, "contents", True)
    yield {"url": url, "title": _str_field(path, n, row, "title", False), "contents": contents,
           "links": links}


def build_store(rows, out_prefix: str) -> int:
  """Write rows as `<prefix>.jsonl` + `<prefix>.offsets.npy`; returns the row count."""
  offsets = [0]
  with open(out_prefix + ".jsonl", "wb") as f:
    for row in rows:
      try:
        line = json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n"
      except UnicodeEncodeError:  # a lone surrogate ("\ud83d" cut from an emoji): escaped
        line = json.dumps(row).encode("ascii") + b"\n"  # reads back as the same string
      f.write(line)
      offsets.append(offsets[-1] + len(line))
  np.save(out_prefix + ".offsets.npy", np.asarray(offsets, np.int64))
  return len(offsets) - 1


class RowStore:
  """Read-only, memory-mapped rows written by `build_store`; safe to share across threads."""

  def __init__(self, prefix: str):
    data, offs = prefix + ".jsonl", prefix + ".offsets.npy"
    for p in (data, offs):
      if not os.path.exists(p):
        raise RetrievalError(f"{p}: file not found (rebuild the index)")
    try:
      self.offsets = np.load(offs, mmap_mode="r")
    except (ValueError, OSError) as e:
      raise RetrievalError(f"{offs}: corrupt offsets file ({e})") from None
    size = os.path.getsize(data)
    if self.offsets.ndim != 1 or len(self.offsets) < 1 or int(self.offsets[-1]) != size:
      raise RetrievalError(f"{data}: size {size} does not match {offs} (corrupt or "
                           f"truncated; rebuild the index)")
    self._file = open(data, "rb")  # noqa: SIM115 - held open for the mmap
    self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> dict:
    return json.loads(self._mm[int(self.offsets[i]):int(self.offsets[i + 1])])

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def close(self) -> None:
    if isinstance(self._mm, mmap.mmap):
      self._mm.close()
    self._file.close()
