"""The agent's search tools: `search(queries, topk)` and `access(url)` returning typed results.

One interface over two backends: the local retrieval server (Search-R1/ASearcher JSON API)
and the web (Serper-style search + Jina-style reader or plain fetch). The agent loop must
survive anything a tool does, so nothing here raises for a tool failure: a timeout, an HTTP
error, a malformed reply or an unknown URL becomes a `ToolResult` with `error` set, which
the agent reads as its observation. Pages come back whole; `chunks` cuts them for reading
one chunk per turn (size and count from config).
"""

from __future__ import annotations

import asyncio
import os
from typing import Protocol

import aiohttp

from asearcher_jax.tools.config import RetrievalSection, SearchClientSection, WebSection
from asearcher_jax.tools.types import Page, SearchHit, ToolResult, title_from_contents
from asearcher_jax.tools.web import HttpFetcher, JinaReader, SerperSearch, WebError

# The server rejects a /retrieve request whole when one query is too long or there are too
# many (a per-query error would change the Search-R1 reply shape that existing clients read).
# So the client keeps within the server's limits itself -- trimming over-long queries and
# splitting big batches -- and one bad query never fails the other queries of an agent step.
# The limits come from the server's /health (asked once per client), else these defaults.
_SERVER = RetrievalSection()


class SearchClient(Protocol):
  cfg: SearchClientSection

  async def search(self, queries: list[str], topk: int | None = None) -> list[ToolResult]: ...

  async def access(self, url: str) -> ToolResult: ...

  async def close(self) -> None: ...


def chunks(client: SearchClient, result: ToolResult) -> list[str]:
  """The page of an access result cut into the client's configured chunks ([] otherwise)."""
  if result.page is None:
    return []
  return result.page.chunks(client.cfg.chunk_chars, client.cfg.max_chunks)


def _hit(d: dict) -> SearchHit:
  doc = d.get("document", d) if isinstance(d, dict) else {}
  if not isinstance(doc, dict) or "contents" not in doc:
    raise ValueError("hit lacks 'contents'")
  contents = str(doc["contents"])
  title = doc.get("title")
  if title is None:  # plain Search-R1 servers: '"Title"\ntext'
    title = title_from_contents(contents)
  score = d.get("score")
  return SearchHit(id=str(doc.get("id", "")), title=str(title), contents=contents,
                   url=str(doc.get("url", "") or ""),
                   score=float(score) if isinstance(score, (int, float)) else None)


class LocalSearchClient:
  """Client of a retrieval server speaking the Search-R1/ASearcher JSON API."""

  def __init__(self, cfg: SearchClientSection | None = None, token: str | None = None,
               mode: str | None = None, max_queries: int | None = None,
               max_query_chars: int | None = None):
    self.cfg = cfg or SearchClientSection()
    token = token if token is not None else os.environ.get(self.cfg.token_env)
    self.token = token or None  # "" (an empty env var) means no token, as on the server
    self.mode = mode
    # Set here, they override what the server's /health says (see `_limits`).
    self._given = {k: v for k, v in (("max_queries", max_queries),
                                     ("max_query_chars", max_query_chars)) if v is not None}
    self._learned: dict[str, int] | None = None
    self._session: aiohttp.ClientSession | None = None
    self._loop = None

  def _ensure(self) -> aiohttp.ClientSession:
    # An aiohttp session belongs to the loop it was made on; a client reused under a new
    # `asyncio.run` gets a new session (the old one's loop is gone, so it is just dropped).
    loop = asyncio.get_running_loop()
    if self._session is None or self._session.closed or self._loop is not loop:
      headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
      self._session, self._loop = aiohttp.ClientSession(headers=headers), loop
    return self._session

  async def close(self) -> None:
    if self._session is not None and self._loop is asyncio.get_running_loop():
      await self._session.close()
    self._session = None

  async def _post(self, path: str, body: dict) -> tuple[int, object]:
    timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
    async with self._ensure().post(self.cfg.url.rstrip("/") + path, json=body,
                                   timeout=timeout) as r:
      try:
        data = await r.json(content_type=None)
      except ValueError:
        data = None
      return r.status, data

  async def _call(self, path: str, body: dict):
    """(status, data) or a ToolError-shaped tuple ('error', kind, message, status)."""
    try:
      status, data = await self._post(path, body)
    except asyncio.TimeoutError:
      return ("error", "timeout", f"{path} gave no reply within {self.cfg.timeout_s}s", None)
    except aiohttp.ClientError as e:
      return ("error", "connection", f"retrieval server unreachable: {type(e).__name__}: {e}",
              None)
    except Exception as e:  # noqa: BLE001 - a tool failure must never crash the agent loop
      return ("error", "bad_response", f"{path}: {type(e).__name__}: {e}", None)
    if status != 200:
      msg = data.get("error") if isinstance(data, dict) else None
      kind = {404: "not_found", 400: "bad_request", 413: "bad_request", 429: "rate_limited",
              504: "timeout"}.get(status, "http")
      return ("error", kind, msg or f"HTTP {status}", status)
    return (status, data)

  async def search(self, queries: list[str], topk: int | None = None) -> list[ToolResult]:
    topk = topk or self.cfg.topk
    results: list[ToolResult | None] = [None] * len(queries)
    send = []
    for i, q in enumerate(queries):
      if not isinstance(q, str) or not q.strip():
        results[i] = ToolResult.failure("search", str(q), "bad_request", "empty search query")
      else:
        send.append(i)
    # Batches beyond the server's per-request limits are split client-side, over-long
    # queries trimmed (BM25/dense see only the first few thousand characters anyway) and
    # topk held to the server's most: the server rejects a bad request whole, so this keeps
    # one query, or one big batch, from failing the others.
    if not send:
      return results  # type: ignore[return-value]
    limits = await self._limits()
    topk = min(topk, limits["max_topk"])
    per_request = max(1, min(limits["max_queries"], limits["max_hits"] // topk))
    for start in range(0, len(send), per_request):
      await self._search_batch(queries, send[start:start + per_request], topk, results,
                               limits["max_query_chars"])
    return results  # type: ignore[return-value]

  async def _limits(self) -> dict[str, int]:
    """The server's per-request limits from its /health, kept once it has answered (a plain
    Search-R1 server answers 404: the defaults); the defaults meanwhile, asking again on the
    next search, so limits guessed while the server was down do not outlive its start."""
    if self._learned is not None:
      return self._learned
    limits, answered = {}, False
    try:
      timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
      async with self._ensure().get(self.cfg.url.rstrip("/") + "/health", timeout=timeout) as r:
        answered = r.status < 500
        data = await r.json(content_type=None) if r.status == 200 else None
      limits = data.get("limits") if isinstance(data, dict) else None
      limits = limits if isinstance(limits, dict) else {}
    except Exception:  # noqa: BLE001 - down, or a reply that is not JSON: the defaults
      limits = {}

    def pick(name: str) -> int:
      v = limits.get(name)
      return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else getattr(
          _SERVER, name)
    out = {name: pick(name) for name in ("max_queries", "max_query_chars", "max_hits",
                                         "max_topk")} | self._given
    if answered:
      self._learned = out
    return out

  async def _search_batch(self, queries: list[str], send: list[int], topk: int,
                          results: list, max_query_chars: int) -> None:
    body = {"queries": [queries[i][:max_query_chars] for i in send], "topk": topk,
            "return_scores": True}
    if self.mode:
      body["mode"] = self.mode
    out = await self._call("/retrieve", body)
    rows = out[1].get("result") if out[0] == 200 and isinstance(out[1], dict) else None
    if out[0] == "error":
      for i in send:
        results[i] = ToolResult.failure("search", queries[i], out[1], out[2], out[3])
    elif not isinstance(rows, list) or len(rows) != len(send):
      for i in send:
        results[i] = ToolResult.failure("search", queries[i], "bad_response",
                                        "reply has no 'result' list with one entry per query")
    else:
      for i, row in zip(send, rows):
        try:
          if not isinstance(row, list):
            raise TypeError(f"result entry is {type(row).__name__}, not a list")
          results[i] = ToolResult("search", queries[i], hits=tuple(_hit(d) for d in row))
        except (ValueError, TypeError, AttributeError) as e:
          results[i] = ToolResult.failure("search", queries[i], "bad_response", str(e))

  async def access(self, url: str) -> ToolResult:
    if not isinstance(url, str) or not url.strip():
      return ToolResult.failure("access", str(url), "bad_request", "empty URL")
    url = url.strip()
    out = await self._call("/access", {"urls": [url]})
    if out[0] == "error":
      return ToolResult.failure("access", url, out[1], out[2], out[3])
    rows = out[1].get("result") if isinstance(out[1], dict) else None
    if not isinstance(rows, list) or len(rows) != 1:
      return ToolResult.failure("access", url, "bad_response",
                                "reply has no 'result' list with one entry")
    page = rows[0]
    if page is None:
      return ToolResult.failure("access", url, "not_found", f"no page for {url}", 404)
    if not isinstance(page, dict) or not isinstance(page.get("contents"), str):
      return ToolResult.failure("access", url, "bad_response", "page lacks 'contents'")
    links = page.get("links") or []
    if not isinstance(links, list):
      return ToolResult.failure("access", url, "bad_response",
                                f"page 'links' is {type(links).__name__}, not a list")
    return ToolResult("access", url, page=Page(
        str(page.get("url", url)), str(page.get("title", "")), page["contents"],
        tuple(str(x) for x in links)))


class WebSearchClient:
  """Web search (Serper-style) and browsing (Jina-style reader, or plain fetch)."""

  def __init__(self, cfg: SearchClientSection | None = None, web: WebSection | None = None,
               cache=None):
    self.cfg = cfg or SearchClientSection(backend="web")
    self.web = web or WebSection()
    self.searcher = SerperSearch(self.web, cache=cache)
    reader_cls = JinaReader if self.web.reader == "jina" else HttpFetcher
    # One cache and one concurrency limit for both: `web.concurrency` is the client's total.
    self.reader = reader_cls(self.web, cache=self.searcher.cache,
                             limiter=self.searcher.limiter)

  async def close(self) -> None:
    await self.searcher.close()
    await self.reader.close()

  async def _one(self, q: str, topk: int) -> ToolResult:
    if not isinstance(q, str) or not q.strip():
      return ToolResult.failure("search", str(q), "bad_request", "empty search query")
    try:
      return ToolResult("search", q, hits=tuple(await self.searcher.search(q, topk)))
    except WebError as e:
      return ToolResult.failure("search", q, e.kind, str(e), e.status, e.cause)
    except Exception as e:  # noqa: BLE001 - never crash the agent loop
      return ToolResult.failure("search", q, "bad_response", f"{type(e).__name__}: {e}")

  async def search(self, queries: list[str], topk: int | None = None) -> list[ToolResult]:
    topk = topk or self.cfg.topk
    return list(await asyncio.gather(*(self._one(q, topk) for q in queries)))

  async def access(self, url: str) -> ToolResult:
    if not isinstance(url, str) or not url.strip():
      return ToolResult.failure("access", str(url), "bad_request", "empty URL")
    try:
      return ToolResult("access", url, page=await self.reader.read(url.strip()))
    except WebError as e:
      return ToolResult.failure("access", url, e.kind, str(e), e.status, e.cause)
    except Exception as e:  # noqa: BLE001
      return ToolResult.failure("access", url, "bad_response", f"{type(e).__name__}: {e}")


def make_client(cfg: SearchClientSection, web: WebSection | None = None) -> SearchClient:
  return LocalSearchClient(cfg) if cfg.backend == "local" else WebSearchClient(cfg, web)
