#!/usr/bin/env python
"""Retrieval server throughput and footprint on a 100k-passage corpus, against rank-bm25.

  python benchmarks/retrieval.py [--passages 100000] [--requests-b1 400] [--requests-b64 20]
                                 [--rank-bm25-queries 64] [--workdir DIR]

The corpus and queries come from the synthetic world scaled up (1-hop questions as
queries, so recall@5 of the gold passage is a sanity check that both sides search the same
thing). The retrieval server runs as its own process (`asearcher retrieval serve`) so its
resident memory is its own; the client sends `/retrieve` requests of batch 1 (one request
in flight) and batch 64 over HTTP. rank-bm25 (`BM25Okapi`, its own process, same tokens) has no
batch API, so its batch-64 figure is 64 sequential `get_scores` calls. Reports index build
time, index size on disk, server RSS after load and after the run, and writes JSON (device,
versions, date) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import psutil

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from asearcher_jax.tools.bm25_index import tokenize
from asearcher_jax.tools.index import SearchIndex
from asearcher_jax.world import WorldConfig, generate_world
from benchmarks.common import run_info, write_result  # noqa: E402


def rss_mb(pid: int | None = None) -> float:
  return psutil.Process(pid or os.getpid()).memory_info().rss / 2**20


def dir_mb(path: str) -> float:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
  req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=120) as r:
    return json.loads(r.read())


def make_corpus(n: int, workdir: str) -> tuple[str, list[dict], list[str]]:
  scale = n / 98_000
  # every country needs a city for its capital, so a small corpus keeps 200 cities
  cfg = WorldConfig(seed=0, num_people=int(20_000 * scale) + 500,
                    num_cities=max(int(4000 * scale), 200), num_countries=200,
                    num_orgs=int(4000 * scale), num_works=int(8000 * scale),
                    min_hops=1, max_hops=1, questions_per_hop=2000, filler_sentences=0)
  world = generate_world(cfg)
  rows = world.passages[:n]
  if len(rows) < n:
    raise SystemExit(f"world gave {len(rows)} passages < {n}")
  kept = {r["id"] for r in rows}
  qa = [q for q in world.qa_train + world.qa_test if q["supporting_facts"][0] in kept]
  path = os.path.join(workdir, "corpus.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path, qa, [r["contents"] for r in rows]


def rank_bm25_child(corpus: str, qfile: str) -> None:
  """rank-bm25 alone in this process: build, query, print one JSON line."""
  from rank_bm25 import BM25Okapi
  with open(corpus) as f:
    rows = [json.loads(line) for line in f]
  with open(qfile) as f:
    q = json.load(f)
  texts, ids = [r["contents"] for r in rows], [r["id"] for r in rows]
  del rows
  gc.collect()
  before = rss_mb()
  t = time.time()
  bm = BM25Okapi(tokenize(texts))
  build_s = time.time() - t
  after = rss_mb()
  t = time.time()
  found = 0
  for toks, g in zip(tokenize(q["queries"]), q["gold"]):
    top = np.argsort(-bm.get_scores(toks))[:q["topk"]]
    found += g in {ids[i] for i in top}
  qps = len(q["queries"]) / (time.time() - t)
  print(json.dumps({"build_s": build_s, "rss_mb_before": before, "rss_mb_after": after,
                    "qps": qps, "recall": found / len(q["queries"])}))


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["--rank-bm25-child"]:
    rank_bm25_child(argv[1], argv[2])
    return 0
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--passages", type=int, default=100_000)
  p.add_argument("--requests-b1", type=int, default=400)
  p.add_argument("--requests-b64", type=int, default=20)
  p.add_argument("--rank-bm25-queries", type=int, default=64)
  p.add_argument("--topk", type=int, default=5)
  p.add_argument("--workdir")
  p.add_argument("--results", help="JSON output (default: "
                 "benchmarks/results/retrieval_cpu_<passages/1000>k.json)")
  args = p.parse_args(argv)
  work = args.workdir or tempfile.mkdtemp(prefix="bench_retrieval_")
  os.makedirs(work, exist_ok=True)

  t = time.time()
  corpus, qa, texts = make_corpus(args.passages, work)
  print(f"corpus: {len(texts)} passages, {len(qa)} 1-hop questions "
        f"({time.time() - t:.1f}s to generate)")
  queries = [q["question"] for q in qa]
  gold = [q["supporting_facts"][0] for q in qa]

  # ---- bm25s index build (in a child process so its peak RSS is its own) --------------------
  index_dir = os.path.join(work, "index")
  root = os.path.join(os.path.dirname(__file__), "..")
  code = (f"import sys,time,resource; sys.path.insert(0, {root!r}); "
          "from asearcher_jax.tools.index import build_index; t=time.time(); "
          f"build_index({corpus!r}, {index_dir!r}, overwrite=True, log=lambda *a: None); "
          "print(time.time()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  build_s, build_peak_mb = map(float, out.stdout.split()[-2:])
  print(f"bm25s index: built in {build_s:.1f}s, peak RSS {build_peak_mb:.0f} MB, "
        f"{dir_mb(index_dir):.0f} MB on disk")

  # ---- the server, as its own process -------------------------------------------------------
  port = free_port()
  env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), ".."),
             JAX_PLATFORMS="cpu")
  t = time.time()
  with open(os.path.join(work, "server.log"), "w") as server_log:
    srv = subprocess.Popen([sys.executable, "-m", "asearcher_jax.cli", "retrieval",
                            "serve", "--index", index_dir, "--port", str(port), "--workers",
                            "2"], env=env, stdout=server_log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    while True:
      try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
          json.loads(r.read())
        break
      except OSError:
        if srv.poll() is not None:
          raise SystemExit(f"server died: see {os.path.join(work, 'server.log')}")
        time.sleep(0.1)
    startup_s = time.time() - t
    rss_loaded = rss_mb(srv.pid)
    post(url + "/retrieve", {"queries": queries[:64], "topk": args.topk})  # warm up
    n1 = min(args.requests_b1, len(queries))
    t = time.time()
    for q in queries[:n1]:
      post(url + "/retrieve", {"queries": [q], "topk": args.topk})
    qps_b1 = n1 / (time.time() - t)
    t = time.time()
    found, n64 = 0, 0
    for i in range(args.requests_b64):
      batch = [queries[(i * 64 + j) % len(queries)] for j in range(64)]
      res = post(url + "/retrieve", {"queries": batch, "topk": args.topk})["result"]
      n64 += len(batch)
      found += sum(gold[(i * 64 + j) % len(queries)] in {h["id"] for h in hits}
                   for j, hits in enumerate(res))
    qps_b64 = n64 / (time.time() - t)
    recall_server = found / n64
    rss_after = rss_mb(srv.pid)
  finally:
    srv.terminate()
    srv.wait(30)
  print(f"server: up in {startup_s:.1f}s, RSS {rss_loaded:.0f} MB loaded / {rss_after:.0f} MB "
        f"after; /retrieve {qps_b1:.0f} q/s at batch 1, {qps_b64:.0f} q/s at batch 64; "
        f"recall@{args.topk} {recall_server:.3f}")

  # ---- bm25s in process (no HTTP) -----------------------------------------------------------
  index = SearchIndex(index_dir)
  # untimed, as the server's warm-up request: the first search pays one-off costs (about 30 ms
  # against 0.2-1.3 ms a query after it) that would otherwise land in the batch-1 figure
  index.search([queries[0]], args.topk)
  index.search(queries[:64], args.topk)
  t = time.time()
  for q in queries[:n1]:
    index.search([q], args.topk)
  inproc_b1 = n1 / (time.time() - t)
  t = time.time()
  for i in range(args.requests_b64):
    index.search([queries[(i * 64 + j) % len(queries)] for j in range(64)], args.topk)
  inproc_b64 = 64 * args.requests_b64 / (time.time() - t)
  del index
  gc.collect()

  # ---- rank-bm25 on the same tokens, in a child process so its memory is its own ------------
  nq = min(args.rank_bm25_queries, len(queries))
  qfile = os.path.join(work, "queries.json")
  with open(qfile, "w") as f:
    json.dump({"queries": queries[:nq], "gold": gold[:nq], "topk": args.topk}, f)
  out = subprocess.run([sys.executable, __file__, "--rank-bm25-child", corpus, qfile],
                       capture_output=True, text=True, check=True, env=env)
  rb = json.loads(out.stdout.strip().splitlines()[-1])
  rb_qps, rb_build = rb["qps"], rb["build_s"]
  print(f"rank-bm25: built in {rb_build:.1f}s, RSS {rb['rss_mb_after']:.0f} MB after build "
        f"(corpus text held in memory), {rb_qps:.2f} q/s ({nq} queries), "
        f"recall@{args.topk} {rb['recall']:.3f}")

  rows = [
      ("bm25s server /retrieve (HTTP)", qps_b1, qps_b64, build_s, rss_loaded),
      ("bm25s in process", inproc_b1, inproc_b64, build_s, None),
      ("rank-bm25 BM25Okapi", rb_qps, rb_qps, rb_build, rb["rss_mb_after"]),
  ]
  print(f"\n{'retriever':32s} {'q/s b=1':>10s} {'q/s b=64':>10s} {'build s':>8s} {'RSS MB':>8s}")
  for name, a, b, c, m in rows:
    print(f"{name:32s} {a:10.1f} {b:10.1f} {c:8.1f} {'' if m is None else f'{m:.0f}':>8s}")
  print(f"speed-up of the server over rank-bm25: {qps_b1 / rb_qps:.0f}x at batch 1, "
        f"{qps_b64 / rb_qps:.0f}x at batch 64")

  result = {
      "benchmark": "retrieval",  # CPU only: no JAX device to record
      **run_info(("bm25s", "rank-bm25", "aiohttp", "numpy"), device=False),
      "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                 "platform": platform.platform()},
      "corpus": {"passages": len(texts), "queries": len(queries), "source": "synthetic world "
                 "(asearcher_jax.world), 1-hop questions as queries", "topk": args.topk},
      "bm25s_server": {"qps_batch1": qps_b1, "qps_batch64": qps_b64, "requests_batch1": n1,
                       "requests_batch64": args.requests_b64, "startup_s": startup_s,
                       "rss_mb_loaded": rss_loaded, "rss_mb_after": rss_after,
                       "recall_at_k": recall_server, "workers": 2},
      "bm25s_in_process": {"qps_batch1": inproc_b1, "qps_batch64": inproc_b64},
      "bm25s_index": {"build_s": build_s, "build_peak_rss_mb": build_peak_mb,
                      "disk_mb": dir_mb(index_dir)},
      "rank_bm25": {"qps": rb_qps, "queries": nq, "build_s": rb_build,
                    "rss_mb_before_build": rb["rss_mb_before"], "rss_mb_after": rb["rss_mb_after"],
                    "recall_at_k": rb["recall"],
                    "note": "no batch API: batch 64 = 64 sequential get_scores calls"},
  }
  write_result(result, args.results, f"retrieval_cpu_{len(texts) // 1000}k")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
