#!/usr/bin/env python
"""The replay queue under random SIGKILLs: nothing lost, nothing acknowledged twice.

  python benchmarks/replay_kills.py [--groups 400] [--queue-kills 50] [--consumer-deaths 50]

A producer puts sound groups (some twice, as a worker whose reply was lost) while a consumer
leases and acknowledges them; the queue process is SIGKILLed between calls at random points
(with a tiny compaction threshold, so kills also land in background compactions) and the call
after each kill meets it down: it raises ReplayUnavailable, the queue is restarted on the same
journal (on a new port, so the client is replaced) and the call is retried (`client_retries`).
--queue-kills is capped at the steps during which groups arrive (2 x --groups - 1). The consumer
"dies" at random points holding a lease (it never acknowledges, so the lease expires or dies
with the queue). At the end every group put must have been acknowledged exactly once. Prints
the figures and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from asearcher_jax.agent.trajectory import Trajectory  # noqa: E402
from asearcher_jax.replay import Group  # noqa: E402
from asearcher_jax.replay.client import ReplayUnavailable, SyncReplayClient  # noqa: E402
from benchmarks.common import run_info, write_result  # noqa: E402


def sound_group(gid: str, cursor: int) -> Group:
  trajs = []
  for i in range(2):
    t = Trajectory(qid=f"q-{gid}", question="?", answers=["a"], group_id=gid, sample=i,
                   submit_version=0, status="answered", reward=float(i))
    t.record_call([5, 9], [6, 7, 8], [-0.5, -1.5, -0.1], [0, 0, 0])
    trajs.append(t.to_json().encode())
  return Group(gid, f"q-{gid}", 0, "w", cursor, trajs)


def start(journal: str) -> tuple[subprocess.Popen, str]:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen([sys.executable, "-m", "asearcher_jax.replay.server", "--journal",
                           journal, "--port", "0", "--compact-mb", "0.01", "--vocab-size", "16"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
  line = proc.stdout.readline()
  if not line.startswith("replay queue listening on "):
    proc.kill()
    proc.wait()
    raise SystemExit(f"the queue did not start: {line!r}")
  return proc, line.split()[-1]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--groups", type=int, default=400)
  p.add_argument("--queue-kills", type=int, default=50)
  p.add_argument("--consumer-deaths", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--results", help="JSON output (default: benchmarks/results/replay_kills.json)")
  args = p.parse_args()
  rng = random.Random(args.seed)
  # kills land on distinct steps while groups arrive (about 2 steps a group): no more than that
  steps = range(1, 2 * args.groups)
  planned = min(args.queue_kills, len(steps))
  if planned < args.queue_kills:
    print(f"--queue-kills {args.queue_kills} capped at {planned}: kills land on distinct steps "
          f"among the {len(steps)} while {args.groups} groups arrive")
  kill_at = set(rng.sample(steps, planned))
  journal = tempfile.mkdtemp(prefix="replay_kills.")
  try:
    result = run(args, rng, kill_at, journal)
  finally:
    shutil.rmtree(journal, ignore_errors=True)
  result = {"queue_kills_planned": planned, **result}
  print(f"{result['groups']} groups, {result['queue_kills']} queue SIGKILLs "
        f"({result['client_retries']} calls met the queue down and were retried), "
        f"{result['consumer_deaths']} consumer deaths holding a lease: {result['lost']} lost, "
        f"{result['acknowledged_twice']} acknowledged twice ({result['wall_s']} s)")
  write_result({"benchmark": "replay_kills", **run_info(("grpcio",), device=False),
                "args": vars(args), **result}, args.results, "replay_kills")
  if result["lost"] or result["acknowledged_twice"]:
    raise SystemExit(1)


def run(args, rng: random.Random, kill_at: set[int], journal: str) -> dict:
  proc, addr = start(journal)
  client = SyncReplayClient(addr, timeout=10)
  put, acked = [], collections.Counter()
  kills = deaths = retries = 0
  t0, step = time.time(), 0

  def call(fn, *a):
    """`fn(client)`; a call that meets the queue down restarts it and is retried."""
    nonlocal proc, client, retries
    while True:
      try:
        return fn(client, *a)
      except ReplayUnavailable:
        retries += 1
        if proc.poll() is not None:  # killed: restart on the same journal (on a new port, so
          proc, addr = start(journal)  # the client is replaced, as a worker told the new address)
          client.close()
          client = SyncReplayClient(addr, timeout=10)
        else:
          time.sleep(0.05)

  try:
    while len(put) < args.groups or call(lambda c: c.state().queued + c.state().leased):
      step += 1
      if step in kill_at:  # SIGKILL at a random point; the next call finds the queue down
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
      if len(put) < args.groups and rng.random() < 0.5:
        gid = f"g{len(put):05d}"
        status = call(lambda c: c.put(sound_group(gid, len(put) + 1)))
        if status != "accepted":
          raise SystemExit(f"{gid}: first put answered {status}")
        put.append(gid)
        if rng.random() < 0.1:  # a worker retrying after a lost reply
          assert call(lambda c: c.put(sound_group(gid, len(put)))) == "duplicate"
        continue
      lease = call(lambda c: c.lease(rng.randint(1, 3), 0.3, 0.0))
      if lease is None:
        time.sleep(0.01)
        continue
      if deaths < args.consumer_deaths and rng.random() < 0.15:
        deaths += 1  # the consumer dies holding the lease: it expires
        continue
      if call(lambda c: c.ack(lease.lease_id)):
        acked.update(g.group_id for g in lease.groups)
  finally:
    client.close()
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
    proc.wait()
  lost = sorted(set(put) - set(acked))
  twice = sorted(g for g, n in acked.items() if n > 1)
  return {"groups": len(put), "queue_kills": kills, "consumer_deaths": deaths,
          "client_retries": retries, "lost": len(lost), "acknowledged_twice": len(twice),
          "wall_s": round(time.time() - t0, 1)}

if __name__ == "__main__":
  main()
