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
import codecs
import ipaddress
import logging
import os
import random
import re
import socket
import sqlite3
from html.parser import HTMLParser
from urllib.parse import urljoin

import aiohttp

from asearcher_jax.retry import retry_after, retrying
from asearcher_jax.tools.cache import DiskCache
from asearcher_jax.tools.config import WebSection
from asearcher_jax.tools.types import Page, SearchHit

log = logging.getLogger(__name__)


class WebError(Exception):
  def __init__(self, kind: str, message: str, status: int | None = None,
               cause: str | None = None):
    super().__init__(message)
    self.kind, self.status, self.cause = kind, status, cause  # cause: see ToolError


class _Retryable(Exception):
  def __init__(self, kind: str, message: str, status: int | None = None,
               retry_after: float | None = None):
    super().__init__(message)
    self.kind, self.status, self.retry_after = kind, status, retry_after


class _NotPublic(Exception):
  """The address a fetch would connect to is not a public one (not an OSError, which aiohttp
  would take for a connection failure, and retry)."""


def _check_public(host: str, ip: str) -> None:
  addr = ipaddress.ip_address(ip)
  if not addr.is_global or addr.is_multicast:
    raise _NotPublic(f"{host} is {addr}, not a public address (web.fetch_private allows it)")


class _PublicResolver(aiohttp.ThreadedResolver):
  """Resolves as aiohttp does, then refuses non-public addresses: checked on the address
  actually connected to, so a name whose DNS answer changes cannot slip through."""

  async def resolve(self, host: str, port: int = 0, family=socket.AF_INET):
    infos = await super().resolve(host, port, family)
    for info in infos:
      _check_public(host, info["host"])
    return infos


async def _public_literals(request, handler):
  """Client middleware, run for every hop of a request, redirects included: an address
  written as an IP, which aiohttp connects to without resolving, must be public too."""
  host = request.url.host or ""
  try:
    ipaddress.ip_address(host)
  except ValueError:
    return await handler(request)  # a name: `_PublicResolver` checks what it resolves to
  _check_public(host, host)
  return await handler(request)


class _HttpAdapter:
  """Shared session, concurrency limit, retries and cache of the web adapters."""

  def __init__(self, cfg: WebSection | None = None, cache: DiskCache | None = None,
               seed: int | None = None, limiter: _Limiter | None = None):
    self.cfg = cfg or WebSection()
    if cache is None and self.cfg.cache_path:
      cache = DiskCache(self.cfg.cache_path, ttl_s=self.cfg.cache_ttl_s)
    self.cache = cache
    self._session: aiohttp.ClientSession | None = None
    self._session_loop = None
    # Shared between the searcher and the reader of one client, so `concurrency` bounds all
    # web requests together rather than each adapter separately.
    self.limiter = limiter or _Limiter(self.cfg.concurrency)
    self._rng = random.Random(seed)
    self.attempts = 0  # HTTP requests made, retries included (for tests and metrics)

  def _ensure(self):
    # A session belongs to its event loop: a new loop (another asyncio.run) gets a new one.
    loop = asyncio.get_running_loop()
    if self._session is None or self._session.closed or self._session_loop is not loop:
      self._session, self._session_loop = aiohttp.ClientSession(**self._session_args()), loop
    return self._session

  def _session_args(self) -> dict:
    return {}

  async def close(self) -> None:
    if self._session is not None and self._session_loop is asyncio.get_running_loop():
      await self._session.close()
    self._session = None

  async def _request(self, method: str, url: str, *, want: str = "json", **kw):
    session = self._ensure()
    timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
    # A body cut off mid-transfer is as transient as a dropped connection.
    transient = (_Retryable, asyncio.TimeoutError, aiohttp.ClientConnectionError,
                 aiohttp.ClientPayloadError)
    n = 0
    try:
      async for attempt in retrying(attempts=self.cfg.max_retries + 1, base_s=self.cfg.backoff_s,
                                    max_s=self.cfg.max_backoff_s, retry_on=transient,
                                    rng=self._rng):
        n += 1
        with attempt:
          async with self.limiter.get():
            self.attempts += 1
            try:
              response = await session.request(method, url, timeout=timeout, **kw)
            except _NotPublic as e:  # the call's fault: never retried
              raise WebError("bad_request", str(e)) from None
            async with response as r:
              if r.status == 429:
                raise _Retryable("rate_limited", f"{url}: HTTP 429 rate limited", 429,
                                 retry_after(r.headers.get("Retry-After")))
              if r.status >= 500 or r.status == 408:  # 408: the server timed the request out
                raise _Retryable("http" if r.status != 408 else "timeout",
                                 f"{url}: HTTP {r.status}", r.status,
                                 retry_after(r.headers.get("Retry-After")))
              if r.status >= 400:
                detail = (await r.text(errors="replace"))[:200]
                raise WebError("not_found" if r.status in (404, 410) else "http",
                               f"{url}: HTTP {r.status} {detail}".strip(), r.status)
              if want == "json":
                try:
                  return await r.json(content_type=None)
                except ValueError as e:
                  raise WebError("bad_response", f"{url}: reply is not JSON ({e})") from None
              # `content.read(n)` returns only what has arrived so far; read to EOF or the
              # size limit, else a slow page comes back (and is cached) truncated.
              limit, buf = self.cfg.max_page_chars * 4, bytearray()
              async for chunk in r.content.iter_chunked(1 << 16):
                buf += chunk
                if len(buf) >= limit:
                  break
              # The address after redirects: relative links resolve against it.
              return (r.headers.get("Content-Type", ""), bytes(buf[:limit]), r.charset,
                      str(r.url))
    except _Retryable as e:
      err = e
    except asyncio.TimeoutError:
      err = _Retryable("timeout", f"{url}: no reply within {self.cfg.timeout_s}s")
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
      err = _Retryable("connection", f"{url}: {type(e).__name__}: {e}")
    raise WebError(err.kind, f"{err} (after {n} attempts)", err.status)

  async def _cached(self, key: str):
    """sqlite may wait on another writer (busy timeout): off the event loop. A cache that
    fails (a full disk, a locked or damaged file) is a miss, never a failed call."""
    if self.cache is None:
      return None
    try:
      return await asyncio.to_thread(self.cache.get, key)
    except (sqlite3.Error, ValueError) as e:
      log.warning("web cache %s: read failed (%s); asking the provider", self.cache.path, e)
      return None

  async def _store(self, key: str, value) -> None:
    if self.cache is None:
      return
    try:
      await asyncio.to_thread(self.cache.put, key, value)
    except (sqlite3.Error, ValueError) as e:  # the result still goes back to the agent
      log.warning("web cache %s: write failed (%s)", self.cache.path, e)


class _Limiter:
  """One concurrency limit for several adapters. The semaphore is made lazily, per event
  loop, because an asyncio.Semaphore used from two loops fails."""

  def __init__(self, n: int):
    self.n = n
    self._sem: asyncio.Semaphore | None = None
    self._loop = None

  def get(self) -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    if self._sem is None or self._loop is not loop:
      self._sem, self._loop = asyncio.Semaphore(self.n), loop
    return self._sem


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)


def _decode(raw: bytes, charset: str | None) -> str:
  """Body bytes as text, in the header's charset, else the one a `<meta>` in the page's
  first kilobytes declares (pages in windows-1252 or GBK often say so only there), else
  UTF-8; an unknown or bogus charset falls back to UTF-8 instead of failing the page."""
  if not charset and (m := _META_CHARSET.search(raw[:4096])):
    charset = m.group(1).decode("ascii")
  try:
    codecs.lookup(charset or "utf-8")
  except LookupError:
    charset = "utf-8"
  return raw.decode(charset or "utf-8", errors="replace")


class SerperSearch(_HttpAdapter):
  """Google results through a Serper-compatible API."""

  async def search(self, query: str, topk: int) -> list[SearchHit]:
    key = f"search:{self.cfg.search_url}:{topk}:{query}"
    data = await self._cached(key)
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
      await self._store(key, data)
    hits = []
    for item in data.get("organic", [])[:topk]:
      if not isinstance(item, dict) or "link" not in item:
        continue
      rank = item.get("position")  # 1-based; anything else (0, text) gives no score
      score = 1.0 / rank if isinstance(rank, (int, float)) and rank >= 1 else None
      hits.append(SearchHit(id=str(item["link"]), title=str(item.get("title", "")),
                            contents=str(item.get("snippet", "")), url=str(item["link"]),
                            score=score))
    return hits


class JinaReader(_HttpAdapter):
  """Pages as clean text through a Jina-Reader-compatible service."""

  async def read(self, url: str) -> Page:
    key = f"page:jina:{self.cfg.reader_url}:{url}"
    data = await self._cached(key)
    if data is None:
      headers = {"Accept": "application/json"}
      api_key = os.environ.get(self.cfg.reader_key_env)
      if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
      try:
        reply = await self._request("GET", f"{self.cfg.reader_url.rstrip('/')}/{url}",
                                    headers=headers)
      except WebError as e:
        if e.status in (401, 403, 407):  # the reader refuses our key, not the page
          raise WebError(e.kind, str(e), e.status, cause="environment") from None
        raise
      except aiohttp.InvalidURL as e:  # the URL the policy wrote
        raise WebError("bad_request", f"{url}: not a URL ({e})", cause="call") from None
      page = reply.get("data") if isinstance(reply, dict) else None
      if not isinstance(page, dict) or not isinstance(page.get("content"), str):
        raise WebError("bad_response", f"reader reply for {url} lacks data.content")
      data = {"url": page.get("url") or url, "title": page.get("title") or "",
              "contents": page["content"][:self.cfg.max_page_chars], "links": []}
      if data["contents"].strip():  # an empty read (a page that failed to load) is not kept
        await self._store(key, data)
    return Page(data["url"], data["title"], data["contents"], tuple(data["links"]))


class HttpFetcher(_HttpAdapter):
  """Plain HTTP GET with HTML -> text, when no reader service is available; public addresses
  only unless `web.fetch_private`."""

  def _session_args(self) -> dict:
    if self.cfg.fetch_private:
      return {}
    return {"connector": aiohttp.TCPConnector(resolver=_PublicResolver()),
            "middlewares": (_public_literals,)}

  async def read(self, url: str) -> Page:
    key = f"page:fetch:{url}"
    data = await self._cached(key)
    if data is None:
      if not url.startswith(("http://", "https://")):
        raise WebError("bad_request", f"not an http(s) URL: {url!r}")
      # Whatever goes wrong here is the page's, which the policy chose: a site that is down,
      # will not resolve, redirects for ever or serves a PDF (a machine that lost its network
      # looks the same; a reader service, `web.reader: jina`, tells the two apart).
      try:
        ctype, raw, charset, final = await self._request(
            "GET", url, want="text", headers={"User-Agent": "asearcher-jax/0.1"})
      except WebError as e:
        raise WebError(e.kind, str(e), e.status, cause="call") from None
      except (aiohttp.ClientError, ValueError) as e:  # InvalidURL, TooManyRedirects, ...
        raise WebError("bad_request", f"{url}: {type(e).__name__}: {e}", cause="call") from None
      body = _decode(raw, charset)
      if "html" in ctype or body.lstrip()[:15].lower().startswith(("<!doctype", "<html")):
        title, text, links = html_to_text(body, base_url=final)
      elif ctype.startswith("text/") or not ctype:
        title, text, links = "", body, []
      else:
        raise WebError("bad_response", f"{url}: unsupported content type {ctype!r}",
                       cause="call")
      data = {"url": url, "title": title, "contents": text[:self.cfg.max_page_chars],
              "links": links}
      await self._store(key, data)
    return Page(data["url"], data["title"], data["contents"], tuple(data["links"]))


_BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header",
          "footer", "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "hr",
          "main", "nav", "aside", "figure", "figcaption", "form"}
# `head` is not skipped as an element: its end tag (and even `<head>`) may be omitted in
# legal HTML, and skipping until `</head>` would then drop the whole body. Its text-bearing
# children (title, script, style) are handled on their own; <body> resets any skipping.
_SKIP = {"script", "style", "noscript", "svg", "template", "iframe"}


class _TextExtractor(HTMLParser):
  def __init__(self, base_url: str):
    super().__init__(convert_charrefs=True)
    self.base_url = base_url
    self.parts: list[str] = []
    self.links: list[str] = []
    self.title = ""
    self._skip = 0
    self._in_title = False
    self._title_done = False

  def handle_starttag(self, tag, attrs):
    if tag == "body":
      self._skip = 0  # an unclosed skipped element before <body> must not hide the body
    elif tag == "title":
      # Only the document's first title: an SVG <title> (inside a skipped element) or a
      # second <title> is not the page's.
      self._in_title = not self._skip and not self._title_done
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
    elif tag in ("td", "th"):
      self.parts.append(" | ")

  def handle_startendtag(self, tag, attrs):
    if tag in ("br", "hr"):
      self.parts.append("\n")
    elif tag == "a":
      self.handle_starttag(tag, attrs)

  def handle_endtag(self, tag):
    if tag == "title":
      if self._in_title:
        self._title_done = True
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
