"""Web adapters against fake Serper / Jina Reader / HTML sites on 127.0.0.1 that speak the
real providers' request and response shapes: success, 429, 5xx with retry, timeouts, cache."""

import asyncio

import pytest
from aiohttp import web

from asearcher_jax.procs import free_port
from asearcher_jax.tools.cache import DiskCache
from asearcher_jax.tools.client import WebSearchClient
from asearcher_jax.tools.config import SearchClientSection, WebSection
from asearcher_jax.tools.retrieval_server import ServerThread
from asearcher_jax.tools.web import HttpFetcher, JinaReader, SerperSearch, WebError, html_to_text

SERPER_KEY, JINA_KEY = "serper-test-key", "jina-test-key"

HTML = """<!DOCTYPE html><html><head><title>Kestrel Harbor</title>
<style>body {color: red}</style><script>var x = "do not show";</script></head>
<body><nav><a href="/home">Home</a></nav><h1>Kestrel Harbor</h1>
<p>Kestrel Harbor is a port   city.<br>It was founded in 1311.</p>
<ul><li>Population: 170,380</li><li>Mayor: <a href="people/evkas.html">Evkas Lor</a></li></ul>
<table><tr><td>Area</td><td>42 km&sup2;</td></tr></table></body></html>"""


class Fake:
  """Scripted provider: `fail` is a list of statuses (or 'slow') consumed one per request."""

  def __init__(self):
    self.fail: list = []
    self.requests: list[dict] = []
    self.delay = 0.0
    self.positions: list | None = None  # Serper's "position" of each hit (default 1, 2, ...)
    self.active = self.peak = 0
    self.blank = 0  # reads of .../blank that come back empty

  async def _maybe_fail(self):
    if self.fail:
      what = self.fail.pop(0)
      if what == "slow":
        await asyncio.sleep(2.0)
      else:
        return web.json_response({"message": "scripted"}, status=what,
                                 headers={"Retry-After": "0"} if what == 429 else None)
    return None

  def app(self) -> web.Application:
    app = web.Application()

    async def serper(request):
      body = await request.json()
      self.requests.append({"kind": "search", "headers": dict(request.headers), "body": body})
      if request.headers.get("X-API-KEY") != SERPER_KEY:
        return web.json_response({"message": "Unauthorized."}, status=403)
      failed = await self._maybe_fail()
      if failed is not None:
        return failed
      self.active += 1
      self.peak = max(self.peak, self.active)
      await asyncio.sleep(self.delay)
      self.active -= 1
      n = body.get("num", 10)
      return web.json_response({
          "searchParameters": {"q": body["q"], "num": n, "type": "search"},
          "organic": [{"title": f"{body['q']} result {i}", "link": f"https://ex.com/{i}",
                       "snippet": f"snippet {i} about {body['q']}",
                       "position": self.positions[i] if self.positions else i + 1}
                      for i in range(n)]})

    async def jina(request):
      target = request.match_info["target"]
      self.requests.append({"kind": "read", "headers": dict(request.headers), "url": target})
      if request.headers.get("Authorization") != f"Bearer {JINA_KEY}":
        return web.json_response({"code": 401, "message": "bad key"}, status=401)
      failed = await self._maybe_fail()
      if failed is not None:
        return failed
      if target.endswith("/missing"):
        return web.json_response({"code": 422, "message": "cannot fetch"}, status=422)
      content = f"Markdown Content:\n# Page\n\nText of {target}. " + "word " * 3000
      if target.endswith("/blank") and self.blank:  # Jina's 200 for a page that did not load
        self.blank -= 1
        content = ""
      if request.headers.get("Accept") == "application/json":
        return web.json_response({"code": 200, "status": 20000, "data": {
            "title": "Page", "url": target, "content": content, "usage": {"tokens": 3000}}})
      return web.Response(text=content)

    async def site(request):
      self.requests.append({"kind": "fetch", "path": request.path})
      failed = await self._maybe_fail()
      if failed is not None:
        return failed
      if request.path == "/doc.txt":
        return web.Response(text="plain text doc")
      if request.path == "/img.png":
        return web.Response(body=b"\x89PNG", content_type="image/png")
      return web.Response(text=HTML, content_type="text/html")

    app.router.add_post("/search", serper)
    app.router.add_get("/r/{target:.+}", jina)
    app.router.add_get("/site/{path:.*}", site)
    app.router.add_get("/doc.txt", site)
    app.router.add_get("/img.png", site)
    return app


@pytest.fixture(scope="module")
def provider():
  fake = Fake()
  with ServerThread(fake.app()) as srv:
    yield fake, srv


@pytest.fixture
def fake(provider, monkeypatch):
  f, srv = provider
  f.fail.clear()
  f.requests.clear()
  f.delay = 0.0
  f.positions = None
  monkeypatch.setenv("SERPER_API_KEY", SERPER_KEY)
  monkeypatch.setenv("JINA_API_KEY", JINA_KEY)
  return f, srv


def search_once(s: SerperSearch, query: str, topk: int):
  """s.search(query, topk) in an event loop of its own, the adapter's session closed after."""
  async def go():
    try:
      return await s.search(query, topk)
    finally:
      await s.close()
  return asyncio.run(go())


def section(srv, **kw) -> WebSection:
  base = {"search_url": srv.url, "reader_url": srv.url + "/r", "timeout_s": 1.0,
          "max_retries": 2, "backoff_s": 0.01, "max_backoff_s": 0.05}
  base.update(kw)
  return WebSection(**base)


def test_serper_search_request_and_response_shape(fake):
  f, srv = fake
  s = SerperSearch(section(srv))
  hits = search_once(s, "who founded kestrel", 3)
  assert [h.url for h in hits] == ["https://ex.com/0", "https://ex.com/1", "https://ex.com/2"]
  assert hits[0].title == "who founded kestrel result 0" and "snippet 0" in hits[0].contents
  req = f.requests[0]
  assert req["body"] == {"q": "who founded kestrel", "num": 3}
  assert req["headers"]["X-API-KEY"] == SERPER_KEY


def test_hits_rank_by_position_and_an_odd_position_gives_no_score(fake):
  """A hit scores 1 / its 1-based position; a position of 0 or text (a proxy's own numbering)
  leaves it unscored instead of failing the whole search."""
  f, srv = fake
  f.positions = [1, 0, "x", 4]
  s = SerperSearch(section(srv))
  assert [h.score for h in search_once(s, "q", 4)] == [1.0, None, None, 0.25]


def test_rate_limit_and_5xx_are_retried(fake):
  f, srv = fake
  f.fail[:] = [429, 503]
  s = SerperSearch(section(srv))
  assert len(search_once(s, "q", 2)) == 2
  assert s.attempts == 3 and not f.fail


def test_408_is_retried_and_an_empty_read_is_not_cached(fake, tmp_path):
  """A 408 (the server timed the request out) failed at once; an empty read (Jina answers 200
  for a page that did not load) was cached and served for good."""
  f, srv = fake
  f.fail[:] = [408]
  s = SerperSearch(section(srv))
  assert len(search_once(s, "q", 2)) == 2 and s.attempts == 2
  f.blank = 1
  cache = DiskCache(str(tmp_path / "c.sqlite"))

  async def read_twice():
    r = JinaReader(section(srv), cache=cache)
    try:
      return [(await r.read("https://ex.com/blank")).contents for _ in range(2)]
    finally:
      await r.close()
  first, second = asyncio.run(read_twice())
  assert first == "" and "Text of https://ex.com/blank" in second


def test_retries_exhausted_gives_web_error(fake):
  f, srv = fake
  f.fail[:] = [500, 502, 500, 500]
  s = SerperSearch(section(srv, max_retries=2))
  with pytest.raises(WebError) as e:
    search_once(s, "q", 2)
  assert e.value.kind == "http" and e.value.status == 500 and "after 3 attempts" in str(e.value)
  f.fail[:] = [429] * 5
  with pytest.raises(WebError) as e:
    search_once(s, "q", 2)
  assert e.value.kind == "rate_limited" and e.value.status == 429


def test_timeout_then_success_and_timeout_exhausted(fake):
  f, srv = fake
  f.fail[:] = ["slow"]
  s = SerperSearch(section(srv, timeout_s=0.3))
  assert len(search_once(s, "q", 1)) == 1 and s.attempts == 2
  f.fail[:] = ["slow", "slow"]
  s2 = SerperSearch(section(srv, timeout_s=0.3, max_retries=1))
  with pytest.raises(WebError) as e:
    search_once(s2, "q", 1)
  assert e.value.kind == "timeout"


def test_client_errors_are_not_retried_and_missing_key(fake, monkeypatch):
  _, srv = fake
  monkeypatch.setenv("SERPER_API_KEY", "wrong")
  s = SerperSearch(section(srv))
  with pytest.raises(WebError) as e:
    search_once(s, "q", 1)
  assert e.value.status == 403 and s.attempts == 1
  monkeypatch.delenv("SERPER_API_KEY")
  with pytest.raises(WebError, match=r"\$SERPER_API_KEY"):
    search_once(s, "q", 1)


def test_jina_reader_json(fake):
  f, srv = fake
  r = JinaReader(section(srv))

  async def go():
    try:
      return await r.read("https://ex.com/a")
    finally:
      await r.close()
  page = asyncio.run(go())
  assert page.title == "Page" and page.contents.startswith("Markdown Content:")
  assert f.requests[0]["url"] == "https://ex.com/a"
  assert f.requests[0]["headers"]["Authorization"] == f"Bearer {JINA_KEY}"
  assert f.requests[0]["headers"]["Accept"] == "application/json"


def test_plain_fetch_html_to_text(fake):
  _, srv = fake
  fetcher = HttpFetcher(section(srv, fetch_private=True))  # the fake site is on loopback

  async def go():
    try:
      page = await fetcher.read(srv.url + "/site/city.html")
      txt = await fetcher.read(srv.url + "/doc.txt")
      try:
        await fetcher.read(srv.url + "/img.png")
      except WebError as e:
        return page, txt, e
    finally:
      await fetcher.close()
  page, txt, err = asyncio.run(go())
  assert page.title == "Kestrel Harbor"
  assert "Kestrel Harbor is a port city." in page.contents and "do not show" not in page.contents
  assert "- Population: 170,380" in page.contents and "42 km²" in page.contents
  assert srv.url + "/site/people/evkas.html" in page.links and srv.url + "/home" in page.links
  assert txt.contents == "plain text doc"
  assert err.kind == "bad_response" and "image/png" in str(err)


def test_html_to_text_structure():
  title, text, links = html_to_text(HTML, "https://k.org/a/b.html")
  assert title == "Kestrel Harbor"
  assert text.splitlines()[0] == "Home"
  assert "# Kestrel Harbor" in text and "It was founded in 1311." in text
  assert "color: red" not in text
  assert links == ["https://k.org/home", "https://k.org/a/people/evkas.html"]


def test_cache_serves_repeats_and_survives_restart(fake, tmp_path):
  f, srv = fake
  path = str(tmp_path / "web.sqlite")

  async def run(cfg):
    client = WebSearchClient(SearchClientSection(backend="web", topk=2), cfg)
    try:
      return (await client.search(["cached query"]))[0], await client.access("https://ex.com/c")
    finally:
      await client.close()
  first = asyncio.run(run(section(srv, cache_path=path)))
  n = len(f.requests)
  assert n == 2 and first[0].ok and first[1].ok
  second = asyncio.run(run(section(srv, cache_path=path)))  # a new process would see the same
  assert len(f.requests) == n
  assert second[0].hits == first[0].hits and second[1].page == first[1].page
  assert len(DiskCache(path)) == 2


def test_web_client_turns_failures_into_tool_errors(fake):
  f, srv = fake
  cfg = section(srv, max_retries=0, timeout_s=0.3)

  async def go():
    client = WebSearchClient(SearchClientSection(backend="web", topk=2), cfg)
    try:
      f.fail[:] = [500]
      a = await client.search(["x", ""])
      f.fail[:] = ["slow"]
      b = await client.access("https://ex.com/slow")
      c = await client.access("https://ex.com/missing")
      d = await client.search(["fine"])
      return a, b, c, d
    finally:
      await client.close()
  (err5xx, empty), slow, missing, [ok] = asyncio.run(go())
  assert err5xx.error.kind == "http" and err5xx.render().startswith("Tool error (http)")
  assert empty.error.kind == "bad_request"
  assert slow.error.kind == "timeout"
  assert missing.error.kind == "http" and missing.error.status == 422
  assert ok.ok and len(ok.hits) == 2
  # Whose fault: the search API's 5xx and the reader's timeout are ours (an episode they end
  # is `env_error`); a page the reader cannot fetch is the URL's, and the policy's.
  assert err5xx.environment_failed and slow.environment_failed
  assert not missing.environment_failed and not empty.environment_failed


def test_a_page_plain_fetch_cannot_read_is_the_policys_and_a_refused_reader_key_ours(
    fake, monkeypatch):
  """Plain fetch opens the URL the policy wrote: a PDF, a site that is down or a malformed URL
  ended the episode as the environment's, so the policy was never taught to avoid them."""
  _, srv = fake

  async def go():
    fetch = WebSearchClient(SearchClientSection(backend="web"),
                            section(srv, reader="fetch", max_retries=0, fetch_private=True))
    try:
      return [await fetch.access(u) for u in (
          srv.url + "/img.png", f"http://127.0.0.1:{free_port()}/", "http://[bad/")]
    finally:
      await fetch.close()
  pdf, down, malformed = asyncio.run(go())
  assert pdf.error.kind == "bad_response" and down.error.kind == "connection"
  assert malformed.error is not None
  assert not any(r.environment_failed for r in (pdf, down, malformed))
  monkeypatch.setenv("JINA_API_KEY", "wrong")

  async def refused():
    jina = WebSearchClient(SearchClientSection(backend="web"), section(srv, max_retries=0))
    try:
      return await jina.access("https://ex.com/a")
    finally:
      await jina.close()
  r = asyncio.run(refused())
  assert r.error.status == 401 and r.environment_failed


def test_concurrency_limit_respected(fake):
  f, srv = fake
  f.delay, f.peak = 0.1, 0
  s = SerperSearch(section(srv, concurrency=2))
  async def go():
    try:
      return await asyncio.gather(*(s.search(f"q{i}", 1) for i in range(8)))
    finally:
      await s.close()
  try:
    assert len(asyncio.run(go())) == 8
  finally:
    f.delay = 0.0
  assert f.peak == 2 and s.attempts == 8


# ---- regressions ----------------------------------------------------------------------------

def _serve_routes(**routes):
  app = web.Application()
  for path, handler in routes.items():
    app.router.add_get("/" + path, handler)
  return ServerThread(app)


def test_fetch_reads_a_slowly_streamed_body_whole():
  """`content.read(n)` returned only the first chunk to arrive: pages came back (and were
  cached) truncated."""
  async def page(request):
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    for i in range(4):
      await resp.write((f"part{i} " + "x" * 20000 + "\n").encode())
      await asyncio.sleep(0.02)
    await resp.write_eof()
    return resp

  with _serve_routes(p=page) as srv:
    async def go():
      f = HttpFetcher(WebSection(max_retries=0, fetch_private=True))
      try:
        return await f.read(srv.url + "/p")
      finally:
        await f.close()
    p = asyncio.run(go())
  parts = [line[:5] for line in p.contents.split("\n") if line]
  assert parts == ["part0", "part1", "part2", "part3"]


def test_unknown_charset_falls_back_and_cut_off_body_is_retried():
  calls = {"n": 0}

  async def bogus(request):
    return web.Response(body="héllo".encode(), headers={
        "Content-Type": "text/plain; charset=bogus-enc"})

  async def cut(request):
    calls["n"] += 1
    if calls["n"] == 1:  # promise 1000 bytes, send 5, hang up: ClientPayloadError
      resp = web.StreamResponse(headers={"Content-Type": "text/plain", "Content-Length": "1000"})
      await resp.prepare(request)
      await resp.write(b"short")
      request.transport.close()
      return resp
    return web.Response(text="whole page")

  with _serve_routes(b=bogus, c=cut) as srv:
    async def go():
      f = HttpFetcher(WebSection(max_retries=2, backoff_s=0.0, fetch_private=True))
      try:
        return await f.read(srv.url + "/b"), await f.read(srv.url + "/c")
      finally:
        await f.close()
    b, c = asyncio.run(go())
  assert b.contents == "héllo"
  assert c.contents == "whole page" and calls["n"] == 2


def test_fetch_reads_links_after_redirects_and_the_charset_a_meta_declares():
  """Links resolved against the address before a redirect pointed nowhere; a windows-1252
  page that declares its charset only in a <meta> read as U+FFFD."""
  app = web.Application()

  async def go(request):
    raise web.HTTPFound("/docs/guide/intro.html")

  async def intro(request):
    return web.Response(body='<html><body><a href="next.html">next</a></body></html>'.encode(),
                        headers={"Content-Type": "text/html"})

  async def cp1252(request):
    html = '<html><head><meta charset="windows-1252"></head><body><p>Crème brûlée</p>'
    return web.Response(body=html.encode("cp1252"), headers={"Content-Type": "text/html"})
  app.router.add_get("/go", go)
  app.router.add_get("/docs/guide/intro.html", intro)
  app.router.add_get("/fr", cp1252)
  with ServerThread(app) as srv:
    async def read(*urls):
      f = HttpFetcher(WebSection(max_retries=0, fetch_private=True))
      try:
        return [await f.read(u) for u in urls]
      finally:
        await f.close()
    moved, fr = asyncio.run(read(srv.url + "/go", srv.url + "/fr"))
  assert moved.links == (srv.url + "/docs/guide/next.html",)
  assert fr.contents == "Crème brûlée"


def test_plain_fetch_opens_only_public_addresses_unless_allowed():
  """The policy writes the URLs plain fetch opens: loopback (the replay queue, a decode
  server), private networks and the cloud metadata address were all readable to it."""
  hits = []

  async def page(request):
    hits.append(request.path)
    return web.Response(text="internal")
  with _serve_routes(p=page) as srv:
    port = srv.port

    async def read(cfg, url):
      f = HttpFetcher(cfg)
      try:
        return await f.read(url)
      except WebError as e:
        return e, f.attempts
      finally:
        await f.close()
    for url in (f"http://127.0.0.1:{port}/p", f"http://localhost:{port}/p",
                "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/", "http://[::1]/"):
      err, attempts = asyncio.run(read(WebSection(max_retries=3, timeout_s=5), url))
      assert err.kind == "bad_request" and "not a public address" in str(err), url
      assert attempts == 1  # the call's fault: not retried, and an episode it ends is the policy's
    assert hits == []
    ok = asyncio.run(read(WebSection(fetch_private=True), f"http://127.0.0.1:{port}/p"))
    assert ok.contents == "internal" and hits == ["/p"]


@pytest.mark.parametrize("html,title,text", [
    # </head> omitted (legal): the body must not be skipped.
    ("<html><head><title>T</title><meta charset=utf-8><body><p>Body text</p></body></html>",
     "T", "Body text"),
    ("<head><noscript><link></noscript><body>hello", "", "hello"),
    # An SVG <title> is not the page's title, nor text.
    ("<html><head><title>Real</title></head><body><svg><title>icon</title></svg><p>x</p>",
     "Real", "x"),
    # Header cells are cells.
    ("<table><tr><th>A</th><th>B</th></tr><tr><td>1</td><td>2</td></tr></table>", "",
     "| A | B\n\n| 1 | 2"),
])
def test_html_edge_cases(html, title, text):
  got_title, got_text, _ = html_to_text(html, "http://x/")
  assert (got_title, got_text) == (title, text)


def test_searcher_and_reader_share_one_concurrency_limit():
  c = WebSearchClient(SearchClientSection(backend="web"), WebSection(concurrency=3))
  assert c.reader.limiter is c.searcher.limiter and c.searcher.limiter.n == 3


def test_jina_cache_key_includes_reader_url(fake, tmp_path):
  """A page read through one reader service must not be served from the cache for another."""
  _, srv = fake
  cache = DiskCache(str(tmp_path / "c.sqlite"))

  async def go():
    good = JinaReader(section(srv, reader_url=srv.url + "/r"), cache=cache)
    other = JinaReader(section(srv, reader_url="http://127.0.0.1:1", max_retries=0),
                       cache=cache)
    try:
      await good.read("https://ex.com/a")
      with pytest.raises(WebError):
        await other.read("https://ex.com/a")
    finally:
      await good.close()
      await other.close()
  asyncio.run(go())


def test_cache_is_used_off_the_event_loop(fake, tmp_path):
  import threading
  _, srv = fake
  threads = set()

  class Spy(DiskCache):
    def get(self, key):
      threads.add(threading.get_ident())
      return super().get(key)

  async def go():
    s = SerperSearch(section(srv), cache=Spy(str(tmp_path / "c.sqlite")))
    try:
      await s.search("q", 2)
    finally:
      await s.close()
    return threading.get_ident()
  loop_thread = asyncio.run(go())
  assert threads and loop_thread not in threads


def test_web_client_survives_a_new_event_loop(fake):
  _, srv = fake
  c = WebSearchClient(SearchClientSection(backend="web"), section(srv))
  for _ in range(2):
    [r] = asyncio.run(c.search(["kestrel"], 2))
    assert r.ok, r.error
  asyncio.run(c.close())
