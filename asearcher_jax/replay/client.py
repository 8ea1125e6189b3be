"""Clients of the replay queue service: asyncio for rollout workers, synchronous for the
learner's loop. A queue that cannot be reached raises `ReplayUnavailable`; `put` (by group id)
and `ack` (by lease id) are idempotent, so both may simply be retried after it."""

from __future__ import annotations

import contextlib
import dataclasses
import time

import grpc

from asearcher_jax.errors import AsearcherError
from asearcher_jax.replay.protos import replay_pb2, replay_pb2_grpc
from asearcher_jax.replay.queue import Group, Lease

MAX_MESSAGE = 256 << 20  # a lease carries whole groups of long trajectories
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE),
                   ("grpc.max_receive_message_length", MAX_MESSAGE)]


class ReplayUnavailable(AsearcherError, ConnectionError):
  """The replay queue does not answer (down, restarting, wrong address)."""


@dataclasses.dataclass
class ReplayState:
  """The queue's stats, plus one worker's totals when asked for a worker."""

  version: int
  accepted: int
  cursor: int
  queued: int
  leased: int
  leases: int
  consumed: int
  accepted_total: int
  duplicates: int
  expired_leases: int
  queued_by_version: dict[int, int]
  oldest_queued_version: int | None


def group_to_proto(g: Group) -> replay_pb2.Group:
  return replay_pb2.Group(group_id=g.group_id, qid=g.qid, submit_version=g.submit_version,
                          worker=g.worker, cursor=g.cursor, trajectories=g.trajectories,
                          created=g.created)


def group_from_proto(p: replay_pb2.Group) -> Group:
  return Group(p.group_id, p.qid, p.submit_version, p.worker, p.cursor, list(p.trajectories),
               p.created)


def _lease(p: replay_pb2.LeaseResponse) -> Lease | None:
  if not p.lease_id:
    return None
  return Lease(p.lease_id, [group_from_proto(g) for g in p.groups],
               time.monotonic() + p.expires_in_s)


def _extend(lease: Lease, more: replay_pb2.LeaseResponse) -> None:
  """Adds a ReadLease reply's groups: a lease reply carries only as many as fit in one
  message, and the reader asks for the rest until it has the lease's `count`."""
  if not more.lease_id or not more.groups:
    raise ReplayUnavailable(f"lease {lease.lease_id} expired while its groups were read")
  lease.groups.extend(group_from_proto(g) for g in more.groups)


def _state(p: replay_pb2.StateResponse) -> ReplayState:
  return ReplayState(
      version=p.version, accepted=p.accepted, cursor=p.cursor, queued=p.queued, leased=p.leased,
      leases=p.leases, consumed=p.consumed, accepted_total=p.accepted_total,
      duplicates=p.duplicates, expired_leases=p.expired_leases,
      queued_by_version=dict(sorted(p.queued_by_version.items())),
      oldest_queued_version=(p.oldest_queued_version if p.HasField("oldest_queued_version")
                             else None))


def _translate(e: grpc.RpcError, address: str) -> Exception:
  if e.code() == grpc.StatusCode.UNAVAILABLE:
    return ReplayUnavailable(f"replay queue at {address} is unavailable: {e.details()}")
  if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
    return ValueError(e.details())
  return e


class _Base:
  def __init__(self, address: str, token: str | None, timeout: float | None):
    self.address = address
    self._metadata = (("authorization", f"Bearer {token}"),) if token else None
    self._timeout = timeout

  def _lease_timeout(self, wait_s: float) -> float | None:
    return None if self._timeout is None else self._timeout + max(0.0, wait_s)


class ReplayClient(_Base):
  """asyncio client over one channel. Use `async with ReplayClient(addr) as c: ...`."""

  def __init__(self, address: str, token: str | None = None, timeout: float | None = 60.0):
    super().__init__(address, token, timeout)
    self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    self._stub = replay_pb2_grpc.ReplayStub(self._channel)

  async def __aenter__(self) -> "ReplayClient":
    return self

  async def __aexit__(self, *exc) -> None:
    await self.close()

  async def close(self) -> None:
    await self._channel.close()

  async def _call(self, method, request, timeout: float | None = None):
    try:
      return await method(request, metadata=self._metadata, timeout=timeout or self._timeout)
    except grpc.aio.AioRpcError as e:
      raise _translate(e, self.address) from None

  async def put(self, group: Group) -> str:
    """"accepted" or "duplicate" (already queued, leased or consumed)."""
    resp = await self._call(self._stub.Put, replay_pb2.PutRequest(group=group_to_proto(group)))
    return resp.status

  async def lease(self, count: int, timeout_s: float, wait_s: float = 0.0) -> Lease | None:
    req = replay_pb2.LeaseRequest(count=count, timeout_s=timeout_s, wait_s=wait_s)
    reply = await self._call(self._stub.Lease, req, self._lease_timeout(wait_s))
    lease = _lease(reply)
    try:
      while lease is not None and len(lease.groups) < reply.count:
        _extend(lease, await self._call(self._stub.ReadLease, replay_pb2.ReadLeaseRequest(
            lease_id=lease.lease_id, start=len(lease.groups))))
    except BaseException:  # its groups back to the queue now, not when the lease expires
      with contextlib.suppress(Exception):
        await self.release(lease.lease_id)
      raise
    return lease

  async def renew(self, lease_id: str, timeout_s: float) -> bool:
    req = replay_pb2.RenewRequest(lease_id=lease_id, timeout_s=timeout_s)
    return (await self._call(self._stub.Renew, req)).ok

  async def ack(self, lease_id: str) -> bool:
    return (await self._call(self._stub.Ack, replay_pb2.AckRequest(lease_id=lease_id))).ok

  async def release(self, lease_id: str) -> bool:
    req = replay_pb2.ReleaseRequest(lease_id=lease_id)
    return (await self._call(self._stub.Release, req)).ok

  async def set_version(self, version: int) -> int:
    req = replay_pb2.VersionRequest(version=version)
    return (await self._call(self._stub.SetVersion, req)).version

  async def state(self, worker: str = "") -> ReplayState:
    return _state(await self._call(self._stub.GetState, replay_pb2.StateRequest(worker=worker)))


class SyncReplayClient(_Base):
  """The same calls, blocking, over a plain channel: for the learner's loop."""

  def __init__(self, address: str, token: str | None = None, timeout: float | None = 60.0):
    super().__init__(address, token, timeout)
    self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    self._stub = replay_pb2_grpc.ReplayStub(self._channel)

  def __enter__(self) -> "SyncReplayClient":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._channel.close()

  def _call(self, method, request, timeout: float | None = None):
    try:
      return method(request, metadata=self._metadata, timeout=timeout or self._timeout)
    except grpc.RpcError as e:
      raise _translate(e, self.address) from None

  def put(self, group: Group) -> str:
    return self._call(self._stub.Put, replay_pb2.PutRequest(group=group_to_proto(group))).status

  def lease(self, count: int, timeout_s: float, wait_s: float = 0.0) -> Lease | None:
    req = replay_pb2.LeaseRequest(count=count, timeout_s=timeout_s, wait_s=wait_s)
    reply = self._call(self._stub.Lease, req, self._lease_timeout(wait_s))
    lease = _lease(reply)
    try:
      while lease is not None and len(lease.groups) < reply.count:
        _extend(lease, self._call(self._stub.ReadLease, replay_pb2.ReadLeaseRequest(
            lease_id=lease.lease_id, start=len(lease.groups))))
    except BaseException:  # its groups back to the queue now, not when the lease expires
      with contextlib.suppress(Exception):
        self.release(lease.lease_id)
      raise
    return lease

  def renew(self, lease_id: str, timeout_s: float) -> bool:
    req = replay_pb2.RenewRequest(lease_id=lease_id, timeout_s=timeout_s)
    return self._call(self._stub.Renew, req).ok

  def ack(self, lease_id: str) -> bool:
    return self._call(self._stub.Ack, replay_pb2.AckRequest(lease_id=lease_id)).ok

  def release(self, lease_id: str) -> bool:
    return self._call(self._stub.Release, replay_pb2.ReleaseRequest(lease_id=lease_id)).ok

  def set_version(self, version: int) -> int:
    return self._call(self._stub.SetVersion, replay_pb2.VersionRequest(version=version)).version

  def state(self, worker: str = "") -> ReplayState:
    return _state(self._call(self._stub.GetState, replay_pb2.StateRequest(worker=worker)))
