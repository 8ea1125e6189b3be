"""Disk cache: survives restarts, and stays consistent under concurrent threads and processes."""

import multiprocessing as mp
import os
import threading
import time

from asearcher_jax.tools.cache import DiskCache


def test_roundtrip_and_persistence(tmp_path):
  path = str(tmp_path / "sub" / "c.sqlite")
  c = DiskCache(path)
  c.put("a", {"x": [1, 2], "s": "ünïcode"})
  c.put("a", {"x": [3]})  # overwrite
  c.put("b", "text")
  c.delete("b")
  c.close()
  again = DiskCache(path)
  assert again.get("a") == {"x": [3]} and again.get("b") is None and len(again) == 1
  assert again.get("zz") is None


def test_a_lone_surrogate_round_trips(tmp_path):
  """Valid JSON from a provider that cut an emoji in half: sqlite refused the text, and the
  search that had been paid for failed."""
  c = DiskCache(str(tmp_path / "c.sqlite"))
  c.put("k", {"snippet": "cut \ud83d here"})
  assert c.get("k") == {"snippet": "cut \ud83d here"}


def test_ttl_expires_entries(tmp_path):
  c = DiskCache(str(tmp_path / "c.sqlite"), ttl_s=0.2)
  c.put("k", 1)
  assert c.get("k") == 1
  time.sleep(0.3)
  assert c.get("k") is None


def test_concurrent_threads(tmp_path):
  c = DiskCache(str(tmp_path / "c.sqlite"))
  errors = []

  def work(t):
    try:
      for i in range(100):
        c.put(f"{t}/{i}", {"t": t, "i": i})
        assert c.get(f"{t}/{i}") == {"t": t, "i": i}
        c.put("shared", t)
    except Exception as e:  # noqa: BLE001
      errors.append(e)
  threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
  for th in threads:
    th.start()
  for th in threads:
    th.join()
  assert not errors
  assert len(c) == 8 * 100 + 1 and c.get("shared") in range(8)


def _writer(path, proc, n):
  c = DiskCache(path)
  for i in range(n):
    c.put(f"p{proc}/{i}", [proc, i])
    c.put("hot", proc)  # every process fights over one row too


def test_concurrent_processes(tmp_path):
  path = str(tmp_path / "c.sqlite")
  DiskCache(path)
  ctx = mp.get_context("spawn")
  procs = [ctx.Process(target=_writer, args=(path, p, 150)) for p in range(4)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(120)
  assert all(p.exitcode == 0 for p in procs)
  c = DiskCache(path)
  assert len(c) == 4 * 150 + 1
  assert all(c.get(f"p{p}/{i}") == [p, i] for p in range(4) for i in range(150))


def test_connection_inherited_across_fork_is_not_reused(tmp_path):
  """sqlite forbids using a connection across fork(): a forked child (seen here as a
  different pid owning the thread's connection) must open its own, not reuse the parent's.
  Simulated rather than forked, since os.fork() in a process running JAX may deadlock."""
  c = DiskCache(str(tmp_path / "c.sqlite"))
  inherited = c._conn()
  c._local.pid = -1  # as if the connection had been opened by the parent process
  fresh = c._conn()
  assert fresh is not inherited and c._local.pid == os.getpid()
  c.put("k", 1)
  assert c.get("k") == 1 and c._conn() is fresh
