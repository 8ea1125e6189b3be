"""Web adapters: a Serper-style search API, a Jina-reader-style page reader, and plain fetch.

ASearcher's web agent searches with Serper (`POST /search`, `X-API-KEY`, `{"q", "num"}` ->
`{"organic": [{"title", "link", "snippet"}]}`) and reads pages through Jina Reader
(`GET https://r.jina.ai/<url>`, bearer key, JSON `{"data": {"title", "content", "url"}}`).
Both are rate-limited, paid and flaky, so every call here has a timeout, a concurrency
limit, retries with jittered exponential backoff on 429/5xx/timeouts/dropped connections
(honouring `Retry-After`), and an optional persistent cache. Base URLs are config, so tests
point them at fake providers on 127.0.0.1. A failure raises `WebError`, which the agent
client turns into a tool-error result.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
from html.parser import HTMLParser
from urllib.parse import urljoin

import aiohttp

from asearcher_jax.tools.cache import DiskCache
from asearcher_jax.tools.config import WebSection
from asearcher_jax.tools.types import Page, SearchHit


class WebError(Exception):
  def __init__(self, kind: str, message: str, status: int | None = None):
    super().__init__(message)
    self.kind, self.status = kind, status


class _Retryable(Exception):
  def __init__(self, kind: str, message: str, status: int | None = None,
               retry_after: float | None = None):
    super().__init__(message)
    self.kind, self.status, self.retry_after = kind, status, retry_after


def _retry_after(value: str | None) -> float | None:
  try:
    return max(0.0, float(value)) if value else None
  except ValueError:
    return None


class _HttpAdapter:
  """Shared session, concurrency limit, retries and cache of the web adapters."""

  def __init__(self, cfg: WebSection | None = None, cache: DiskCache | None = None,
               seed: int | None = None):
    self.cfg = cfg or WebSection()
    if cache is None and self.cfg.cache_path:
      cache = DiskCache(self.cfg.cache_path, ttl_s=self.cfg.cache_ttl_s)
    self.cache = cache
    self._session: aiohttp.ClientSession | None = None
    self._sem: asyncio.Semaphore | None = None
    self._rng = random.Random(seed)
    self.attempts = 0  # HTTP requests made, retries included (for tests and metrics)

  def _ensure(self):
    if self._session is None or self._session.closed:
      self._session = aiohttp.ClientSession()
      self._sem = asyncio.Semaphore(self.cfg.concurrency)
    return self._session

  async def close(self) -> None:
    if self._session is not None:
      await self._session.close()
      self._session = None

  async def _request(self, method: str, url: str, *, want: str = "json", **kw):
    session = self._ensure()
    timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
    attempt = 0
    while True:
      try:
        async with self._sem:
          self.attempts += 1
          async with session.request(method, url, timeout=timeout, **kw) as r:
            if r.status == 429:
              raise _Retryable("rate_limited", f"{url}: HTTP 429 rate limited", 429,
                               _retry_after(r.headers.get("Retry-After")))
            if r.status >= 500:
              raise _Retryable("http", f"{url}: HTTP {r.status}", r.status,
                               _retry_after(r.headers.get("Retry-After")))
            if r.status >= 400:
              detail = (await r.text(errors="replace"))[:200]
              raise WebError("not_found" if r.status in (404, 410) else "http",
                             f"{url}: HTTP {r.status} {detail}".strip(), r.status)
            if want == "json":
              try:
                return await r.json(content_type=None)
              except ValueError as e:
                raise WebError("bad_response", f"{url}: reply is not JSON ({e})") from None
            raw = await r.content.read(self.cfg.max_page_chars * 4)
            return r.headers.get("Content-Type", ""), raw.decode(r.charset or "utf-8",
                                                                 errors="replace")
      except _Retryable as e:
        err = e
      except asyncio.TimeoutError:
        err = _Retryable("timeout", f"{url}: no reply within {self.cfg.timeout_s}s")
      except aiohttp.ClientConnectionError as e:
        err = _Retryable("connection", f"{url}: {type(e).__name__}: {e}")
      if attempt >= self.cfg.max_retries:
        raise WebError(err.kind, f"{err} (after {attempt + 1} attempts)", err.status)
      delay = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** attempt)
      delay *= 0.5 + 0.5 * self._rng.random()
      if err.retry_after is not None:
        delay = max(delay, min(err.retry_after, self.cfg.max_backoff_s))
      await asyncio.sleep(delay)
      attempt += 1

  def _cached(self, key: str):
    return None if self.cache is None else self.cache.get(key)

  def _store(self, key: str, value) -> None:
    if self.cache is not None:
      self.cache.put(key, value)


class SerperSearch(_HttpAdapter):
  """Google results through a Serper-compatible API."""

  async def search(self, query: str, topk: int) -> list[SearchHit]:
    key = f"search:{self.cfg.search_url}:{topk}:{query}"
    data = self._cached(key)
    if data is None:
      api_key = os.environ.get(self.cfg.search_key_env)
      if not api_key:
        raise WebError("unavailable", f"web search needs an API key in ${self.cfg.search_key_env}")
      data = await self._request(
          "POST", self.cfg.search_url.rstrip("/") + "/search",
          headers={"X-API-KEY": api_key, "Content-Type": "application/json"},
          json={"q": query[:2000], "num": topk})
      if not isinstance(data, dict) or not isinstance(data.get("organic", []), list):
        raise WebError("bad_response", "search reply lacks an 'organic' list")
      self._store(key, data)
    hits = []
    for i, item in enumerate(data.get("organic", [])[:topk]):
      if not isinstance(item, dict) or "link" not in item:
        continue
      hits.append(SearchHit(id=str(item["link"]), title=str(item.get("title", "")),
                            contents=str(item.get("snippet", "")), url=str(item["link"]),
                            score=None if "position" not in item else 1.0 / item["position"]))
    return hits


class JinaReader(_HttpAdapter):
  """Pages as clean text through a Jina-Reader-compatible service."""

  async def read(self, url: str) -> Page:
    key = f"page:jina:{url}"
    data = self._cached(key)
    if data is None:
      headers = {"Accept": "application/json"}
      api_key = os.environ.get(self.cfg.reader_key_env)
      if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
      reply = await self._request("GET", f"{self.cfg.reader_url.rstrip('/')}/{url}",
                                  headers=headers)
      page = reply.get("data") if isinstance(reply, dict) else None
      if not isinstance(page, dict) or not isinstance(page.get("content"), str):
        raise WebError("bad_response", f"reader reply for {url} lacks data.content")
      data = {"url": page.get("url") or url, "title": page.get("title") or "",
              "contents": page["content"][:self.cfg.max_page_chars], "links": []}
      self._store(key, data)
    return Page(data["url"], data["title"], data["contents"], tuple(data["links"]))


class HttpFetcher(_HttpAdapter):
  """Plain HTTP GET with HTML -> text, when no reader service is available."""

  async def read(self, url: str) -> Page:
    key = f"page:fetch:{url}"
    data = self._cached(key)
    if data is None:
      if not url.startswith(("http://", "https://")):
        raise WebError("bad_request", f"not an http(s) URL: {url!r}")
      ctype, body = await self._request("GET", url, want="text",
                                        headers={"User-Agent": "asearcher-jax/0.1"})
      if "html" in ctype or body.lstrip()[:15].lower().startswith(("<!doctype", "<html")):
        title, text, links = html_to_text(body, base_url=url)
      elif ctype.startswith("text/") or not ctype:
        title, text, links = "", body, []
      else:
        raise WebError("bad_response", f"{url}: unsupported content type {ctype!r}")
      data = {"url": url, "title": title, "contents": text[:self.cfg.max_page_chars],
              "links": links}
      self._store(key, data)
    return Page(data["url"], data["title"], data["contents"], tuple(data["links"]))


_BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header",
          "footer", "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "hr",
          "main", "nav", "aside", "figure", "figcaption", "form"}
_SKIP = {"script", "style", "noscript", "svg", "template", "iframe", "head"}


class _TextExtractor(HTMLParser):
  def __init__(self, base_url: str):
    super().__init__(convert_charrefs=True)
    self.base_url = base_url
    self.parts: list[str] = []
    self.links: list[str] = []
    self.title = ""
    self._skip = 0
    self._in_title = False

  def handle_starttag(self, tag, attrs):
    if tag == "title":
      self._in_title = True
    elif tag in _SKIP:
      self._skip += 1
    elif tag in _BLOCK:
      self.parts.append("\n")
      if tag == "li":
        self.parts.append("- ")
      elif tag[0] == "h" and tag[1:].isdigit():
        self.parts.append("#" * int(tag[1:]) + " ")
    elif tag == "a":
      href = dict(attrs).get("href")
      if href and not href.startswith(("#", "javascript:", "mailto:")):
        self.links.append(urljoin(self.base_url, href))
    elif tag == "td":
      self.parts.append(" | ")

  def handle_startendtag(self, tag, attrs):
    if tag in ("br", "hr"):
      self.parts.append("\n")
    elif tag == "a":
      self.handle_starttag(tag, attrs)

  def handle_endtag(self, tag):
    if tag == "title":
      self._in_title = False
    elif tag in _SKIP:
      self._skip = max(0, self._skip - 1)
    elif tag in _BLOCK:
      self.parts.append("\n")

  def handle_data(self, data):
    if self._in_title:
      self.title += data
    elif not self._skip:
      self.parts.append(data)


def html_to_text(html: str, base_url: str = "") -> tuple[str, str, list[str]]:
  """(title, readable text, absolute link URLs) of an HTML document, stdlib only."""
  p = _TextExtractor(base_url)
  p.feed(html)
  p.close()
  lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(p.parts).split("\n")]
  text = re.sub(r"\n{3,}", "\n\n", "\n".join(line if line else "" for line in lines)).strip()
  links = list(dict.fromkeys(p.links))
  return p.title.strip(), text, links
