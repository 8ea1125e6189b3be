"""Append-only JSON-lines files that survive crashes: every append is fsynced, a torn last line
(a crash mid-write) is ignored on reading and cut off before the next append; a last line that
is whole but lacks its newline is read, and kept by the next append. Traces, trajectory files
and journals all go through here; a file rewritten whole goes through `write_atomic`."""

from __future__ import annotations

import codecs
import json
import os
from typing import Any, Iterable, Iterator

from asearcher_jax.errors import DataError


def append_lines(path: str, records: Iterable[Any], encode=json.dumps,
                 keep_whole: bool = True) -> None:
  """Appends one line per record (`encode(record)`), then flushes and fsyncs; an unfinished
  last line is first ended or cut off (`drop_torn_tail`)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  drop_torn_tail(path, keep_whole)
  with open(path, "a", encoding="utf-8") as f:
    for r in records:
      f.write(encode(r) + "\n")
    f.flush()
    os.fsync(f.fileno())


def write_atomic(path: str, text: str) -> None:
  """Replaces `path` with `text`, whole or not at all (a temp file beside it, fsync, rename): a
  reader, or a crash, never meets half of it."""
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                     f".{os.path.basename(path)}.tmp-{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_lines(path: str, decode=json.loads) -> list[Any]:
  """Every complete line, decoded; a torn last line is skipped, a bad middle line is an error."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  out = []
  for i, raw in enumerate(lines):
    if not raw.strip():
      continue
    try:
      out.append(_decoded(path, i + 1, raw, decode))
    except DataError:
      if i != len(lines) - 1:  # only an unterminated last line can be torn
        raise
  return out


def _decoded(path: str, n: int, raw: bytes, decode) -> Any:
  """Line `n` of `path`, decoded, or a DataError that names it."""
  try:
    return decode(raw.decode("utf-8"))
  # UnicodeDecodeError is a ValueError; OverflowError: a number too big for its array
  except (ValueError, TypeError, RecursionError, OverflowError) as e:
    raise DataError(f"{path}:{n}: unreadable line ({e})") from None


class Follower:
  """The lines appended to a file since the last `read`, as `read_lines` decodes them: a line a
  writer is still writing is left for the next read. Reading only what is new keeps a
  supervisor that polls a growing metrics or rollout log from decoding it whole each time."""

  def __init__(self, path: str, decode=json.loads):
    self.path, self.decode, self.offset, self.lines = path, decode, 0, 0

  def read(self) -> list[Any]:
    if not os.path.exists(self.path):
      return []
    with open(self.path, "rb") as f:
      f.seek(self.offset)
      data = f.read()
    end = data.rfind(b"\n") + 1  # complete lines only
    lines = data[:end].split(b"\n")[:-1]
    out = []
    for n, raw in enumerate(lines, self.lines + 1):
      if raw.strip():
        out.append(_decoded(self.path, n, raw, self.decode))
    self.offset, self.lines = self.offset + end, self.lines + len(lines)
    return out


def drop_torn_tail(path: str, keep_whole: bool = True) -> None:
  """Ends a file that does not end with a newline: a last line that is whole JSON (which
  `read_lines` returns) gets its newline, a torn one is cut off. A journal whose records count
  only once fsynced with their newline passes `keep_whole=False`: it drops the line either
  way."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    pos = end = f.seek(0, os.SEEK_END)
    if end == 0:
      return
    f.seek(end - 1)
    if f.read(1) == b"\n":
      return
    tail = 0
    while pos > 0:
      start = max(0, pos - (1 << 16))
      f.seek(start)
      i = f.read(pos - start).rfind(b"\n")
      if i >= 0:
        tail = start + i + 1
        break
      pos = start
    f.seek(tail)
    if keep_whole and _is_json(f.read()):
      f.write(b"\n")  # read() left the position at the end
    else:
      f.truncate(tail)


def _is_json(raw: bytes) -> bool:
  try:
    json.loads(raw.decode("utf-8"))
  except (ValueError, RecursionError):
    return False
  return True


def iter_rows(path: str) -> Iterator[tuple[int, dict | None, str | None]]:
  """(1-based line number, JSON object or None, what is wrong with the line or None) for each
  non-blank line of a JSONL data file. Readers decide whether a bad line is skipped and
  reported (QA data) or fatal (a corpus)."""
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      if n == 1 and raw.startswith(codecs.BOM_UTF8):  # Windows tools write one
        raw = raw[len(codecs.BOM_UTF8):]
      if not raw.strip():
        continue
      try:
        row = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        yield n, None, f"not UTF-8 ({e.reason} at byte {e.start})"
        continue
      except json.JSONDecodeError as e:
        yield n, None, f"invalid JSON ({e.msg}, column {e.colno})"
        continue
      if not isinstance(row, dict):
        yield n, None, f"expected a JSON object, got {type(row).__name__}"
      else:
        yield n, row, None
