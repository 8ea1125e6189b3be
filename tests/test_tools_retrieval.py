"""Retrieval server: the Search-R1/ASearcher API contract, quality on the world, bad input,
concurrency, auth, and start-up failures on missing or corrupt indexes."""

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import aiohttp
import numpy as np
import pytest

from asearcher_jax.commands import world as world_commands
from asearcher_jax.commands.search import register, serve_section
from asearcher_jax.errors import RetrievalError
from asearcher_jax.tools.config import RetrievalSection
from asearcher_jax.tools.corpus import read_corpus, read_pages
from asearcher_jax.tools.index import SearchIndex, build_index
from asearcher_jax.tools.retrieval_server import ServerThread, check_bind, create_app, run_server
from asearcher_jax.world import WorldConfig, generate_world, write_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("world") / "w")
  world = generate_world(WorldConfig(seed=3, questions_per_hop=200))
  write_world(world, path)
  build_index(os.path.join(path, "corpus.jsonl"), os.path.join(path, "index"),
              pages=os.path.join(path, "pages.jsonl"), log=lambda *_: None)
  return path


@pytest.fixture(scope="module")
def index(world_dir):
  return SearchIndex(os.path.join(world_dir, "index"))


@pytest.fixture(scope="module")
def server(index):
  cfg = RetrievalSection(max_queries=64, max_topk=50, max_query_chars=1000, max_urls=8,
                         max_body_bytes=256 * 1024, max_hits=32768)
  with ServerThread(create_app(index, cfg)) as srv:
    yield srv


def post(url, body, headers=None, raw: bytes | None = None):
  data = raw if raw is not None else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, method="POST",
                               headers={"Content-Type": "application/json", **(headers or {})})
  try:
    with urllib.request.urlopen(req, timeout=30) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def qa(world_dir, split="qa_test"):
  with open(os.path.join(world_dir, f"{split}.jsonl")) as f:
    return [json.loads(line) for line in f]


# ---- contract -------------------------------------------------------------------------------

def search_r1_client(search_url, query_list, topk):
  """Search-R1's `_batch_search` + `_passages2string`, verbatim in behaviour."""
  payload = {"queries": query_list, "topk": topk, "return_scores": True}
  results = post(search_url, payload)[1]["result"]
  out = []
  for retrieval_result in results:
    format_reference = ""
    for idx, doc_item in enumerate(retrieval_result):
      content = doc_item["document"]["contents"]
      title = content.split("\n")[0]
      text = "\n".join(content.split("\n")[1:])
      format_reference += f"Doc {idx + 1}(Title: {title}) {text}\n"
    out.append(format_reference)
  return out


def test_search_r1_client_works_unchanged(server, world_dir):
  item = next(q for q in qa(world_dir) if q["hops"] == 1)
  refs = search_r1_client(server.url + "/retrieve", [item["question"], "capital"], 3)
  assert len(refs) == 2
  assert refs[0].startswith("Doc 1(Title: \"") and "Doc 3(" in refs[0]
  start = generate_world(WorldConfig(seed=3, questions_per_hop=200)).entities[item["start"]]
  assert start.name in refs[0]


def test_retrieve_shape_and_scores(server, index):
  status, body = post(server.url + "/retrieve", {"queries": ["mayor of", "founded by"],
                                                  "topk": 4})
  assert status == 200 and len(body["result"]) == 2
  for hits in body["result"]:
    assert len(hits) == 4
    for h in hits:
      assert set(h) == {"id", "title", "contents", "url", "score"}
      assert h["url"].startswith("https://world.local/wiki/")
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
  # return_scores adds Search-R1's {"document", "score"} view of the same hit.
  _, body2 = post(server.url + "/retrieve", {"queries": ["mayor of"], "topk": 4,
                                             "return_scores": True})
  h = body2["result"][0][0]
  assert h["document"]["id"] == h["id"] == body["result"][0][0]["id"]
  # topk omitted -> the server's default.
  _, body3 = post(server.url + "/retrieve", {"queries": ["mayor of"]})
  assert len(body3["result"][0]) == RetrievalSection().default_topk


def test_query_with_no_known_terms_returns_nothing(server):
  status, body = post(server.url + "/retrieve", {"queries": ["zzzqqq xxyyzz"], "topk": 3})
  assert status == 200 and body["result"] == [[]]


def test_access_and_health(server, world_dir):
  pages = list(read_pages(os.path.join(world_dir, "pages.jsonl")))
  status, body = post(server.url + "/access", {"urls": [pages[5]["url"], "https://x/none"]})
  assert status == 200
  assert body["result"][0] == pages[5] and body["result"][1] is None
  assert body["missing"] == ["https://x/none"]
  # ASearcher's client calls raise_for_status and reads result[0]: an unknown page is a null
  # result with 200 (its own server's answer), never a 404 it would retry ten times.
  status, body = post(server.url + "/access", {"urls": ["https://x/none"]})
  assert status == 200 and body["result"] == [None] and body["missing"] == ["https://x/none"]
  status, body = post(server.url + "/access", {"urls": [""]})
  assert status == 200 and body["result"] == [None]
  with urllib.request.urlopen(server.url + "/health") as r:
    health = json.loads(r.read())
  assert health["status"] == "ok" and health["num_pages"] == len(pages)


def test_gold_passage_in_top5_for_one_hop_questions(index, world_dir):
  items = [q for q in qa(world_dir) + qa(world_dir, "qa_train") if q["hops"] == 1][:300]
  results = index.search([q["question"] for q in items], 5)
  found = [q["supporting_facts"][0] in {index.doc(r)["id"] for r, _ in res}
           for q, res in zip(items, results)]
  assert np.mean(found) >= 0.9, np.mean(found)


def test_many_concurrent_requests(server, index, world_dir):
  questions = [q["question"] for q in qa(world_dir)][:40]
  expected = {q: [index.doc(r)["id"] for r, _ in hits]
              for q, hits in zip(questions, index.search(questions, 7))}

  async def go():
    async with aiohttp.ClientSession() as s:
      async def one(i):
        body = {"queries": questions[i:i + 1 + i % 5], "topk": 1 + i % 7}
        async with s.post(server.url + "/retrieve", json=body) as r:
          return r.status, await r.json(), body
      return await asyncio.gather(*(one(i) for i in range(32)))

  for status, body, req in asyncio.run(go()):
    assert status == 200 and len(body["result"]) == len(req["queries"])
    for q, hits in zip(req["queries"], body["result"]):
      assert [h["id"] for h in hits] == expected[q][:req["topk"]]


def test_search_timeout_is_504_and_server_survives(index, world_dir):
  questions = [q["question"] for q in qa(world_dir)][:64]
  with ServerThread(create_app(index, RetrievalSection(request_timeout_s=1e-6))) as srv:
    status, body = post(srv.url + "/retrieve", {"queries": questions, "topk": 50})
    assert status == 504 and "timed out" in body["error"]
    with urllib.request.urlopen(srv.url + "/health") as r:
      assert r.status == 200


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe\x00garbage", 400, "not UTF-8"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"topk": 3}', 400, "missing field 'queries'"),
    (b'{"queries": "who"}', 400, "list of strings"),
    (b'{"queries": ["a", 3]}', 400, "queries[1] must be a string"),
    (b'{"queries": ["a"], "topk": 0}', 400, "between 1 and 50"),
    (b'{"queries": ["a"], "topk": -2}', 400, "between 1 and 50"),
    (b'{"queries": ["a"], "topk": 51}', 400, "between 1 and 50"),
    (b'{"queries": ["a"], "topk": "5"}', 400, "'topk' must be an integer"),
    (b'{"queries": ["a"], "topk": true}', 400, "'topk' must be an integer"),
    (b'{"queries": ["a"], "return_scores": "yes"}', 400, "return_scores"),
    (b'{"queries": ["a"], "mode": "dense"}', 400, "'mode' must be one of"),
    (b'{"queries": ["a"], "topk": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
])
def test_bad_retrieve_requests(server, raw, status, needle):
  got, body = post(server.url + "/retrieve", None, raw=raw)
  assert got == status and needle in body["error"], body


def test_enormous_requests(server):
  got, body = post(server.url + "/retrieve", {"queries": ["x" * 1001]})
  assert got == 400 and "1001 characters" in body["error"]
  got, body = post(server.url + "/retrieve", {"queries": ["word " * 60000]})
  assert got == 413 and "too large" in body["error"]
  got, body = post(server.url + "/retrieve", {"queries": ["a"] * 1000, "topk": 50})
  assert got == 413 and "more than 32768 hits" in body["error"]
  got, body = post(server.url + "/access", {"urls": ["u"] * 9})
  assert got == 413 and "limit is 8" in body["error"]


def test_search_r1_grpo_batch_and_empty_queries(server, world_dir):
  """Search-R1's GRPO recipe sends every rollout's query in one /retrieve (512 prompts x 5 =
  2,560), some of them empty (a `<search></search>` turn); its server answers 200 to all. Ours
  searches the batch 64 (max_queries) at a time and gives an empty query no hits; every query
  gets what it gets alone, in order."""
  questions = [q["question"] for q in qa(world_dir)]
  queries = [("" if i % 97 == 0 else "  " if i % 101 == 0 else questions[i % len(questions)])
             for i in range(2560)]
  for return_scores in (True, False):
    status, body = post(server.url + "/retrieve",
                        {"queries": queries, "topk": 3, "return_scores": return_scores})
    assert status == 200 and len(body["result"]) == 2560
    for i in (0, 1, 2, 63, 64, 65, 101, 1000, 2559):
      if not queries[i].strip():
        assert body["result"][i] == []
        continue
      _, alone = post(server.url + "/retrieve", {"queries": [queries[i]], "topk": 3,
                                                  "return_scores": return_scores})
      assert body["result"][i] == alone["result"][0] and len(alone["result"][0]) == 3
      assert ("document" in alone["result"][0][0]) == return_scores
  refs = search_r1_client(server.url + "/retrieve", queries[:130], 3)
  assert refs[0] == "" and refs[1].startswith("Doc 1(Title: ") and len(refs) == 130
  status, body = post(server.url + "/retrieve", {"queries": []})
  assert status == 200 and body["result"] == []
  status, body = post(server.url + "/retrieve", {"queries": ["", " "]})  # no query to search
  assert status == 200 and body["result"] == [[], []]


def test_a_body_that_cannot_be_read_is_400(server):
  got, body = post(server.url + "/retrieve", None, raw=b"\x1f\x8bnot gzip",
                   headers={"Content-Encoding": "gzip"})
  assert got == 400 and "cannot be read" in body["error"]


def test_unknown_route_and_method(server):
  got, body = post(server.url + "/nope", {})
  assert got == 404 and "error" in body
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(server.url + "/retrieve")
  assert e.value.code == 405 and "error" in json.loads(e.value.read())


def test_fuzz_bad_requests_server_keeps_serving(server):
  rng = random.Random(0)
  values = [None, 0, -1, 10**9, 3.5, "", "x", [], [""], ["ok"], [1], {}, {"a": 1}, True,
            "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "\ud800",
            ["\ud800"], ["ok"] * 70, float("nan"), float("inf"), "dense", "bm25", ["x" * 1001]]
  for _ in range(1000):
    path = rng.choice(["/retrieve", "/access"])
    if rng.random() < 0.2:
      raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    else:
      body = {k: rng.choice(values) for k in rng.sample(
          ["queries", "topk", "return_scores", "urls", "mode", "junk"], rng.randrange(0, 5))}
      raw = json.dumps(body, allow_nan=True).encode()
    status, reply = post(server.url + path, None, raw=raw)
    assert status in (200, 400, 404, 413), (status, raw)
    assert ("error" in reply) == (status != 200)
  status, body = post(server.url + "/retrieve", {"queries": ["mayor"], "topk": 2})
  assert status == 200 and len(body["result"][0]) == 2


# ---- auth, start-up failures ----------------------------------------------------------------

def test_token_required_when_set(index):
  with ServerThread(create_app(index, token="s3cret")) as srv:
    status, body = post(srv.url + "/retrieve", {"queries": ["mayor"]})
    assert status == 401 and "bearer token" in body["error"]
    status, _ = post(srv.url + "/retrieve", {"queries": ["mayor"]},
                     headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, body = post(srv.url + "/retrieve", {"queries": ["mayor"]},
                        headers={"Authorization": "Bearer s3cret"})
    assert status == 200
    with urllib.request.urlopen(srv.url + "/health") as r:
      assert r.status == 200


def test_non_loopback_bind_needs_token(world_dir):
  with pytest.raises(RetrievalError, match="not loopback.*requires an auth token"):
    check_bind("0.0.0.0", None)
  with pytest.raises(RetrievalError, match="not loopback.*requires an auth token"):
    run_server(os.path.join(world_dir, "index"), host="0.0.0.0", port=0)
  with pytest.raises(RetrievalError, match="mode 'hybrid' is not available"):
    create_app(SearchIndex(os.path.join(world_dir, "index")), RetrievalSection(mode="hybrid"))
  check_bind("0.0.0.0", "tok")
  check_bind("127.0.0.1", None)
  check_bind("::1", None)


def test_missing_and_corrupt_index_stop_startup(world_dir, tmp_path):
  with pytest.raises(RetrievalError, match="does not exist"):
    SearchIndex(str(tmp_path / "nothing"))
  src = os.path.join(world_dir, "index")
  bad = str(tmp_path / "idx")
  shutil.copytree(src, bad)
  os.remove(os.path.join(bad, "manifest.json"))
  with pytest.raises(RetrievalError, match="not a finished index"):
    SearchIndex(bad)
  shutil.copy(os.path.join(src, "manifest.json"), bad)
  with open(os.path.join(bad, "docs.jsonl"), "ab") as f:
    f.write(b"trailing junk")
  with pytest.raises(RetrievalError, match="docs.jsonl: size"):
    SearchIndex(bad)
  shutil.copy(os.path.join(src, "docs.jsonl"), bad)
  with open(os.path.join(bad, "bm25", "data.csc.index.npy"), "wb") as f:
    f.write(b"\x93NUMPY garbage")
  with pytest.raises(RetrievalError, match="bm25 is corrupt"):
    SearchIndex(bad)
  shutil.rmtree(os.path.join(bad, "bm25"))
  with pytest.raises(RetrievalError, match="missing data.csc.index.npy"):
    SearchIndex(bad)
  with open(os.path.join(bad, "manifest.json"), "w") as f:
    f.write("{")
  with pytest.raises(RetrievalError, match="manifest.json is corrupt"):
    SearchIndex(bad)


@pytest.mark.parametrize("line, needle", [
    (b'{"id": "a", "contents": "x"}\n{"id": "a", "contents": "y"}', ":2: duplicate id 'a'"),
    (b'{"id": "a"}', ":1: missing field 'contents'"),
    (b'{"id": "a", "contents": 5.5}', "field 'contents' must be a string"),
    (b'not json', ":1: invalid JSON"),
    (b'{"id": "a", "contents": "\xff"}', ":1: not UTF-8"),
    (b'["a"]', "expected a JSON object"),
])
def test_corpus_validation_names_line_and_field(tmp_path, line, needle):
  p = tmp_path / "corpus.jsonl"
  p.write_bytes(line)
  with pytest.raises(RetrievalError, match=needle.replace("(", r"\(")):
    list(read_corpus(str(p)))


def test_corpus_title_from_wiki18_contents(tmp_path):
  p = tmp_path / "c.jsonl"
  p.write_text(json.dumps({"id": 7, "contents": '"Apollo 11"\nThe first crewed landing.'}))
  [row] = list(read_corpus(str(p)))
  assert row == {"id": "7", "title": "Apollo 11", "url": "",
                 "contents": '"Apollo 11"\nThe first crewed landing.'}


@pytest.mark.parametrize("title,contents,indexed", [
    ("Apollo 11", '"Apollo 11"\nThe landing.', '"Apollo 11"\nThe landing.'),
    ("Paris", "Paris is a city.", "Paris is a city."),
    ("Apple", "Apples are a fruit.", "Apple\nApples are a fruit."),  # "Apple" is not "Apples"
    ("Paris", "Parisian cuisine.", "Paris\nParisian cuisine."),
    ("", "No title here.", "No title here."),
])
def test_a_passage_is_indexed_with_its_whole_title(title, contents, indexed):
  from asearcher_jax.tools.index import passage_text
  assert passage_text({"title": title, "contents": contents}) == indexed


def test_cli_index_build_and_world_build(tmp_path):
  p = argparse.ArgumentParser()
  sub = p.add_subparsers(dest="cmd", required=True)
  register(sub)
  world_commands.register(sub)
  out = str(tmp_path / "w")
  args = p.parse_args(["world", "build", "--out", out, "--seed", "5", "--max-hops", "2",
                       "--questions-per-hop", "20", "--num-people", "40", "--num-cities", "10",
                       "--num-orgs", "10", "--num-works", "10", "--num-countries", "3"])
  assert args.fn(args) == 0
  from asearcher_jax.errors import ConfigError
  a_file = p.parse_args(["world", "build", "--out", os.path.join(out, "corpus.jsonl")])
  with pytest.raises(ConfigError, match="is a file, not a directory"):
    a_file.fn(a_file)
  idx = str(tmp_path / "idx")
  args = p.parse_args(["index", "build", "--corpus", os.path.join(out, "corpus.jsonl"),
                       "--pages", os.path.join(out, "pages.jsonl"), "--out", idx])
  assert args.fn(args) == 0
  with pytest.raises(RetrievalError, match="already holds an index"):
    args.fn(args)
  loaded = SearchIndex(idx)
  with open(os.path.join(out, "corpus.jsonl")) as f:
    assert loaded.num_docs == sum(1 for _ in f)
  args = p.parse_args(["retrieval", "serve", "--index", idx, "--port", "1"])
  cfg = serve_section(args)
  assert args.fn is not None and cfg.host == "127.0.0.1" and cfg.port == 1 and cfg.index == idx


def test_retrieval_serve_honours_config_file_and_flags(tmp_path):
  """`retrieval serve --config FILE [overrides]` takes the YAML `retrieval` section; flags
  given on the command line win; bad values are a one-line ConfigError."""
  from asearcher_jax.errors import ConfigError
  p = argparse.ArgumentParser()
  register(p.add_subparsers(dest="cmd", required=True))
  yml = tmp_path / "c.yaml"
  base = os.path.join(os.path.dirname(__file__), "..", "configs", "debug.yaml")
  with open(base) as f:
    yml.write_text(f.read() + "\nretrieval:\n  port: 8123\n  workers: 7\n  max_topk: 9\n"
                   "  index: /x\n")
  cfg = serve_section(p.parse_args(["retrieval", "serve", "--config", str(yml),
                                    "retrieval.max_queries=3", "--workers", "2"]))
  assert (cfg.port, cfg.workers, cfg.max_topk, cfg.max_queries, cfg.index) == (8123, 2, 9, 3, "/x")
  with pytest.raises(ConfigError, match="workers"):
    serve_section(p.parse_args(["retrieval", "serve", "--workers", "0"]))


def test_default_world_index_built_once(tmp_path, monkeypatch):
  from asearcher_jax.world.io import default_world_index
  monkeypatch.setenv("ASEARCHER_CACHE", str(tmp_path))
  path = default_world_index()
  assert path.startswith(str(tmp_path))
  stamp = os.path.getmtime(os.path.join(path, "manifest.json"))
  assert default_world_index() == path
  assert os.path.getmtime(os.path.join(path, "manifest.json")) == stamp
  assert SearchIndex(path).num_pages > 0


def _serve_cmd(index_dir, port):
  return [sys.executable, "-m", "asearcher_jax.cli", "retrieval", "serve", "--index",
          index_dir, "--port", str(port)]


def test_serve_process_starts_and_fails_clearly(world_dir, tmp_path):
  import socket
  import time
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  bad = str(tmp_path / "bad")
  shutil.copytree(os.path.join(world_dir, "index"), bad)
  os.remove(os.path.join(bad, "docs.offsets.npy"))
  out = subprocess.run(_serve_cmd(bad, 1), capture_output=True, text=True, env=env, timeout=120,
                       check=False)
  assert out.returncode != 0 and "docs.offsets.npy: file not found" in out.stdout + out.stderr
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen(_serve_cmd(os.path.join(world_dir, "index"), port), env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while True:
      try:
        status, body = post(f"http://127.0.0.1:{port}/retrieve", {"queries": ["mayor"],
                                                                  "topk": 2})
        break
      except OSError:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    assert status == 200 and len(body["result"][0]) == 2
  finally:
    proc.terminate()
    proc.wait(30)


# ---- regressions ----------------------------------------------------------------------------

class _FakeDense:
  """Dense hits on rows 1000.. with descending scores, for any query."""

  def __init__(self, n):
    self.vectors = np.zeros((n, 4))

  def search(self, qs, k):
    return (np.tile(np.arange(1000, 1000 + k), (len(qs), 1)),
            np.tile(np.linspace(0.9, 0.5, k), (len(qs), 1)))


def test_hybrid_ignores_bm25_rows_that_matched_nothing(world_dir):
  """With no BM25 match every BM25 score is 0: the zero span used to give all of them full
  weight, so arbitrary rows outranked the real dense hits."""
  with SearchIndex(os.path.join(world_dir, "index")) as idx:
    idx.dense = _FakeDense(idx.num_docs)
    [hits] = idx.search(["zzzqqq"], 3, mode="hybrid", alpha=0.5)
    assert [r for r, _ in hits] == [1000, 1001, 1002]


def test_malformed_manifest_is_a_clear_error(world_dir, tmp_path):
  bad = str(tmp_path / "idx")
  shutil.copytree(os.path.join(world_dir, "index"), bad)
  mpath = os.path.join(bad, "manifest.json")
  with open(mpath) as f:
    m = json.load(f)
  with open(mpath, "w") as f:
    json.dump([m], f)
  with pytest.raises(RetrievalError, match="expected a JSON object"):
    SearchIndex(bad)
  with open(mpath, "w") as f:
    json.dump(dict(m, retrievers=["bm25", "dense"]), f)
  with pytest.raises(RetrievalError, match="no 'dense' section"):
    SearchIndex(bad)


def test_index_close_releases_maps_and_build_failure_does_not_leak(world_dir, tmp_path,
                                                                   monkeypatch):
  from asearcher_jax.tools import index as index_mod
  with SearchIndex(os.path.join(world_dir, "index")) as idx:
    mm = idx.docs._mm
  assert mm.closed and idx.docs is None and idx.bm25 is None
  closed = []

  class Store(index_mod.RowStore):
    def close(self):
      closed.append(True)
      super().close()

  def fail(*a, **k):
    raise RuntimeError("disk full")
  monkeypatch.setattr(index_mod, "RowStore", Store)
  monkeypatch.setattr(index_mod.BM25Index, "build", fail)
  with pytest.raises(RuntimeError, match="disk full"):
    build_index(os.path.join(world_dir, "corpus.jsonl"), str(tmp_path / "i"), log=lambda *_: 0)
  assert closed == [True]


def test_an_index_rebuilt_in_place_leaves_a_live_server_its_old_files(tmp_path):
  """`index build --overwrite` into the directory a server serves rewrote its memory-mapped
  files in place: the server died of SIGBUS (or read zeros as a 500). Each part now moves in
  by a rename; the old maps keep their files. A lone surrogate in the corpus (valid JSON)
  is kept, escaped, where it crashed the build."""
  corpus, out = tmp_path / "corpus.jsonl", str(tmp_path / "index")
  corpus.write_text("".join(json.dumps({"id": f"d{i}", "contents": f"old passage {i} " * 40})
                            + "\n" for i in range(300)))
  build_index(str(corpus), out, log=lambda *_: 0)
  corpus.write_text(json.dumps({"id": "n0", "contents": "new \ud83d passage"}) + "\n")
  script = textwrap.dedent(f"""
      from asearcher_jax.tools.index import SearchIndex, build_index
      idx = SearchIndex({out!r})
      build_index({str(corpus)!r}, {out!r}, overwrite=True, log=lambda *_: 0)
      print(idx.doc(299)["id"], SearchIndex({out!r}).doc(0)["contents"].encode("unicode_escape"))
  """)
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                     timeout=300, cwd=REPO)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split(maxsplit=1) == ["d299", r"b'new \\ud83d passage'" + "\n"]
  assert sorted(os.listdir(out)) == ["bm25", "docs.jsonl", "docs.offsets.npy", "manifest.json"]


def test_a_build_keeps_another_running_builds_staging(tmp_path):
  """Two processes building one index on a fresh cache (retrieval serve and eval --serve)
  each removed the other's staging folder."""
  corpus, out = tmp_path / "corpus.jsonl", tmp_path / "index"
  corpus.write_text(json.dumps({"id": "d0", "contents": "one passage"}) + "\n")
  live, dead = out / f".build-{os.getppid()}-abc", out / ".build-999999999-abc"
  live.mkdir(parents=True)
  dead.mkdir()
  build_index(str(corpus), str(out), log=lambda *_: 0)
  assert live.exists() and not dead.exists()


def test_server_thread_start_fails_loudly(index):
  import time

  async def slow_start(_app):
    await asyncio.sleep(1.0)
  app = create_app(index)
  app.on_startup.append(slow_start)
  t = time.time()
  with pytest.raises(RetrievalError, match="not ready"):
    ServerThread(app).start(timeout_s=0.2)
  assert time.time() - t < 1.0
  with pytest.raises(RetrievalError, match="not loopback"):
    ServerThread(create_app(index), host="0.0.0.0").start()


def _raw_post(srv, path, body: bytes, auth: bytes | None = None) -> tuple[int, dict]:
  import socket
  s = socket.create_connection(("127.0.0.1", srv.port))
  head = (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          + (b"Authorization: " + auth + b"\r\n" if auth is not None else b"")
          + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
  s.sendall(head + body)
  data = b""
  while chunk := s.recv(65536):
    data += chunk
  s.close()
  status = int(data.split(b" ", 2)[1])
  return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def test_non_utf8_auth_header_is_401_and_empty_token_is_none(index):
  from asearcher_jax.auth import bearer_ok
  assert bearer_ok("Bearer \udcff\udcfe", "secret") is False
  assert bearer_ok(None, "") is True
  with ServerThread(create_app(index, token="secret")) as srv:
    body = b'{"queries": ["capital"]}'
    assert _raw_post(srv, "/retrieve", body, b"Bearer \xff\xfe")[0] == 401
    assert _raw_post(srv, "/retrieve", body, "Bearer sécret".encode())[0] == 401
    assert _raw_post(srv, "/retrieve", body, b"Bearer secret")[0] == 200
  with ServerThread(create_app(index, token="")) as srv:  # "" from an env var: no token
    assert _raw_post(srv, "/retrieve", body)[0] == 200


def test_deeply_nested_json_is_400(server):
  status, body = post(server.url + "/retrieve", None, raw=b"[" * 20000 + b"]" * 20000)
  assert status == 400 and "nested" in body["error"]


def test_access_decodes_on_the_pool(index, world_dir):
  import threading
  names = []
  real = index.page

  def page(url):
    names.append(threading.current_thread().name)
    return real(url)
  with open(os.path.join(world_dir, "pages.jsonl")) as f:
    url = json.loads(f.readline())["url"]
  with ServerThread(create_app(index)) as srv:
    index.page = page
    try:
      status, _ = post(srv.url + "/access", {"urls": [url]})
    finally:
      del index.page
  assert status == 200 and names and all(n.startswith("retrieve") for n in names)
