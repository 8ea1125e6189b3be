"""The replay queue's state: use-once, group-atomic, oldest submit version first, lease/ack,
with an append-only journal so that a restart loses nothing and trains nothing twice.

Journal (`journal_dir/journal.jsonl`, one fsynced JSON object a line, through `jsonl`):
  {"op": "put", "group_id", "qid", "submit_version", "worker", "cursor", "created",
   "trajectories_b64": [str]}                   a group was accepted (payloads in base64;
                                                journals of older runs hold "trajectories":
                                                [str], the payloads as text, still read)
  {"op": "ack", "lease": id, "groups": [ids]}   those groups were consumed
  {"op": "version", "v": n}                     the learner published version n
  {"op": "consumed", "groups": [ids], "leases": [ids]}   (compaction) consumed before
  {"op": "worker", "worker", "accepted", "cursor"}       (compaction) a worker's totals
A state change is journaled before it is applied and before the caller hears of it. Leases are
not journaled: after a restart their groups are simply queued again, which is safe because
nothing was acknowledged. Compaction rewrites the journal (temp file, fsync, rename) without
the payloads of consumed groups, keeping their ids so that a late retried put is still a
duplicate. It runs once the consumed payload exceeds both `compact_bytes` and the live payload,
so it never rewrites more bytes than it reclaims (at the 14B config's sizes a live queue holds
gigabytes), and it runs beside the queue: a snapshot is taken under the lock, written without
it while puts, leases and acks go on, and the records appended meanwhile are copied over
under the lock before the rename.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import heapq
import json
import logging
import os
import shutil
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Literal

from asearcher_jax.errors import DataError
from asearcher_jax.jsonl import append_lines, drop_torn_tail, read_lines

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
MAX_LEASE_S = 86_400.0  # a lease that outlives a day is a stuck consumer, not a slow one
PutStatus = Literal["accepted", "duplicate"]


@dataclasses.dataclass
class Group:
  """G trajectories of one prompt, queued and consumed as a unit."""

  group_id: str
  qid: str
  submit_version: int
  worker: str
  cursor: int  # where the worker resumes after a restart: its first prompt not yet finished
  trajectories: list[bytes]  # Trajectory.to_record(); the queue never parses them
  created: float = dataclasses.field(default_factory=time.time)

  @property
  def nbytes(self) -> int:
    return sum(len(t) for t in self.trajectories)

  def to_record(self) -> dict[str, Any]:
    # base64: binary payloads as JSON text cost 4/3 their size, not up to 6x as escapes
    trajs = [base64.b64encode(t.encode() if isinstance(t, str) else t).decode("ascii")
             for t in self.trajectories]
    return {"op": "put", "group_id": self.group_id, "qid": self.qid,
            "submit_version": self.submit_version, "worker": self.worker, "cursor": self.cursor,
            "created": self.created, "trajectories_b64": trajs}

  @classmethod
  def from_record(cls, r: dict[str, Any]) -> "Group":
    if "trajectories_b64" in r:  # binascii.Error, a ValueError, for a damaged one
      trajs = [base64.b64decode(t, validate=True) for t in r["trajectories_b64"]]
    else:  # an older journal: payloads as text, non-UTF-8 bytes as surrogate escapes
      trajs = [t.encode("utf-8", "surrogateescape") for t in r["trajectories"]]
    return cls(r["group_id"], r["qid"], int(r["submit_version"]), r["worker"], int(r["cursor"]),
               trajs, float(r["created"]))


@dataclasses.dataclass
class Lease:
  lease_id: str
  groups: list[Group]
  expires: float  # on the clock of whoever made this object (the queue's, or the client's)


@dataclasses.dataclass
class _Entry:
  group: Group
  seq: int  # arrival order, kept across leases and restarts: ties break by it
  lease_id: str | None = None


def _check_timeout(what: str, timeout_s: float) -> None:
  if not 0 < timeout_s <= MAX_LEASE_S:  # also refuses NaN
    raise ValueError(f"{what} timeout_s must be in (0, {MAX_LEASE_S:.0f}], got {timeout_s}")


# One journal, one process: a second queue process on it handed out and acknowledged the same
# groups, and one's compaction erased what the other had appended. Queues of one process (a
# test reopening a journal, as a restart would) share its lock, held while any is open, and
# one compaction lock: a queue opened while another's compaction writes waits for it, rather
# than reading a journal about to be replaced and removing the compaction's temp file.
_JOURNAL_LOCKS: dict[str, list] = {}  # lock file -> [fd, open queues, compaction lock]


def _lock_journal(journal_dir: str) -> str:
  path = os.path.realpath(os.path.join(journal_dir, "journal.lock"))
  if path in _JOURNAL_LOCKS:
    _JOURNAL_LOCKS[path][1] += 1
    return path
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    os.close(fd)
    raise DataError(f"{journal_dir}: the replay journal is in use by another process (pid "
                    f"{holder}): one queue serves a journal") from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, str(os.getpid()).encode(), 0)
  _JOURNAL_LOCKS[path] = [fd, 1, threading.Lock()]
  return path


def _unlock_journal(path: str) -> None:
  held = _JOURNAL_LOCKS.get(path)
  if held is not None:
    held[1] -= 1
    if held[1] == 0:
      del _JOURNAL_LOCKS[path]
      os.close(held[0])  # releases the flock


class ReplayQueue:
  """Thread-safe; every public call first returns the groups of expired leases to the queue.

  `clock` (monotonic seconds) times leases and can be faked in tests; `lease(wait_s=...)`
  waits in real time. `compact_bytes`: rewrite the journal once the payload of consumed groups
  still in it exceeds this and the payload of the groups not yet consumed; an ack that crosses
  it starts the rewrite in the background (`wait_compaction` waits for it).
  """

  def __init__(self, journal_dir: str | None = None, *, compact_bytes: int = 256 << 20,
               clock: Callable[[], float] = time.monotonic, max_group_bytes: int = 64 << 20):
    self.clock = clock
    self.max_group_bytes = max_group_bytes
    self._lock = threading.Lock()
    self._changed = threading.Condition(self._lock)
    self.compact_bytes = compact_bytes
    self._groups: dict[str, _Entry] = {}  # not yet consumed: queued or leased
    self._heap: list[tuple[int, int, str]] = []  # (submit_version, seq, id) of queued groups
    self._leases: dict[str, Lease] = {}
    self._consumed: set[str] = set()
    self._acked_leases: set[str] = set()  # an ack retried after a lost reply is still True
    self._workers: dict[str, list[int]] = {}  # worker -> [accepted, cursor]
    self._version = 0
    self._seq = 0
    self._duplicates = 0
    self._expired = 0
    self._dead_bytes = 0  # payload of consumed groups still in the journal
    self._live_bytes = 0  # payload of the groups not yet consumed
    self._compacting = threading.Lock()  # one rewrite of the journal at a time
    self._compactor: threading.Thread | None = None
    self._closed = False
    self.compactions = 0
    self._path = os.path.join(journal_dir, JOURNAL) if journal_dir else None
    self._release = None
    if self._path:
      os.makedirs(journal_dir, exist_ok=True)
      lock = _lock_journal(journal_dir)
      self._release = weakref.finalize(self, _unlock_journal, lock)  # also when collected
      self._compacting = _JOURNAL_LOCKS[lock][2]
      try:
        with self._compacting:
          self._replay()
      except BaseException:
        self.close()
        raise
      if self._worth_compacting():
        self.compact()

  def close(self) -> None:
    """Waits for a running compaction, then releases the journal to another process (also done
    when the queue is collected)."""
    with self._lock:
      self._closed = True  # no ack starts another compaction
    self.wait_compaction()
    if self._release is not None:
      self._release()

  def wait_compaction(self) -> None:
    """Returns once no compaction started by an ack is running."""
    worker = self._compactor
    if worker is not None:
      worker.join()

  # -- journal -------------------------------------------------------------------------------
  def _replay(self) -> None:
    tmp = self._path + ".tmp"
    if os.path.exists(tmp):  # a compaction that died before its rename; the journal is whole
      os.remove(tmp)
    # A last line without its newline was never fsynced to completion, so its caller never
    # heard back: drop it now, as the next append would, even if it happens to parse.
    drop_torn_tail(self._path, keep_whole=False)
    for n, r in enumerate(read_lines(self._path), 1):
      try:
        self._apply(r)
      except (KeyError, TypeError, ValueError, AttributeError) as e:
        op = r.get("op") if isinstance(r, dict) else None
        raise DataError(f"{self._path}: record {n} ({op!r}) is damaged ({type(e).__name__}: "
                        f"{e}); restore the journal from a copy, or move it away to start an "
                        "empty queue") from None
    self._heap = [(e.group.submit_version, e.seq, gid) for gid, e in self._groups.items()]
    heapq.heapify(self._heap)

  def _apply(self, r: Any) -> None:
    """One journal record's effect on the state being rebuilt."""
    op = r.get("op") if isinstance(r, dict) else None
    if op == "put":
      g = Group.from_record(r)
      if g.group_id not in self._groups and g.group_id not in self._consumed:
        self._add(g, push=False)
    elif op == "ack":
      self._consume(r["groups"], r.get("lease"))
    elif op == "consumed":
      self._consumed.update(r["groups"])
      self._acked_leases.update(r.get("leases", ()))
    elif op == "version":
      self._version = int(r["v"])
    elif op == "worker":
      self._workers[r["worker"]] = [int(r["accepted"]), int(r["cursor"])]
    else:
      raise ValueError(f"unknown journal op {op!r}")

  def _append(self, record: dict[str, Any]) -> None:
    if self._path:
      append_lines(self._path, [record], keep_whole=False)  # unfinished: never answered

  def _worth_compacting(self) -> bool:
    """Under the lock: the consumed payload exceeds the threshold and the live payload, which a
    rewrite copies, so the bytes compaction writes never exceed those puts appended."""
    return (self._path is not None
            and self._dead_bytes > max(self.compact_bytes, self._live_bytes))

  def compact(self) -> None:
    """Rewrites the journal as the current state: version, consumed ids, unconsumed groups in
    arrival order (leased ones too: their leases are not durable), then worker totals, then what
    was appended while it wrote. The lock is held only to take the snapshot and to copy those
    last records and rename."""
    if not self._path:
      return
    with self._compacting:
      tmp = self._path + ".tmp"
      with self._lock:
        drop_torn_tail(self._path, keep_whole=False)  # the snapshot ends at a whole line
        covered = os.path.getsize(self._path) if os.path.exists(self._path) else 0
        dead = self._dead_bytes
        head = [{"op": "version", "v": self._version},
                {"op": "consumed", "groups": sorted(self._consumed),
                 "leases": sorted(self._acked_leases)}]
        live = [e.group for e in sorted(self._groups.values(), key=lambda e: e.seq)]
        workers = [{"op": "worker", "worker": w, "accepted": a, "cursor": c}
                   for w, (a, c) in sorted(self._workers.items())]
      try:
        with open(tmp, "w", encoding="utf-8") as f:
          for r in head:
            f.write(json.dumps(r) + "\n")
          for g in live:
            f.write(json.dumps(g.to_record()) + "\n")
          for r in workers:
            f.write(json.dumps(r) + "\n")
          f.flush()
          os.fsync(f.fileno())
        with self._lock:
          with open(tmp, "ab") as f, open(self._path, "rb") as journal:
            journal.seek(covered)  # the records appended since the snapshot, in order
            shutil.copyfileobj(journal, f)
            f.flush()
            os.fsync(f.fileno())
          os.replace(tmp, self._path)
          fd = os.open(os.path.dirname(self._path), os.O_RDONLY)
          try:
            os.fsync(fd)  # the rename itself
          finally:
            os.close(fd)
          self._dead_bytes -= dead
          self.compactions += 1
      except BaseException:
        if os.path.exists(tmp):
          os.remove(tmp)
        raise

  def _compact_in_background(self) -> None:
    with self._lock:
      if self._closed or (self._compactor is not None and self._compactor.is_alive()):
        return  # it will not see the latest ack's bytes; the next ack starts another
      self._compactor = threading.Thread(target=self._compact_logged, name="replay-compaction",
                                         daemon=True)
      self._compactor.start()

  def _compact_logged(self) -> None:
    try:
      self.compact()
    except Exception:  # noqa: BLE001 -- the journal is whole; the next ack tries again
      log.exception("replay journal compaction failed; the journal is kept as it was")

  # -- state changes, under the lock ---------------------------------------------------------
  def _add(self, g: Group, push: bool = True) -> None:
    self._seq += 1
    self._groups[g.group_id] = e = _Entry(g, self._seq)
    self._live_bytes += g.nbytes
    if push:
      heapq.heappush(self._heap, (g.submit_version, e.seq, g.group_id))
    state = self._workers.setdefault(g.worker, [0, 0])
    state[0] += 1
    state[1] = max(state[1], g.cursor)  # puts retried after a later one must not move it back

  def _consume(self, group_ids, lease_id: str | None) -> None:
    for gid in group_ids:
      e = self._groups.pop(gid, None)
      if e is not None:
        self._dead_bytes += e.group.nbytes
        self._live_bytes -= e.group.nbytes
      self._consumed.add(gid)
    if lease_id:
      self._acked_leases.add(lease_id)

  def _requeue(self, lease: Lease) -> None:
    del self._leases[lease.lease_id]
    for g in lease.groups:
      e = self._groups[g.group_id]
      e.lease_id = None
      heapq.heappush(self._heap, (g.submit_version, e.seq, g.group_id))
    self._changed.notify_all()

  def _expire(self) -> int:
    now = self.clock()
    gone = [lease for lease in self._leases.values() if lease.expires <= now]
    for lease in gone:
      self._requeue(lease)
    self._expired += len(gone)
    return len(gone)

  # -- API -----------------------------------------------------------------------------------
  def put(self, group: Group) -> PutStatus:
    """Accepts a group once; a retry of a queued, leased or consumed group is a duplicate."""
    if not group.group_id:
      raise ValueError("a group needs a group_id")
    if not group.trajectories:
      raise ValueError(f"group {group.group_id} has no trajectories")
    if group.nbytes > self.max_group_bytes:
      raise ValueError(f"group {group.group_id} holds {group.nbytes} bytes; the limit is "
                       f"{self.max_group_bytes}")
    with self._lock:
      self._expire()
      if group.group_id in self._groups or group.group_id in self._consumed:
        self._duplicates += 1
        return "duplicate"
      self._append(group.to_record())
      self._add(group)
      self._changed.notify_all()
      return "accepted"

  def lease(self, count: int, timeout_s: float, wait_s: float = 0.0) -> Lease | None:
    """Exactly `count` whole groups, oldest submit version first (then arrival), leased for
    `timeout_s`; None if fewer than `count` are queued after waiting up to `wait_s`."""
    if count < 1:
      raise ValueError(f"lease count must be >= 1, got {count}")
    _check_timeout("lease", timeout_s)
    deadline = time.monotonic() + max(0.0, wait_s)
    with self._lock:
      while True:
        self._expire()
        if len(self._heap) >= count:
          break
        left = deadline - time.monotonic()
        if left <= 0:
          return None
        self._changed.wait(min(left, 0.05))  # short: leases also expire on their own
      lease = Lease(uuid.uuid4().hex, [], self.clock() + timeout_s)
      for _ in range(count):
        _, _, gid = heapq.heappop(self._heap)
        e = self._groups[gid]
        e.lease_id = lease.lease_id
        lease.groups.append(e.group)
      self._leases[lease.lease_id] = lease
      return lease

  def renew(self, lease_id: str, timeout_s: float) -> bool:
    """Extends a live lease to `timeout_s` from now; False if it expired or is unknown."""
    _check_timeout("renew", timeout_s)
    with self._lock:
      self._expire()
      lease = self._leases.get(lease_id)
      if lease is None:
        return False
      lease.expires = self.clock() + timeout_s
      return True

  def ack(self, lease_id: str) -> bool:
    """Consumes the lease's groups for good (journaled and fsynced first). True also for a
    lease acknowledged before, even before a restart; False for an expired or unknown one."""
    with self._lock:
      self._expire()
      if lease_id in self._acked_leases:
        return True
      lease = self._leases.get(lease_id)
      if lease is None:
        return False
      ids = [g.group_id for g in lease.groups]
      self._append({"op": "ack", "lease": lease_id, "groups": ids})
      del self._leases[lease_id]
      self._consume(ids, lease_id)
      compact = self._worth_compacting()
    if compact:
      self._compact_in_background()
    return True

  def leased(self, lease_id: str) -> Lease | None:
    """A live lease (its groups, for a reader that takes them a message at a time)."""
    with self._lock:
      self._expire()
      return self._leases.get(lease_id)

  def release(self, lease_id: str) -> bool:
    """Returns a live lease's groups to the queue at their old places."""
    with self._lock:
      self._expire()
      lease = self._leases.get(lease_id)
      if lease is None:
        return False
      self._requeue(lease)
      return True

  def expire(self) -> int:
    """Returns the groups of expired leases to the queue; how many leases expired."""
    with self._lock:
      return self._expire()

  def set_version(self, v: int) -> None:
    """The learner's published policy version (rollout workers read it for admission). It only
    moves forward (a resumed learner tags its restored weights above everything served), so
    admission, staleness and the check that no token comes from the future stay sound."""
    with self._lock:
      if int(v) < self._version:
        raise ValueError(f"version {v} is behind the published {self._version}: versions only "
                         "move forward")
      if int(v) != self._version:
        self._append({"op": "version", "v": int(v)})
        self._version = int(v)

  @property
  def version(self) -> int:
    return self._version

  def worker_state(self, worker: str) -> tuple[int, int]:
    """(groups of `worker` ever accepted, its highest cursor); (0, 0) if none."""
    with self._lock:
      a, c = self._workers.get(worker, (0, 0))
      return a, c

  def stats(self) -> dict[str, Any]:
    with self._lock:
      self._expire()
      by_version: dict[int, int] = {}
      for v, _, _ in self._heap:
        by_version[v] = by_version.get(v, 0) + 1
      return {
          "version": self._version,
          "queued": len(self._heap),
          "leased": len(self._groups) - len(self._heap),
          "leases": len(self._leases),
          "consumed": len(self._consumed),
          "accepted_total": sum(a for a, _ in self._workers.values()),
          "duplicates": self._duplicates,
          "expired_leases": self._expired,
          "queued_by_version": dict(sorted(by_version.items())),
          "oldest_queued_version": self._heap[0][0] if self._heap else None,
      }
