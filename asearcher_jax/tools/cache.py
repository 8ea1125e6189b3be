"""A persistent key -> JSON cache on disk for web results and pages (sqlite3 in WAL mode).

Web search and page fetches cost money and seconds, and RL asks the same questions many
times over, so results are kept across restarts. sqlite in WAL mode lets many readers and
one writer work at once across threads *and* processes (rollout workers share one file);
each thread gets its own connection, writes are single upserts, and a busy timeout waits
out another writer instead of failing. Entries may expire after a TTL.

The methods block (a busy timeout can wait seconds), so async code calls them through
`asyncio.to_thread` (see `web._HttpAdapter._cached`) and the event loop never stalls.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from typing import Any

_SCHEMA = """CREATE TABLE IF NOT EXISTS cache (
  key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"""


class DiskCache:
  def __init__(self, path: str, ttl_s: float | None = None, busy_timeout_s: float = 30.0):
    self.path, self.ttl_s, self.busy_timeout_s = os.path.abspath(path), ttl_s, busy_timeout_s
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    self._local = threading.local()
    self._conn()  # create the file and schema now, so errors surface at construction

  def _conn(self) -> sqlite3.Connection:
    # sqlite forbids using a connection across fork(): a child (a rollout worker forked
    # after the cache was opened) must open its own, never touch the parent's.
    conn = getattr(self._local, "conn", None)
    if conn is not None and getattr(self._local, "pid", None) != os.getpid():
      conn = None  # the parent's; dropped without close(), which could touch shared state
    if conn is None:
      conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
      conn.execute("PRAGMA journal_mode=WAL")
      conn.execute("PRAGMA synchronous=NORMAL")
      conn.execute(_SCHEMA)
      self._local.conn, self._local.pid = conn, os.getpid()
    return conn

  def get(self, key: str) -> Any | None:
    row = self._conn().execute("SELECT value, created FROM cache WHERE key = ?",
                               (key,)).fetchone()
    if row is None:
      return None
    if self.ttl_s is not None and time.time() - row[1] > self.ttl_s:
      return None
    return json.loads(row[0])

  def put(self, key: str, value: Any) -> None:
    self._conn().execute(
        "INSERT INTO cache (key, value, created) VALUES (?, ?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value, created = excluded.created",
        (key, json.dumps(value), time.time()))  # ASCII: a lone surrogate (valid JSON) survives

  def delete(self, key: str) -> None:
    self._conn().execute("DELETE FROM cache WHERE key = ?", (key,))

  def __len__(self) -> int:
    return self._conn().execute("SELECT COUNT(*) FROM cache").fetchone()[0]

  def close(self) -> None:
    conn = getattr(self._local, "conn", None)
    if conn is not None and getattr(self._local, "pid", None) == os.getpid():
      conn.close()
      self._local.conn = None
