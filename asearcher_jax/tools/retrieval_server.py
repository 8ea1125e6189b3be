"""The retrieval server: Search-R1/ASearcher's JSON API over a local index (aiohttp).

  POST /retrieve {"queries": [...], "topk": k, "return_scores": bool[, "mode": "bm25"]}
       -> {"result": [[{"id", "title", "contents", "url", "score"}, ...], ...]}
          (with return_scores each hit also carries "document": {...}, Search-R1's shape)
  POST /access   {"urls": [...]} -> {"result": [{"url", "title", "contents", "links"} | null],
                                     "missing": [urls with no page]}
  GET  /health   -> {"status": "ok", ..., "limits": {"max_queries", "max_query_chars", ...}}

Existing Search-R1 and ASearcher clients work unchanged: a batch as large as Search-R1's GRPO
recipe sends (every rollout's query in one request, thousands) is searched `max_queries` at a
time, bounded only by the reply's size (`max_hits` = queries x topk); an empty query gets an
empty hit list; an unknown page is a `null` result with 200, as ASearcher's server answers.

Searches run on a thread pool (bm25s and numpy release the GIL in their heavy parts), so many
requests are in flight at once and none holds a global lock; each has a timeout. Every bad
request gets a 4xx with a JSON `{"error": ...}` naming the field at fault, and an unexpected
failure a 500, while the server keeps serving. Bound to loopback by default; any other address
requires a bearer token, so a corpus is never served to the network by accident.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from asearcher_jax.auth import bearer_ok, host_port, require_token
from asearcher_jax.errors import RetrievalError
from asearcher_jax.tools.config import RetrievalSection
from asearcher_jax.tools.index import SearchIndex

log = logging.getLogger(__name__)

INDEX_KEY = web.AppKey("index", SearchIndex)
CFG_KEY = web.AppKey("cfg", RetrievalSection)
POOL_KEY = web.AppKey("pool", ThreadPoolExecutor)


class BadRequest(Exception):
  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def _error(status: int, message: str) -> web.Response:
  return web.json_response({"error": message, "status": status}, status=status)


def _middleware(token: str | None):
  @web.middleware
  async def middleware(request: web.Request, handler):
    try:  # the auth check too: nothing a client sends may turn into an unhandled error
      if request.path != "/health" and not bearer_ok(request.headers.get("Authorization"),
                                                     token):
        return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
      return await handler(request)
    except BadRequest as e:
      return _error(e.status, str(e))
    except web.HTTPRequestEntityTooLarge:
      return _error(413, f"request body too large (limit "
                         f"{request.app[CFG_KEY].max_body_bytes} bytes)")
    except web.HTTPException as e:
      if e.status < 400:
        raise
      return _error(e.status, f"{e.reason}: {request.method} {request.path}")
    except asyncio.TimeoutError:
      return _error(504, "search timed out")
    except Exception as e:
      log.exception("error serving %s", request.path)
      return _error(500, f"internal error: {type(e).__name__}: {e}")
  return middleware


async def _json_body(request: web.Request) -> dict:
  try:
    raw = await request.read()
  except web.HTTPException:
    raise
  except Exception as e:  # noqa: BLE001 -- a body that cannot be read (bad gzip, cut short)
    raise BadRequest(f"body cannot be read ({type(e).__name__}: {e})") from None
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadRequest(f"body is not UTF-8 ({e.reason} at byte {e.start})") from None
  try:
    body = json.loads(text)
  except json.JSONDecodeError as e:
    raise BadRequest(f"body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") \
        from None
  except RecursionError:  # e.g. 100k nested '[': the client's fault, not a server error
    raise BadRequest("body is nested too deeply") from None
  except ValueError as e:  # e.g. an integer of over 4,300 digits
    raise BadRequest(f"body is not valid JSON ({e})") from None
  if not isinstance(body, dict):
    raise BadRequest(f"body must be a JSON object, got {type(body).__name__}")
  return body


def _str_list(body: dict, field: str, limit: int, max_chars: int) -> list[str]:
  """A list of strings; empty strings are allowed (they find nothing)."""
  if field not in body:
    raise BadRequest(f"missing field {field!r}")
  items = body[field]
  if not isinstance(items, list):
    raise BadRequest(f"{field!r} must be a list of strings, got {type(items).__name__}")
  if len(items) > limit:
    raise BadRequest(f"{field!r} has {len(items)} items; the limit is {limit}", 413)
  for i, q in enumerate(items):
    if not isinstance(q, str):
      raise BadRequest(f"{field}[{i}] must be a string, got {type(q).__name__}")
    if len(q) > max_chars:
      raise BadRequest(f"{field}[{i}] has {len(q)} characters; the limit is {max_chars}")
  return items


async def _retrieve(request: web.Request) -> web.Response:
  index, cfg = request.app[INDEX_KEY], request.app[CFG_KEY]
  body = await _json_body(request)
  queries = _str_list(body, "queries", cfg.max_hits, cfg.max_query_chars)
  topk = body.get("topk")
  if topk is None:
    topk = cfg.default_topk
  if isinstance(topk, bool) or not isinstance(topk, int):
    raise BadRequest(f"'topk' must be an integer, got {type(topk).__name__}")
  if not 1 <= topk <= cfg.max_topk:
    raise BadRequest(f"'topk' must be between 1 and {cfg.max_topk}, got {topk}")
  return_scores = body.get("return_scores", False)
  if not isinstance(return_scores, bool):
    raise BadRequest("'return_scores' must be true or false")
  mode = body.get("mode", cfg.mode)
  if not isinstance(mode, str) or mode not in index.modes:
    raise BadRequest(f"'mode' must be one of {index.modes}, got {mode!r}")
  if len(queries) * topk > cfg.max_hits:
    raise BadRequest(f"{len(queries)} queries x topk {topk} ask for more than {cfg.max_hits} "
                     f"hits in one reply: send fewer queries per request", 413)

  def work(chunk: list[str]) -> list[list[dict]]:
    asked = [i for i, q in enumerate(chunk) if q.strip()]
    found = index.search([chunk[i] for i in asked], topk, mode=mode,
                         alpha=cfg.hybrid_alpha) if asked else []
    result: list[list[dict]] = [[] for _ in chunk]  # an empty query finds nothing
    for i, per_query in zip(asked, found):
      for row, score in per_query:
        doc = index.doc(row)
        item = dict(doc, score=score)
        if return_scores:
          item["document"] = doc
        result[i].append(item)
    return result

  # max_queries at a time, each chunk its own pool job: a batch of thousands neither holds a
  # worker for long nor keeps other requests waiting; the timeout is per chunk.
  loop, result = asyncio.get_running_loop(), []
  for start in range(0, len(queries), cfg.max_queries):
    chunk = queries[start:start + cfg.max_queries]
    result += await asyncio.wait_for(
        loop.run_in_executor(request.app[POOL_KEY], work, chunk), cfg.request_timeout_s)
  return web.json_response({"result": result})


async def _access(request: web.Request) -> web.Response:
  index, cfg = request.app[INDEX_KEY], request.app[CFG_KEY]
  body = await _json_body(request)
  urls = _str_list(body, "urls", cfg.max_urls, cfg.max_query_chars)
  if index.pages is None:
    raise BadRequest("this index has no pages (built without --pages)", 404)
  # Decoding large pages is real work: on the pool, so it never stalls the event loop.
  loop = asyncio.get_running_loop()
  pages = await asyncio.wait_for(
      loop.run_in_executor(request.app[POOL_KEY], lambda: [index.page(u) for u in urls]),
      cfg.request_timeout_s)
  missing = [u for u, p in zip(urls, pages) if p is None]
  return web.json_response({"result": pages, "missing": missing})


async def _health(request: web.Request) -> web.Response:
  """Status, plus the per-request limits, so clients can keep within them (the client
  trims and splits rather than have one over-long query fail a whole batch)."""
  index, cfg = request.app[INDEX_KEY], request.app[CFG_KEY]
  return web.json_response({"status": "ok", "num_docs": index.num_docs,
                            "num_pages": index.num_pages, "modes": index.modes,
                            "limits": {"max_queries": cfg.max_queries,
                                       "max_hits": cfg.max_hits,
                                       "max_query_chars": cfg.max_query_chars,
                                       "max_topk": cfg.max_topk}})


def create_app(index: SearchIndex, cfg: RetrievalSection | None = None,
               token: str | None = None) -> web.Application:
  cfg = cfg or RetrievalSection()
  token = token or None  # "" (an empty env var) means no token, as in the client
  if cfg.mode not in index.modes:
    raise RetrievalError(f"retriever mode {cfg.mode!r} is not available in {index.path} "
                         f"(have {', '.join(index.modes)}; build with --dense-encoder)")
  app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[_middleware(token)])
  app[INDEX_KEY], app[CFG_KEY] = index, cfg
  pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="retrieve")
  app[POOL_KEY] = pool

  async def _close(_app):
    pool.shutdown(wait=False, cancel_futures=True)

  app.on_cleanup.append(_close)
  app.router.add_post("/retrieve", _retrieve)
  app.router.add_post("/access", _access)
  app.router.add_get("/health", _health)
  return app


def check_bind(host: str, token: str | None) -> None:
  try:
    require_token(host, token, "an auth token: pass --token (or set the token env var), or "
                  "bind 127.0.0.1")
  except ValueError as e:
    raise RetrievalError(str(e)) from None


def run_server(index_path: str, host: str = "127.0.0.1", port: int = 8010,
               token: str | None = None, cfg: RetrievalSection | None = None,
               dense_encoder: str | None = None) -> None:
  """Load the index (failing fast on a missing or corrupt one) and serve until interrupted.
  `dense_encoder` overrides the encoder directory recorded in the index manifest."""
  check_bind(host, token)
  index = SearchIndex(index_path, dense_encoder=dense_encoder)
  print(f"serving {index.num_docs} passages, {index.num_pages} pages ({', '.join(index.modes)})"
        f" from {index_path} on http://{host_port(host, port)}", flush=True)
  web.run_app(create_app(index, cfg, token), host=host, port=port, print=None)


class ServerThread:
  """A server on its own event loop in a background thread: for tests, benchmarks and
  single-host debug mode. `url` is known once started; port 0 picks a free port."""

  def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0,
               token: str | None = None):
    self.app, self.host, self.port, self.token = app, host, port, token
    self.loop = asyncio.new_event_loop()
    self._ready = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._error: BaseException | None = None

  def _run(self):
    asyncio.set_event_loop(self.loop)
    try:
      self.runner = web.AppRunner(self.app, access_log=None)
      self.loop.run_until_complete(self.runner.setup())
      site = web.TCPSite(self.runner, self.host, self.port)
      self.loop.run_until_complete(site.start())
      self.port = site._server.sockets[0].getsockname()[1]
    except BaseException as e:  # noqa: BLE001
      self._error = e
      self._ready.set()
      return
    self._ready.set()
    self.loop.run_forever()

  @property
  def url(self) -> str:
    return f"http://{host_port(self.host, self.port)}"

  def start(self, timeout_s: float = 30.0, token: str | None = None) -> ServerThread:
    """Start serving; raises if the bind needs a token it lacks, if the server fails to
    start, or if it is not up within `timeout_s` (rather than hand out a dead URL)."""
    check_bind(self.host, token if token is not None else self.token)
    self._thread.start()
    if not self._ready.wait(timeout_s):
      raise RetrievalError(f"server on {self.host}:{self.port} not ready within {timeout_s}s")
    if self._error is not None:
      raise self._error
    return self

  def stop(self) -> None:
    if not self._thread.is_alive() or not hasattr(self, "runner"):
      return
    fut = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
    fut.result(30)
    self.loop.call_soon_threadsafe(self.loop.stop)
    self._thread.join(30)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


def serve_index(index_dir: str, cfg: RetrievalSection | None = None) -> ServerThread:
  """The index at `index_dir` served from this process on a free loopback port, started;
  `stop()` it when done."""
  return ServerThread(create_app(SearchIndex(index_dir), cfg)).start()
