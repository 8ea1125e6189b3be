"""The replay queue contract: use-once, group-atomic, oldest submit version first, lease/ack,
idempotent puts, a journal that survives restarts and crashes (of consumers and of the queue
process itself): every group put is consumed exactly once."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest

from asearcher_jax.agent.trajectory import RECORD_MAGIC, Trajectory, Turn
from asearcher_jax.errors import ConfigError, DataError
from asearcher_jax.replay import Group, ReplayQueue
from asearcher_jax.replay.client import ReplayClient, ReplayUnavailable, SyncReplayClient
from asearcher_jax.replay.queue import JOURNAL
from asearcher_jax.replay.server import ReplayServer
from asearcher_jax.replay.validate import decode_trajectory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
  def __init__(self):
    self.t = 1000.0

  def __call__(self) -> float:
    return self.t


def trajectory(gid: str, i: int, v: int) -> Trajectory:
  """A sound record: a prompt token, then two sampled by version v."""
  t = Trajectory(qid=f"q-{gid}", question="?", answers=["a"], group_id=gid, sample=i,
                 submit_version=v, status="answered", reward=float(i % 2))
  t.record_call([5], [6, 7], [-0.5, -1.5], [v, v])
  return t


def group(gid: str, v: int = 0, worker: str = "w0", cursor: int = 0, size: int = 2) -> Group:
  trajs = [trajectory(gid, i, v).to_record() for i in range(size)]
  return Group(gid, f"q-{gid}", v, worker, cursor, trajs, created=123.0)


def ids(lease) -> list[str]:
  return [g.group_id for g in lease.groups]


# -- semantics --------------------------------------------------------------------------------

def test_oldest_version_first_ties_by_arrival_and_whole_groups():
  q = ReplayQueue()
  for gid, v in [("a", 2), ("b", 1), ("c", 2), ("d", 0), ("e", 1)]:
    assert q.put(group(gid, v)) == "accepted"
  assert q.stats()["queued_by_version"] == {0: 1, 1: 2, 2: 2}
  assert q.stats()["oldest_queued_version"] == 0
  first = q.lease(3, 10)
  assert ids(first) == ["d", "b", "e"]
  assert all(len(g.trajectories) == 2 for g in first.groups)
  assert Trajectory.from_record(first.groups[0].trajectories[1]).sample == 1
  assert q.lease(3, 10) is None  # only two left: exactly `count` or nothing
  assert q.stats()["queued"] == 2
  assert ids(q.lease(2, 10)) == ["a", "c"]
  assert q.ack(first.lease_id)
  assert q.lease(1, 10) is None  # use-once: nothing comes back
  with pytest.raises(ValueError):
    q.lease(0, 10)
  with pytest.raises(ValueError):
    q.lease(1, 0)


def test_expiry_renew_release_and_late_ack():
  clock = FakeClock()
  q = ReplayQueue(clock=clock)
  for gid, v in [("a", 0), ("b", 0), ("c", 1)]:
    q.put(group(gid, v))
  lease = q.lease(2, timeout_s=5)
  clock.t += 4
  assert q.renew(lease.lease_id, 5)
  clock.t += 4  # 8 s after the lease, 4 after the renewal: still held
  assert q.stats()["leased"] == 2 and ids(q.lease(1, 5)) == ["c"]
  clock.t += 1.5
  assert q.stats()["expired_leases"] == 1 and q.stats()["queued"] == 2
  assert not q.ack(lease.lease_id)  # too late: the groups are back, in their old places
  assert not q.renew(lease.lease_id, 5)
  again = q.lease(2, 5)
  assert ids(again) == ["a", "b"]
  assert q.release(again.lease_id) and not q.release(again.lease_id)
  assert ids(q.lease(2, 5)) == ["a", "b"]
  clock.t += 6  # both live leases ("c", and "a", "b" again) run out
  assert q.expire() == 2 and q.stats()["queued"] == 3


def test_lease_waits_for_a_put_from_another_thread():
  import threading
  q = ReplayQueue()
  threading.Timer(0.1, q.put, args=(group("late"),)).start()
  lease = q.lease(1, 5, wait_s=5)
  assert lease is not None and ids(lease) == ["late"]


def test_put_is_idempotent_by_group_id():
  q = ReplayQueue()
  assert q.put(group("a", cursor=1)) == "accepted"
  assert q.put(group("a", cursor=1)) == "duplicate"  # queued
  lease = q.lease(1, 5)
  assert q.put(group("a")) == "duplicate"  # leased
  q.ack(lease.lease_id)
  assert q.put(group("a")) == "duplicate"  # consumed
  s = q.stats()
  assert (s["duplicates"], s["accepted_total"], s["queued"], s["consumed"]) == (3, 1, 0, 1)
  assert q.worker_state("w0") == (1, 1) and q.worker_state("nobody") == (0, 0)
  q.put(group("b", cursor=5))
  q.put(group("c", cursor=3))  # a put retried after a later one: the cursor stays at 5
  assert q.worker_state("w0") == (3, 5)
  with pytest.raises(ValueError):
    q.put(group(""))


# -- journal ----------------------------------------------------------------------------------

def test_restart_keeps_unacked_groups_versions_and_workers(tmp_path):
  d = str(tmp_path)
  q = ReplayQueue(d)
  for i in range(6):
    q.put(group(f"g{i}", v=i % 2, worker=f"w{i % 2}", cursor=10 + i))
  q.set_version(3)
  acked = q.lease(2, 60)
  q.ack(acked.lease_id)
  held = q.lease(2, 60)  # the "learner" dies holding this lease
  q.lease(1, 60)
  q2 = ReplayQueue(d)
  s = q2.stats()
  assert (s["version"], s["queued"], s["leased"], s["consumed"], s["accepted_total"]) == \
      (3, 4, 0, 2, 6)
  assert q2.worker_state("w0") == (3, 14) and q2.worker_state("w1") == (3, 15)
  assert q2.put(group(ids(acked)[0])) == "duplicate"
  assert q2.put(group(ids(held)[0])) == "duplicate"
  assert q2.ack(acked.lease_id)  # an ack retried after a lost reply is still a success
  left = q2.lease(4, 60)
  assert sorted(ids(left)) == sorted(set(f"g{i}" for i in range(6)) - set(ids(acked)))
  assert [g.submit_version for g in left.groups] == sorted(g.submit_version for g in left.groups)
  assert left.groups[0].trajectories == group(ids(left)[0]).trajectories  # payload round-trips


def test_torn_last_line_is_ignored(tmp_path):
  d = str(tmp_path)
  q = ReplayQueue(d)
  q.put(group("a"))
  q.put(group("b"))
  path = os.path.join(d, JOURNAL)
  with open(path, "a") as f:  # crashes mid-write: half a put, then an ack without its newline
    f.write('{"op": "put", "group_id": "c", "qid": "q')
  assert ReplayQueue(d).stats()["queued"] == 2
  with open(path, "a") as f:
    f.write(json.dumps({"op": "ack", "lease": "x", "groups": ["a"]}))
  q2 = ReplayQueue(d)  # a complete-looking line without "\n" never finished its fsync
  assert q2.stats()["queued"] == 2 and q2.put(group("c")) == "accepted"
  assert ReplayQueue(d).stats()["queued"] == 3


def test_non_utf8_payload_round_trips(tmp_path):
  q = ReplayQueue(str(tmp_path))
  g = Group("x", "q", 0, "w", 0, [b"\xff\xfe raw \x00 bytes", "é".encode()], 1.0)
  q.put(g)
  assert ReplayQueue(str(tmp_path)).lease(1, 5).groups[0].trajectories == g.trajectories


def test_a_journal_of_json_payloads_from_an_older_run_still_loads(tmp_path):
  """Before the binary record, puts journaled the payloads as text ("trajectories": [str],
  non-UTF-8 bytes as surrogate escapes) and those payloads were JSON records."""
  old = [trajectory("old", i, 1) for i in range(2)]
  lines = [{"op": "version", "v": 1},
           {"op": "put", "group_id": "old", "qid": "q-old", "submit_version": 1, "worker": "w0",
            "cursor": 3, "created": 5.0, "trajectories": [t.to_json() for t in old]},
           {"op": "put", "group_id": "raw", "qid": "q", "submit_version": 1, "worker": "w0",
            "cursor": 4, "created": 6.0,
            "trajectories": [b"\xff\xfe".decode("utf-8", "surrogateescape")]}]
  (tmp_path / JOURNAL).write_text("".join(json.dumps(r) + "\n" for r in lines))
  q = ReplayQueue(str(tmp_path), compact_bytes=1 << 30)
  q.put(group("new", v=1))  # a binary group appended to the old journal
  for reopened in (ReplayQueue(str(tmp_path)), None):
    if reopened is None:  # compaction rewrites the old puts in the new form
      q.compact()
      reopened = ReplayQueue(str(tmp_path))
    groups = {g.group_id: g for g in reopened.lease(3, 60).groups}
    assert groups["raw"].trajectories == [b"\xff\xfe"]
    got = [decode_trajectory(b, "old") for b in groups["old"].trajectories]
    assert [t.to_json() for t in got] == [t.to_json() for t in old]
    assert groups["new"].trajectories == group("new", v=1).trajectories
    assert groups["new"].trajectories[0].startswith(RECORD_MAGIC)
  with open(tmp_path / JOURNAL) as f:
    assert all("trajectories_b64" in r for r in map(json.loads, f) if r["op"] == "put")


def test_compaction_keeps_semantics(tmp_path):
  d = str(tmp_path)
  path = os.path.join(d, JOURNAL)
  q = ReplayQueue(d, compact_bytes=5000)
  for i in range(20):
    q.put(group(f"g{i:02d}", v=i // 5, cursor=i, size=3))
  q.set_version(4)
  size_before = os.path.getsize(path)
  held = q.lease(2, 60)  # leased at compaction time: must survive it
  for _ in range(6):  # 12 of 20 consumed: more payload dead than live
    q.ack(q.lease(2, 60).lease_id)
  q.wait_compaction()
  assert q.compactions >= 1
  assert os.path.getsize(path) < size_before
  assert not os.path.exists(path + ".tmp")
  ops = collections.Counter(json.loads(line)["op"] for line in open(path))
  assert ops["consumed"] == 1 and ops["worker"] == 1 and ops["version"] == 1
  q.put(group("after", v=9, cursor=99))
  q.close()  # as the process would, restarting
  q2 = ReplayQueue(d, compact_bytes=5000)
  s = q2.stats()
  assert (s["version"], s["queued"], s["consumed"], s["accepted_total"]) == (4, 9, 12, 21)
  assert q2.worker_state("w0") == (21, 99)
  assert all(q2.put(group(f"g{i:02d}")) == "duplicate" for i in range(20))
  assert q2.ack(q.lease(1, 60).lease_id) is False  # leases of the old process are gone
  rest = q2.lease(9, 60)
  assert ids(held)[0] in ids(rest) and ids(rest)[-1] == "after"
  assert [g.submit_version for g in rest.groups] == sorted(g.submit_version for g in rest.groups)
  q2.ack(rest.lease_id)
  q2.close()
  q3 = ReplayQueue(d, compact_bytes=5000)  # compacted on startup or at the last ack
  assert q3.stats()["queued"] == 0 and q3.stats()["consumed"] == 21


def test_compaction_waits_until_it_reclaims_what_it_rewrites(tmp_path):
  """A rewrite copies every live group: it waits until more payload is dead than live, so a
  queue holding gigabytes is not rewritten for every threshold's worth of acks."""
  d = str(tmp_path)
  q = ReplayQueue(d, compact_bytes=500)
  for i in range(10):
    q.put(group(f"g{i}"))
  assert group("g0").nbytes > 500  # one consumed group crosses the threshold
  for _ in range(4):  # 4 dead, 6 live: past the threshold, not past the live payload
    q.ack(q.lease(1, 60).lease_id)
  q.wait_compaction()
  assert q.compactions == 0
  q.ack(q.lease(2, 60).lease_id)  # 6 dead, 4 live
  q.wait_compaction()
  assert q.compactions == 1
  q.close()
  assert ReplayQueue(d).stats()["queued"] == 4


def test_compaction_lets_the_queue_work_and_keeps_what_it_did_meanwhile(tmp_path, monkeypatch):
  d = str(tmp_path)
  q = ReplayQueue(d, compact_bytes=500)
  for i in range(4):
    q.put(group(f"g{i}", cursor=i))
  writing, go_on = threading.Event(), threading.Event()
  to_record = Group.to_record

  def slow_to_record(self):  # the rewrite of the live groups takes its time
    if threading.current_thread().name == "replay-compaction":
      writing.set()
      go_on.wait(30)
    return to_record(self)

  monkeypatch.setattr(Group, "to_record", slow_to_record)
  q.ack(q.lease(3, 60).lease_id)  # 3 dead, 1 live: the ack starts a rewrite and returns
  assert writing.wait(30)
  # Meanwhile the queue serves every call, and what they change is kept.
  assert q.put(group("new", cursor=9)) == "accepted"
  lease = q.lease(1, 60)
  assert ids(lease) == ["g3"] and q.ack(lease.lease_id)
  q.set_version(5)
  assert q.compactions == 0
  go_on.set()
  q.wait_compaction()
  assert q.compactions == 1 and not os.path.exists(os.path.join(d, JOURNAL + ".tmp"))
  q.close()
  with open(os.path.join(d, JOURNAL)) as f:
    assert json.loads(f.readline())["op"] == "version"  # rewritten
  q2 = ReplayQueue(d)
  s = q2.stats()
  assert (s["version"], s["queued"], s["consumed"], s["accepted_total"]) == (5, 1, 4, 5)
  assert q2.worker_state("w0") == (5, 9)
  assert q2.put(group("g1")) == "duplicate"
  assert ids(q2.lease(1, 60)) == ["new"]


def test_a_queue_reopened_in_process_waits_for_a_compaction_under_way(tmp_path, monkeypatch):
  """Queues of one process share the journal (a restart in a test): one opened while the
  other's compaction was writing removed its temp file, and the compaction then renamed an
  empty journal into place, losing every group and consumed id."""
  d = str(tmp_path)
  q = ReplayQueue(d, compact_bytes=500)
  for i in range(4):
    q.put(group(f"g{i}"))
  writing, go_on = threading.Event(), threading.Event()
  to_record = Group.to_record

  def slow_to_record(self):
    if threading.current_thread().name == "replay-compaction":
      writing.set()
      go_on.wait(30)
    return to_record(self)

  monkeypatch.setattr(Group, "to_record", slow_to_record)
  q.ack(q.lease(3, 60).lease_id)
  assert writing.wait(30)
  opened = []
  reopen = threading.Thread(target=lambda: opened.append(ReplayQueue(d)))
  reopen.start()
  reopen.join(0.5)
  assert reopen.is_alive()  # it waits for the compaction
  go_on.set()
  reopen.join(30)
  q.close()
  s = opened[0].stats()
  assert (s["queued"], s["consumed"], s["accepted_total"]) == (1, 3, 4)
  assert opened[0].put(group("g0")) == "duplicate"
  opened[0].close()


# -- over gRPC --------------------------------------------------------------------------------

@pytest.fixture
def server(tmp_path):
  queue = ReplayQueue(str(tmp_path))
  queue.set_version(7)  # the tests put groups of versions up to 7: none is from the future
  srv = ReplayServer(queue, vocab_size=300).start_in_thread()
  yield srv
  srv.stop_thread()


def test_grpc_consumer_dies_before_ack_then_after_ack(server):
  async def go():
    async with ReplayClient(server.address, timeout=10) as worker:
      for i in range(4):
        assert await worker.put(group(f"g{i}", v=i, worker="wA", cursor=i + 1)) == "accepted"
      assert await worker.put(group("g0")) == "duplicate"
      st = await worker.state("wA")
      assert (st.accepted, st.cursor, st.queued, st.oldest_queued_version) == (4, 4, 4, 0)
      await worker.set_version(7)

    dead = ReplayClient(server.address, timeout=10)
    lost = await dead.lease(2, timeout_s=0.3)
    await dead.close()  # dies before acking
    async with ReplayClient(server.address, timeout=10) as other:
      assert await other.lease(3, 5) is None  # only two are free while the lease lives
      free = await other.lease(2, 5)
      got = await other.lease(2, timeout_s=5, wait_s=5)  # the dead consumer's, once expired
      assert ids(free) == ["g2", "g3"] and await other.ack(free.lease_id)
      assert ids(got) == ids(lost) == ["g0", "g1"]
      assert await other.renew(got.lease_id, 5)
      assert not await other.ack(lost.lease_id)
      assert await other.ack(got.lease_id)

    async with ReplayClient(server.address, timeout=10) as worker:
      for i in range(4, 6):
        await worker.put(group(f"g{i}", v=i))
    dead = ReplayClient(server.address, timeout=10)
    done = await dead.lease(2, 5)
    assert await dead.ack(done.lease_id)
    await dead.close()  # dies right after acking
    async with ReplayClient(server.address, timeout=10) as other:
      assert await other.lease(1, 5, wait_s=0.3) is None
      st = await other.state()
      assert (st.version, st.queued, st.leased, st.consumed, st.expired_leases) == (7, 0, 0, 6, 1)
      with pytest.raises(ValueError, match="count"):
        await other.lease(0, 5)

  asyncio.run(go())


def test_a_lease_larger_than_one_message_is_read_a_message_at_a_time(server, monkeypatch):
  """A lease of long trajectories passes gRPC's message limit (a 14B run's 128 groups of 16
  episodes of 16k tokens: 532 MiB against 256): the reply failed to send, its groups stayed
  leased to nobody until the lease expired, and the learner died on every lease. Here the
  limit is scaled down to a few groups' size; a lease's groups come in order, whole."""
  from asearcher_jax.replay import server as server_mod
  one = server_mod.group_to_proto(group("x", size=3)).ByteSize()
  monkeypatch.setattr(server_mod, "REPLY_BYTES", int(2.5 * one))  # two groups a message
  with SyncReplayClient(server.address, timeout=10) as c:
    for i in range(7):
      c.put(group(f"g{i}", v=i, size=3))
    lease = c.lease(7, 5)
    assert ids(lease) == [f"g{i}" for i in range(7)]
    assert all(len(g.trajectories) == 3 for g in lease.groups)
    assert c.ack(lease.lease_id) and c.state().consumed == 7

  async def go():
    async with ReplayClient(server.address, timeout=10) as worker:
      for i in range(7, 10):
        await worker.put(group(f"g{i}", v=7, size=3))
      lease = await worker.lease(3, 5)
      assert ids(lease) == ["g7", "g8", "g9"] and await worker.ack(lease.lease_id)
  asyncio.run(go())


def test_a_lease_read_in_part_is_never_consumed(server, monkeypatch):
  """A client that read only a lease's first message (one older than ReadLease) would ack
  groups it never trained on; a client whose read failed half-way left the lease held by
  nobody until it expired."""
  from asearcher_jax.replay import client as client_mod
  from asearcher_jax.replay import server as server_mod
  from asearcher_jax.replay.protos import replay_pb2, replay_pb2_grpc
  one = server_mod.group_to_proto(group("x")).ByteSize()
  monkeypatch.setattr(server_mod, "REPLY_BYTES", int(1.5 * one))  # one group a message
  with SyncReplayClient(server.address, timeout=10) as c:
    for i in range(3):
      c.put(group(f"g{i}", v=i))
    old = replay_pb2_grpc.ReplayStub(c._channel)
    first = old.Lease(replay_pb2.LeaseRequest(count=3, timeout_s=30))
    assert (first.count, len(first.groups)) == (3, 1)
    with pytest.raises(ValueError, match="from 1 on were never read"):
      c.ack(first.lease_id)
    assert c.release(first.lease_id) and c.state().queued == 3

    def broken(lease, more):
      raise ReplayUnavailable("the queue went away mid-read")
    monkeypatch.setattr(client_mod, "_extend", broken)
    with pytest.raises(ReplayUnavailable):
      c.lease(3, 30)
    assert c.state().leased == 0 and c.state().queued == 3  # given back at once


def test_one_process_at_a_time_serves_a_journal(tmp_path):
  """Two queue processes on one journal handed out and acknowledged the same groups, and one's
  compaction erased what the other had appended. Queues of one process share the journal (a
  restart in a test); another process is refused until it is released."""
  q = ReplayQueue(str(tmp_path))
  q.put(group("a"))
  assert ReplayQueue(str(tmp_path)).stats()["queued"] == 1  # this process: shared
  other = [sys.executable, "-c", "import sys; from asearcher_jax.replay.queue import "
           "ReplayQueue; print(ReplayQueue(sys.argv[1]).stats()['queued'])", str(tmp_path)]
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(other, capture_output=True, text=True, timeout=60, env=env)
  assert proc.returncode != 0 and f"in use by another process (pid {os.getpid()})" in proc.stderr
  q.close()
  proc = subprocess.run(other, capture_output=True, text=True, timeout=60, env=env)
  assert proc.returncode == 0 and proc.stdout.strip() == "1"


def test_sync_client_and_unavailable(server):
  with SyncReplayClient(server.address, timeout=10) as c:
    c.put(group("s", v=3))
    lease = c.lease(1, 5)
    assert ids(lease) == ["s"] and c.release(lease.lease_id)
    lease = c.lease(1, 5)
    assert c.ack(lease.lease_id) and c.ack(lease.lease_id)
    assert c.state().consumed == 1
  with SyncReplayClient("127.0.0.1:1", timeout=5) as c, pytest.raises(ReplayUnavailable):
    c.state()


def test_auth(tmp_path, monkeypatch):
  monkeypatch.delenv("ASEARCHER_TOKEN", raising=False)
  with pytest.raises(ConfigError, match="not loopback"):
    ReplayServer(ReplayQueue(), host="0.0.0.0")
  srv = ReplayServer(ReplayQueue(), token="s3cret").start_in_thread()
  try:
    for token in (None, "wrong"):
      with SyncReplayClient(srv.address, token=token, timeout=5) as c, \
          pytest.raises(grpc.RpcError) as e:
        c.state()
      assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with SyncReplayClient(srv.address, token="s3cret", timeout=5) as c:
      assert c.put(group("x")) == "accepted"
  finally:
    srv.stop_thread()


def test_a_wrong_token_is_refused_before_the_request_is_read():
  """The token is checked from the call's metadata, before gRPC reads the request: bytes that
  are no request at all, with a wrong token, are UNAUTHENTICATED rather than a parse failure."""
  srv = ReplayServer(ReplayQueue(), token="s3cret").start_in_thread()
  try:
    with grpc.insecure_channel(srv.address) as channel:
      put = channel.unary_unary("/asearcher.replay.Replay/Put")  # raw bytes in and out
      with pytest.raises(grpc.RpcError) as e:
        put(b"\xff" * 64, metadata=(("authorization", "Bearer wrong"),), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
  finally:
    srv.stop_thread()


# -- the queue process killed and restarted ---------------------------------------------------

def start_queue(journal: str) -> tuple[subprocess.Popen, str]:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen([sys.executable, "-m", "asearcher_jax.replay.server", "--journal",
                           journal, "--port", "0", "--compact-mb", "0.002"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
  line = proc.stdout.readline()
  assert line.startswith("replay queue listening on "), line
  return proc, line.split()[-1]


def test_exactly_once_across_a_queue_kill(tmp_path):
  rng = random.Random(0)
  journal = str(tmp_path / "journal")
  total, kill_at = 60, 30
  put: list[str] = []
  consumed: list[str] = []
  proc, addr = start_queue(journal)
  try:
    c = SyncReplayClient(addr, timeout=10)
    c.set_version(3)  # groups of versions 0..3 follow (journaled: it survives the kill)
    step = 0
    while len(put) < total or step < 200:
      step += 1
      if len(put) == kill_at:
        held = c.lease(1, 30)  # a consumer holds a lease when the queue dies
        assert held is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with pytest.raises(ReplayUnavailable):
          c.state()
        c.close()
        proc, addr = start_queue(journal)
        c = SyncReplayClient(addr, timeout=10)
        st = c.state("w")
        assert (st.accepted, st.cursor, st.leased) == (kill_at, kill_at, 0)
        assert st.queued == kill_at - len(consumed)
        # the worker retries everything it ever sent: all duplicates, none stored twice
        assert {c.put(group(g)) for g in put} == {"duplicate"}
        assert not c.ack(held.lease_id)  # leases die with the queue; their groups are back
        kill_at = -1
      r = rng.random()
      if len(put) < total and r < 0.5:
        gid = f"g{len(put):03d}"
        assert c.put(group(gid, v=rng.randrange(4), worker="w", cursor=len(put) + 1)) == \
            "accepted"
        put.append(gid)
        if rng.random() < 0.2:
          assert c.put(group(gid)) == "duplicate"
        continue
      fate = rng.random()
      lease = c.lease(rng.randint(1, 3), timeout_s=0.2 if fate < 0.15 else 30)
      if lease is None:
        continue
      if fate < 0.15:
        continue  # consumer dies holding the lease: it expires (or dies with the queue)
      if fate < 0.3:
        assert c.release(lease.lease_id)
        continue
      assert c.ack(lease.lease_id)
      consumed.extend(ids(lease))
    while (lease := c.lease(1, 30, wait_s=0.5)) is not None:  # drain
      assert c.ack(lease.lease_id)
      consumed.extend(ids(lease))
    st = c.state()
    assert (st.queued, st.leased, st.consumed, st.accepted_total) == (0, 0, total, total)
    c.close()
  finally:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
  assert kill_at == -1
  with open(os.path.join(journal, JOURNAL)) as f:  # the process compacted its journal
    assert json.loads(f.readline())["op"] == "version"
  counts = collections.Counter(consumed)
  assert set(counts) == set(put) and set(counts.values()) == {1}


# -- the binary record ------------------------------------------------------------------------

def episode(seed: int = 0, vocab: int = 151_936) -> Trajectory:
  """A typical search episode: a 400-token prompt, four turns of 150 sampled tokens with a
  300-token tool result after each, a rewritten context (a second sequence), a transcript of
  ~4 characters a token, as `agent.episode` writes one."""
  rng = np.random.default_rng(seed)
  t = Trajectory(qid="nq-7", question="Qui a écrit « Le Petit Prince » ?", answers=["Saint-Ex"],
                 group_id="g7", sample=2, submit_version=3, prediction="Saint-Ex",
                 status="answered", reward=1.0, metrics={"f1": 1.0}, valid_instruction=True,
                 sampling={"temperature": 1.0, "top_p": 1.0}, timings={"episode_s": 12.5})
  ctx = rng.integers(0, vocab, 400).tolist()
  t.transcript.append({"role": "prompt", "text": "p" * 4 * len(ctx)})
  for k in range(4):
    out = rng.integers(0, vocab, 150).tolist()
    logp = np.log(rng.uniform(1e-6, 1.0, len(out))).astype(np.float32)
    a, b = t.record_call(ctx, out, [float(x) for x in logp], [3 + k % 2] * len(out))
    t.turns.append(Turn("act", a, b, len(ctx), "stop", "search", "a query", True, None, 0.4, 0.1))
    t.transcript.append({"role": "policy", "text": "é" * 4 * len(out)})
    tool = rng.integers(0, vocab, 300).tolist()
    t.transcript.append({"role": "tool", "text": "t" * 4 * len(tool)})
    ctx = (ctx + out + tool) if k != 1 else (ctx[:400] + tool[:20])  # k = 1: a stubbed page
  t.check()
  return t


def test_binary_record_round_trips_exactly_and_is_smaller_than_json():
  t = episode()
  raw = t.to_record()
  assert raw[:len(RECORD_MAGIC)] == RECORD_MAGIC and len(t.seq_starts) == 2
  back = Trajectory.from_record(raw)
  for k in ("tokens", "loss_mask", "behav_logp", "version"):  # bit for bit, same dtypes
    a, b = getattr(t, k), getattr(back, k)
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), k
    b[:1] = b[:1]  # writable: a copy, not a view of the record
  assert back.to_json() == t.to_json()  # every other field too
  assert decode_trajectory(raw, "x", vocab_size=151_936, max_version=4).to_json() == t.to_json()
  assert Trajectory.from_record(t.to_json().encode()).to_json() == t.to_json()  # JSON still
  # 19 bytes a token against 30 (the transcript's text is the same in both: 13 against 24 without)
  assert len(raw) < 0.7 * len(t.to_json().encode())
  empty = Trajectory(qid="q", question="?", answers=[])  # a text-only record: no tokens
  assert Trajectory.from_record(empty.to_record()).to_json() == empty.to_json()


def test_truncated_corrupt_or_unknown_binary_records_raise():
  raw = trajectory("g", 0, 1).to_record()
  for n in range(len(RECORD_MAGIC), len(raw)):  # every truncation
    with pytest.raises(ValueError, match="binary trajectory record"):
      Trajectory.from_record(raw[:n])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    Trajectory.from_record(raw + b"\x00")
  with pytest.raises(ValueError, match=r"unknown schema version 2 \(this build reads 1\)"):
    Trajectory.from_record(RECORD_MAGIC + b"\x02" + raw[len(RECORD_MAGIC) + 1:])
  mask = bytearray(raw)
  mask[-1] = 7
  with pytest.raises(ValueError, match="loss_mask bytes other than 0 and 1"):
    Trajectory.from_record(bytes(mask))
  head = json.dumps({"qid": "q", "question": "?", "answers": [], "tokens": [1]}).encode()
  forged = RECORD_MAGIC + b"\x01" + len(head).to_bytes(4, "little") + head + bytes(16)
  with pytest.raises(ValueError, match=re.escape("header holds per-token fields ['tokens']")):
    Trajectory.from_record(forged)
  with pytest.raises(ValueError, match="header is not JSON"):
    Trajectory.from_record(forged.replace(b'"qid"', b"'qid'"))
  with pytest.raises(ValueError, match=r"^where: binary trajectory record truncated"):
    decode_trajectory(raw[:-1], "where")


# -- what the queue refuses -------------------------------------------------------------------

def _poison(kind: str) -> Group:
  g = group(f"bad-{kind}", v=1)
  t = trajectory(g.group_id, 0, 1)
  record = json.loads(t.to_json())
  if kind == "not-json":
    raw = b"\xff{not json"
  elif kind == "unknown-field":
    raw = json.dumps({**record, "evil": 1}).encode()
  elif kind == "lengths":
    raw = json.dumps({**record, "behav_logp": [0.0]}).encode()
  elif kind == "vocab":
    raw = json.dumps({**record, "tokens": [5, 10**6, 7]}).encode()
  elif kind == "nan":
    raw = json.dumps({**record, "behav_logp": [0.0, float("nan"), -1.0]}).encode()
  elif kind == "future":
    raw = json.dumps({**record, "version": [-1, 500_000, 1]}).encode()
  elif kind == "empty":
    raw = b""
  elif kind == "seq-starts":  # a float slice bound: every step leasing it failed (TypeError)
    raw = json.dumps({**record, "seq_starts": [0.0]}).encode()
  elif kind == "reward":
    raw = json.dumps({**record, "reward": "1.0"}).encode()
  elif kind == "metrics":  # the step's episode metrics failed on it, after the update
    raw = json.dumps({**record, "metrics": None}).encode()
  elif kind == "huge-metric":  # valid JSON, accepted, then OverflowError in the step's metrics
    raw = json.dumps({**record, "metrics": {"em": 10**400}}).encode()
  elif kind == "huge-int-reward":  # TypeError outside the checks: UNKNOWN, retried 4 times
    raw = json.dumps({**record, "reward": 10**400}).encode()
  elif kind == "huge-reward":  # finite in float64, inf in the float32 advantages: NaN for all
    raw = json.dumps({**record, "reward": 1e300}).encode()
  elif kind == "binary-truncated":
    raw = t.to_record()[:-5]
  elif kind == "binary-schema":
    raw = RECORD_MAGIC + b"\x09" + t.to_record()[len(RECORD_MAGIC) + 1:]
  elif kind == "binary-lengths":
    t.behav_logp = t.behav_logp[:1]
    raw = t.to_record()
  g.trajectories[1] = raw
  return g


@pytest.mark.parametrize("kind, needle", [
    ("not-json", "not a JSON trajectory record"), ("unknown-field", "unknown trajectory fields"),
    ("lengths", "differ in length"), ("vocab", "outside the vocabulary [0, 300)"),
    ("nan", "finite"), ("future", "sampled by version 500000"),
    ("empty", "not a JSON trajectory record"),
    ("seq-starts", "seq_starts must be a list of integers"),
    ("reward", "reward must be a finite number"),
    ("huge-int-reward", "reward must be a finite number"),
    ("huge-reward", "reward must be a finite number within ±1e+06"),
    ("metrics", "metrics must map names to finite numbers"),
    ("huge-metric", "metrics must map names to finite numbers"),
    ("binary-truncated", "trajectory 1: binary trajectory record truncated or corrupt"),
    ("binary-schema", "trajectory 1: binary trajectory record of unknown schema version 9"),
    ("binary-lengths", "trajectory 1: tokens, loss_mask, behav_logp and version differ")])
def test_put_refuses_a_poison_group_and_stores_nothing(server, kind, needle):
  c = SyncReplayClient(server.address, timeout=10)
  with pytest.raises(ValueError, match=re.escape(needle)):
    c.put(_poison(kind))
  assert c.state().accepted_total == 0
  assert c.put(group("good", v=1)) == "accepted"  # still serving
  # A token may be one version ahead (the servers serve v + 1 before the queue hears of it).
  assert c.put(group("next", v=8)) == "accepted"
  with pytest.raises(ValueError, match="submit_version 9 is not in \\[0, 8\\]"):
    c.put(group("late", v=9))


def test_queue_refuses_unbounded_leases_negative_versions_and_huge_groups():
  q = ReplayQueue(max_group_bytes=1000)
  q.put(group("a"))
  for bad in (float("inf"), float("nan"), 1e308, 0.0, -1.0):
    with pytest.raises(ValueError, match="timeout_s must be in"):
      q.lease(1, bad)
  lease = q.lease(1, 60)
  with pytest.raises(ValueError, match="timeout_s must be in"):
    q.renew(lease.lease_id, float("inf"))
  with pytest.raises(ValueError, match="versions only move forward"):
    q.set_version(-(2**63))
  q.set_version(5)
  with pytest.raises(ValueError, match="version 3 is behind the published 5"):
    q.set_version(3)
  assert q.version == 5
  with pytest.raises(ValueError, match="the limit is 1000"):
    q.put(Group("big", "q", 0, "w", 0, [b"x" * 1001], 1.0))


@pytest.mark.parametrize("damage, needle", [
    (b'{"op": "put", "group_id": "\xff\xfe"}\n', "unreadable line"),
    (b'{"op": "ack"}\n', "record 2 ('ack') is damaged (KeyError"),
    (b'{"op": "version", "v": "x"}\n', "record 2 ('version') is damaged (ValueError"),
    (b'{"op": "put", "group_id": "g"}\n', "record 2 ('put') is damaged (KeyError"),
    (b'{"op": "merge"}\n', "unknown journal op 'merge'"),
    (b'[1, 2]\n', "record 2 (None) is damaged"),
    (b'{"op": "put", "trajectories_b64": ["not base64!"]}\n', "record 2 ('put') is damaged"),
])
def test_a_damaged_journal_is_refused_in_one_line_naming_the_record(tmp_path, damage, needle):
  q = ReplayQueue(str(tmp_path))
  q.put(group("a"))
  with open(tmp_path / JOURNAL, "ab") as f:
    f.write(damage)
  with pytest.raises(DataError, match=re.escape(needle)):
    ReplayQueue(str(tmp_path))
  q.close()  # the journal is one process's at a time
  proc = subprocess.run([sys.executable, "-m", "asearcher_jax.replay.server", "--journal",
                         str(tmp_path), "--port", "0"], capture_output=True, text=True,
                        timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert needle in proc.stderr.strip().splitlines()[-1]
