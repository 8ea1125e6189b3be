"""The agent-facing client: typed results, chunking, and every failure as a tool-error result."""

import asyncio
import os

import pytest
from aiohttp import web

from asearcher_jax.procs import free_port
from asearcher_jax.tools.client import LocalSearchClient, WebSearchClient, chunks, make_client
from asearcher_jax.tools.config import SearchClientSection
from asearcher_jax.tools.index import SearchIndex, build_index
from asearcher_jax.tools.retrieval_server import ServerThread, create_app
from asearcher_jax.tools.types import Page, SearchHit, ToolResult
from asearcher_jax.world import WorldConfig, generate_world, write_world


@pytest.fixture(scope="module")
def world_server(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("cw") / "w")
  world = generate_world(WorldConfig(seed=11, num_people=60, num_cities=12, num_orgs=12,
                                     num_works=12, num_countries=4, questions_per_hop=20))
  write_world(world, path)
  build_index(os.path.join(path, "corpus.jsonl"), os.path.join(path, "index"),
              pages=os.path.join(path, "pages.jsonl"), log=lambda *_: None)
  with ServerThread(create_app(SearchIndex(os.path.join(path, "index")))) as srv:
    yield world, srv


def run(coro_fn, cfg):
  async def go():
    client = LocalSearchClient(cfg)
    try:
      return await coro_fn(client)
    finally:
      await client.close()
  return asyncio.run(go())


def test_search_and_access_typed(world_server):
  world, srv = world_server
  item = next(q for q in world.qa_train if q["hops"] == 1)
  cfg = SearchClientSection(url=srv.url, topk=3, chunk_chars=200, max_chunks=3)

  async def go(c):
    [r] = await c.search([item["question"]])
    return r, await c.access(r.hits[0].url)
  res, page = run(go, cfg)
  assert res.ok and len(res.hits) == 3 and all(isinstance(h, SearchHit) for h in res.hits)
  assert item["supporting_facts"][0] in [h.id for h in res.hits]
  assert res.hits[0].score >= res.hits[-1].score
  assert not res.hits[0].text.startswith('"')  # the wiki-18 title line is split off
  assert page.ok and page.page.url == res.hits[0].url and page.page.links
  parts = chunks(make_client(cfg), page)
  assert 1 <= len(parts) <= 3 and all(len(p) <= 200 for p in parts)
  assert page.render(chunk=0).startswith(">>>> Page 1 >>>>")


def test_unknown_url_and_empty_inputs_are_tool_errors(world_server):
  _, srv = world_server
  cfg = SearchClientSection(url=srv.url)

  async def go(c):
    return (await c.access("https://world.local/wiki/Nobody"), await c.access(""),
            await c.search(["", "mayor"]))
  missing, empty, (q0, q1) = run(go, cfg)
  assert missing.error.kind == "not_found" and missing.error.status == 404
  assert "Nobody" in missing.render()
  assert empty.error.kind == "bad_request" and q0.error.kind == "bad_request" and q1.ok
  # The calls' own faults: an episode they end is the policy's (`tool_error`).
  assert not any(r.environment_failed for r in (missing, empty, q0))


def test_unreachable_server_is_a_tool_error():
  cfg = SearchClientSection(url=f"http://127.0.0.1:{free_port()}", timeout_s=2)
  res = run(lambda c: c.search(["a", "b"]), cfg)
  assert [r.error.kind for r in res] == ["connection", "connection"]
  assert res[0].render().startswith("Tool error (connection)")
  assert res[0].environment_failed  # an episode it ends is the infrastructure's (`env_error`)


def test_slow_garbage_and_error_servers_are_tool_errors():
  async def slow(request):
    await asyncio.sleep(1.0)
    return web.json_response({"result": [[]]})

  async def garbage(request):
    return web.Response(body=b"\xff not json")

  async def wrong_shape(request):
    return web.json_response({"result": [[{"no": "contents"}]]})

  async def boom(request):
    return web.json_response({"error": "kaput"}, status=500)
  app = web.Application()
  app.router.add_post("/slow/retrieve", slow)
  app.router.add_post("/garbage/retrieve", garbage)
  app.router.add_post("/garbage/access", garbage)
  app.router.add_post("/shape/retrieve", wrong_shape)
  app.router.add_post("/boom/retrieve", boom)
  with ServerThread(app) as srv:
    [r] = run(lambda c: c.search(["q"]), SearchClientSection(url=srv.url + "/slow",
                                                             timeout_s=0.2))
    assert r.error.kind == "timeout"
    [r] = run(lambda c: c.search(["q"]), SearchClientSection(url=srv.url + "/garbage"))
    assert r.error.kind == "bad_response"
    r = run(lambda c: c.access("u"), SearchClientSection(url=srv.url + "/garbage"))
    assert r.error.kind == "bad_response"
    [r] = run(lambda c: c.search(["q"]), SearchClientSection(url=srv.url + "/shape"))
    assert r.error.kind == "bad_response" and "contents" in r.error.message
    [r] = run(lambda c: c.search(["q"]), SearchClientSection(url=srv.url + "/boom"))
    assert r.error.kind == "http" and r.error.status == 500 and "kaput" in r.error.message
    assert r.environment_failed


def test_plain_search_r1_server_reply_is_parsed():
  async def r1(request):  # Search-R1's server: bare {"id", "contents"} docs
    return web.json_response({"result": [[{"document": {"id": "9", "contents":
                                                        '"Apollo 11"\nFirst landing.'},
                                           "score": 3.5}]]})
  app = web.Application()
  app.router.add_post("/retrieve", r1)
  with ServerThread(app) as srv:
    [r] = run(lambda c: c.search(["moon"]), SearchClientSection(url=srv.url))
  assert r.hits == (SearchHit("9", "Apollo 11", '"Apollo 11"\nFirst landing.', "", 3.5),)
  assert r.render() == "Doc 1(Title: Apollo 11) First landing."


def test_page_chunks():
  text = "\n\n".join(f"Paragraph {i} " + "x" * 90 for i in range(30))
  page = Page("u", "t", text)
  parts = page.chunks(chunk_chars=500, max_chunks=100)
  assert "".join(parts) == text and all(len(p) <= 500 for p in parts)
  assert all(p.endswith("\n\n") for p in parts[:-1])  # cut at paragraph breaks
  assert len(page.chunks(500, max_chunks=2)) == 2
  assert Page("u", "t", "").chunks() == []
  unbroken = Page("u", "t", "y" * 1050).chunks(500)
  assert [len(p) for p in unbroken] == [500, 500, 50]
  with pytest.raises(ValueError):
    page.chunks(0)
  r = ToolResult("access", "u", page=page)
  assert r.render(chunk=99, chunk_chars=500) == "No More Information is Found for this URL."
  assert ToolResult("search", "q").render() == "No results found."


def test_make_client_picks_backend():
  assert isinstance(make_client(SearchClientSection()), LocalSearchClient)
  assert isinstance(make_client(SearchClientSection(backend="web")), WebSearchClient)


# ---- regressions ----------------------------------------------------------------------------

def test_client_survives_a_new_event_loop(world_server):
  """The aiohttp session is bound to its loop: a second asyncio.run used to raise 'Event
  loop is closed' out of search()."""
  _, srv = world_server
  c = LocalSearchClient(SearchClientSection(url=srv.url))
  for _ in range(2):
    [r] = asyncio.run(c.search(["capital"]))
    assert r.ok
  asyncio.run(c.close())


def test_unexpected_client_exception_is_a_tool_error(world_server, monkeypatch):
  _, srv = world_server

  async def explode(self, path, body):
    raise RuntimeError("kaboom")
  monkeypatch.setattr(LocalSearchClient, "_post", explode)
  [r] = run(lambda c: c.search(["q"]), SearchClientSection(url=srv.url))
  assert r.error.kind == "bad_response" and "kaboom" in r.error.message
  r = run(lambda c: c.access("u"), SearchClientSection(url=srv.url))
  assert r.error.kind == "bad_response"


def test_page_links_not_a_list_is_a_tool_error():
  async def bad_links(request):
    return web.json_response({"result": [{"url": "u", "title": "t", "contents": "c",
                                          "links": 5}]})
  app = web.Application()
  app.router.add_post("/access", bad_links)
  with ServerThread(app) as srv:
    r = run(lambda c: c.access("u"), SearchClientSection(url=srv.url))
  assert r.error.kind == "bad_response" and "links" in r.error.message


def test_long_query_and_big_batch_do_not_fail_the_batch(world_server):
  """The server rejects a request with one over-long query, or too many queries, whole; the
  client trims queries and splits batches to its limits so every query gets its answer."""
  from asearcher_jax.tools.config import RetrievalSection
  from asearcher_jax.tools.retrieval_server import INDEX_KEY
  _, srv = world_server
  app = create_app(srv.app[INDEX_KEY], RetrievalSection(max_queries=2, max_query_chars=100))
  with ServerThread(app) as small:
    async def go():
      c = LocalSearchClient(SearchClientSection(url=small.url))  # limits from /health
      try:
        return await c.search(["capital of", "mayor " * 50, "born in", "founded", "city"])
      finally:
        await c.close()
    res = asyncio.run(go())
  assert [r.ok for r in res] == [True] * 5
  assert res[1].query == "mayor " * 50  # the result names the query as asked


def test_batches_keep_within_the_servers_hit_and_topk_limits(world_server):
  """The server refuses a request whose queries x topk pass its `max_hits`, or whose topk
  passes `max_topk`, whole; the client published both limits but kept to neither."""
  from asearcher_jax.tools.config import RetrievalSection
  from asearcher_jax.tools.retrieval_server import INDEX_KEY
  _, srv = world_server
  cfg = RetrievalSection(max_hits=40, max_topk=3)
  with ServerThread(create_app(srv.app[INDEX_KEY], cfg)) as small:
    res = run(lambda c: c.search(["mayor"] * 30, topk=5), SearchClientSection(url=small.url))
  assert all(r.ok for r in res) and {len(r.hits) for r in res} == {3}


def test_limits_guessed_while_the_server_was_down_are_asked_again(world_server):
  from asearcher_jax.tools.config import RetrievalSection
  from asearcher_jax.tools.retrieval_server import INDEX_KEY
  _, srv = world_server
  port = free_port()

  async def go():
    c = LocalSearchClient(SearchClientSection(url=f"http://127.0.0.1:{port}", timeout_s=2))
    try:
      [down] = await c.search(["mayor"])
      app = create_app(srv.app[INDEX_KEY], RetrievalSection(max_query_chars=100))
      with ServerThread(app, port=port):
        return down, await c.search(["mayor " * 30, "born in"])
    finally:
      await c.close()
  down, up = asyncio.run(go())
  assert down.error.kind == "connection"
  assert [r.ok for r in up] == [True, True]  # the long query trimmed to the server's 100


def test_empty_token_env_means_no_token(world_server, monkeypatch):
  _, srv = world_server
  monkeypatch.setenv("ASEARCHER_RETRIEVAL_TOKEN", "")
  c = LocalSearchClient(SearchClientSection(url=srv.url))
  assert c.token is None
  asyncio.run(c.close())
