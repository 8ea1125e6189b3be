"""Typed results of the agent's tools: search hits, pages cut into chunks, and tool errors.

A tool call never raises into the agent loop: whatever goes wrong (a timeout, a 5xx, an
unknown URL, a malformed reply) comes back as a `ToolResult` whose `error` is set, and the
agent reads its rendering like any other observation. Rendering follows Search-R1
(`Doc i(Title: ...) text`) and ASearcher (`>>>> Page i >>>>` chunks).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ErrorKind = Literal["timeout", "http", "rate_limited", "not_found", "bad_request", "connection",
                    "bad_response", "unavailable"]


def title_from_contents(contents: str) -> str:
  """The title of a wiki-18 style passage, whose contents are '"Title"\ntext' ("" if not
  that shape). The one parser of that convention: the corpus reader, `SearchHit.text` and the
  client (for servers that send no title) all use it."""
  head, sep, _ = contents.partition("\n")
  return head.strip().strip('"') if sep and head.startswith('"') else ""


@dataclasses.dataclass(frozen=True)
class SearchHit:
  id: str
  title: str
  contents: str
  url: str = ""
  score: float | None = None

  @property
  def text(self) -> str:
    """`contents` without the wiki-18 style '"Title"' first line."""
    title = title_from_contents(self.contents)
    return self.contents.partition("\n")[2] if title and title == self.title else self.contents


@dataclasses.dataclass(frozen=True)
class Page:
  url: str
  title: str
  contents: str
  links: tuple[str, ...] = ()

  def chunks(self, chunk_chars: int = 10_000, max_chunks: int = 10) -> list[str]:
    """The page split into at most `max_chunks` pieces of at most `chunk_chars` characters,
    cut at a paragraph or line break when one falls in the last fifth of a piece."""
    if chunk_chars <= 0 or max_chunks <= 0:
      raise ValueError("chunk_chars and max_chunks must be positive")
    text, out, i = self.contents, [], 0
    while i < len(text) and len(out) < max_chunks:
      end = min(len(text), i + chunk_chars)
      if end < len(text):
        for sep in ("\n\n", "\n", ". "):
          cut = text.rfind(sep, i + chunk_chars * 4 // 5, end)
          if cut > i:
            end = cut + len(sep)
            break
      out.append(text[i:end])
      i = end
    return out


@dataclasses.dataclass(frozen=True)
class ToolError:
  kind: ErrorKind
  message: str
  status: int | None = None
  # Whose fault, where the adapter knows better than the kind tells: a page that plain fetch
  # could not reach or read is the URL's (the policy wrote it), whatever the kind.
  cause: Literal["call", "environment"] | None = None

  def render(self) -> str:
    return f"Tool error ({self.kind}): {self.message}"


@dataclasses.dataclass(frozen=True)
class ToolResult:
  """One tool call's outcome: `hits` for a search, `page` for an access, or `error`."""

  tool: Literal["search", "access"]
  query: str
  hits: tuple[SearchHit, ...] = ()
  page: Page | None = None
  error: ToolError | None = None

  @property
  def ok(self) -> bool:
    return self.error is None

  @property
  def environment_failed(self) -> bool:
    """Whether it failed by the environment's fault (one of our services down, slow, broken,
    out of quota or refusing our key) rather than the call's (an empty query; a page that is
    not there, will not load or refuses to be read): episodes the environment ended are not
    the policy's doing, so they are neither scored nor trained on. A search query cannot earn
    a 4xx beyond a bad request; a URL can."""
    e = self.error
    if e is None:
      return False
    if e.cause is not None:
      return e.cause == "environment"
    if e.kind in ("not_found", "bad_request"):
      return False
    return not (self.tool == "access" and e.kind == "http" and e.status is not None
                and e.status < 500)

  def render(self, chunk: int | None = None, chunk_chars: int = 10_000,
             max_chunks: int = 10) -> str:
    """The observation text the agent reads (inside <information>...</information>)."""
    if self.error is not None:
      return self.error.render()
    if self.tool == "search":
      if not self.hits:
        return "No results found."
      # Search-R1's "Doc i(Title: t) text", with the URL the agent can <access> when known.
      return "\n".join(f"Doc {i + 1}(Title: {h.title}){f' URL: {h.url}' if h.url else ''} "
                       f"{h.text}" for i, h in enumerate(self.hits))
    chunks = self.page.chunks(chunk_chars, max_chunks) if self.page else []
    if not chunks:
      return "No More Information is Found for this URL."
    if chunk is None:
      return "\n".join(f">>>> Page {i + 1} >>>>\n{c}" for i, c in enumerate(chunks))
    if not 0 <= chunk < len(chunks):
      return "No More Information is Found for this URL."
    return f">>>> Page {chunk + 1} >>>>\n{chunks[chunk]}"

  @classmethod
  def failure(cls, tool, query: str, kind: ErrorKind, message: str,
              status: int | None = None, cause=None) -> ToolResult:
    return cls(tool, query, error=ToolError(kind, message, status, cause))
