"""The replay queue in the caller's process, behind the same calls as the gRPC clients: for a
colocated learner and rollout worker (tests, benchmarks, one-process debugging)."""

from __future__ import annotations

import asyncio

from asearcher_jax.replay.client import ReplayState
from asearcher_jax.replay.queue import Group, Lease, ReplayQueue


class LocalReplay:
  """`SyncReplayClient`'s calls on a `ReplayQueue`; `.aio` gives `ReplayClient`'s (async)."""

  def __init__(self, queue: ReplayQueue):
    self.queue = queue
    self.aio = _Async(self)

  def put(self, group: Group) -> str:
    return self.queue.put(group)

  def lease(self, count: int, timeout_s: float, wait_s: float = 0.0) -> Lease | None:
    return self.queue.lease(count, timeout_s, wait_s)

  def renew(self, lease_id: str, timeout_s: float) -> bool:
    return self.queue.renew(lease_id, timeout_s)

  def ack(self, lease_id: str) -> bool:
    return self.queue.ack(lease_id)

  def release(self, lease_id: str) -> bool:
    return self.queue.release(lease_id)

  def set_version(self, version: int) -> None:
    self.queue.set_version(version)

  def state(self, worker: str = "") -> ReplayState:
    s = self.queue.stats()
    accepted, cursor = self.queue.worker_state(worker) if worker else (0, 0)
    return ReplayState(accepted=accepted, cursor=cursor, **s)

  def close(self) -> None:
    pass


class _Async:
  def __init__(self, sync: LocalReplay):
    self._sync = sync

  async def put(self, group: Group) -> str:
    return await asyncio.to_thread(self._sync.put, group)  # the journal fsyncs

  async def state(self, worker: str = "") -> ReplayState:
    return self._sync.state(worker)

  async def close(self) -> None:
    pass
