"""The replay queue as a gRPC service, in-process (tests, single-host debug) or as its own
process: `python -m asearcher_jax.replay.server --journal DIR --port P`.

Binds 127.0.0.1 unless told otherwise; any other address requires a bearer token. Queue calls
run in worker threads because puts and acks wait for fsync.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys

import grpc

from asearcher_jax import auth
from asearcher_jax.background import BackgroundServer
from asearcher_jax.errors import AsearcherError
from asearcher_jax.procs import follow_supervisor
from asearcher_jax.replay.client import (
  CHANNEL_OPTIONS,
  MAX_MESSAGE,
  group_from_proto,
  group_to_proto,
)
from asearcher_jax.replay.protos import replay_pb2, replay_pb2_grpc
from asearcher_jax.replay.queue import ReplayQueue
from asearcher_jax.replay.validate import check_group

log = logging.getLogger(__name__)
REPLY_BYTES = MAX_MESSAGE - (1 << 20)  # a lease reply's groups, with room for the rest


def _guarded(fn):
  """Maps bad requests onto INVALID_ARGUMENT (the token is checked before the request is read:
  ReplayServer.start)."""

  @functools.wraps(fn)
  async def unary(self, request, context):
    try:
      return await fn(self, request, context)
    except (ValueError, AsearcherError) as e:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except OSError as e:  # the journal could not be written: nothing was changed
      await context.abort(grpc.StatusCode.INTERNAL, f"replay journal: {e}")

  return unary


class ReplayServicer(replay_pb2_grpc.ReplayServicer):
  def __init__(self, queue: ReplayQueue, poll_s: float = 0.02, vocab_size: int | None = None):
    self.queue, self.poll_s, self.vocab_size = queue, poll_s, vocab_size
    self._unread: dict[str, int] = {}  # lease -> its first group no reply has carried yet

  @_guarded
  async def Put(self, request, context):
    group = group_from_proto(request.group)

    def put():  # decoding and checking a big group is work: off the event loop
      # The learner commits version v + 1 to the decode servers before it sets it here, so a
      # token may be one version ahead of the queue, never two.
      check_group(group, version=self.queue.version + 1, vocab_size=self.vocab_size)
      return self.queue.put(group)
    return replay_pb2.PutResponse(status=await asyncio.to_thread(put))

  @_guarded
  async def Lease(self, request, context):
    # Polls with wait_s=0 rather than blocking a thread in the queue: a caller that hangs up
    # cancels this coroutine, and a thread could still take groups for nobody after that.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, request.wait_s)
    while True:
      lease = await self._lease_once(request.count, request.timeout_s)
      if lease is not None:
        return self._reply(lease, 0)
      left = deadline - loop.time()
      if left <= 0:
        return replay_pb2.LeaseResponse()
      await asyncio.sleep(min(self.poll_s, left))

  @_guarded
  async def ReadLease(self, request, context):
    if request.start < 0:
      raise ValueError(f"ReadLease start must be >= 0, got {request.start}")
    lease = self.queue.leased(request.lease_id)
    if lease is None:
      return replay_pb2.LeaseResponse()
    if request.start >= len(lease.groups):
      raise ValueError(f"lease {request.lease_id} holds {len(lease.groups)} groups; "
                       f"start {request.start} is past them")
    return self._reply(lease, request.start)

  def _reply(self, lease, start: int) -> replay_pb2.LeaseResponse:
    """The lease's groups from `start` that fit in one message (at least one: a group is at
    most `max_group_bytes`, well under it). Whole leases of long trajectories pass gRPC's
    limit (a 14B run's 128 groups of 16 episodes of 16k tokens: 532 MiB), and a reply
    that failed to send left its groups leased to nobody until the lease expired, and then
    failed again."""
    reply = replay_pb2.LeaseResponse(lease_id=lease.lease_id, count=len(lease.groups),
                                     expires_in_s=max(0.0, lease.expires - self.queue.clock()))
    size = reply.ByteSize()
    for g in lease.groups[start:]:
      p = group_to_proto(g)
      size += p.ByteSize() + 8  # the field's tag and length
      if reply.groups and size > REPLY_BYTES:
        break
      reply.groups.append(p)
    end = start + len(reply.groups)
    if end < len(lease.groups):
      self._unread[lease.lease_id] = max(end, self._unread.get(lease.lease_id, 0))
    else:
      self._unread.pop(lease.lease_id, None)
    return reply

  async def _lease_once(self, count: int, timeout_s: float):
    fut = asyncio.get_running_loop().run_in_executor(None, self.queue.lease, count, timeout_s)
    try:
      return await asyncio.shield(fut)
    except asyncio.CancelledError:  # the caller left while we leased: give the groups back
      def give_back(f):
        if not f.cancelled() and f.exception() is None and f.result() is not None:
          self.queue.release(f.result().lease_id)
      fut.add_done_callback(give_back)
      raise

  @_guarded
  async def Renew(self, request, context):
    ok = await asyncio.to_thread(self.queue.renew, request.lease_id, request.timeout_s)
    return replay_pb2.RenewResponse(ok=ok)

  @_guarded
  async def Ack(self, request, context):
    unread = self._unread.get(request.lease_id)
    if unread is not None and self.queue.leased(request.lease_id) is not None:
      raise ValueError(f"lease {request.lease_id}: groups from {unread} on were never read "
                       "(ReadLease); acknowledging it would consume them untrained")
    self._unread.pop(request.lease_id, None)
    return replay_pb2.AckResponse(ok=await asyncio.to_thread(self.queue.ack, request.lease_id))

  @_guarded
  async def Release(self, request, context):
    self._unread.pop(request.lease_id, None)
    ok = await asyncio.to_thread(self.queue.release, request.lease_id)
    return replay_pb2.ReleaseResponse(ok=ok)

  @_guarded
  async def SetVersion(self, request, context):
    await asyncio.to_thread(self.queue.set_version, request.version)
    return replay_pb2.VersionResponse(version=self.queue.version)

  @_guarded
  async def GetState(self, request, context):
    def read():
      return self.queue.stats(), self.queue.worker_state(request.worker)
    s, (accepted, cursor) = await asyncio.to_thread(read)
    resp = replay_pb2.StateResponse(
        version=s["version"], accepted=accepted, cursor=cursor, queued=s["queued"],
        leased=s["leased"], leases=s["leases"], consumed=s["consumed"],
        accepted_total=s["accepted_total"], duplicates=s["duplicates"],
        expired_leases=s["expired_leases"], queued_by_version=s["queued_by_version"])
    if s["oldest_queued_version"] is not None:
      resp.oldest_queued_version = s["oldest_queued_version"]
    return resp


class ReplayServer(BackgroundServer):
  """A gRPC server over one `ReplayQueue`; `address` once started."""

  _thread_name = "replay-server"

  def __init__(self, queue: ReplayQueue, host: str = "127.0.0.1", port: int = 0,
               token: str | None = None, vocab_size: int | None = None):
    self.token = auth.server_token(host, token, "pass --token or set $ASEARCHER_TOKEN")
    self.queue, self.host, self.port, self.vocab_size = queue, host, port, vocab_size
    self._grpc: grpc.aio.Server | None = None

  async def start(self) -> None:
    # so_reuseport off: a port another server holds is an error, not silently shared traffic.
    server = grpc.aio.server(interceptors=[auth.grpc_auth_interceptor(self.token)],
                             options=CHANNEL_OPTIONS + [("grpc.so_reuseport", 0)])
    replay_pb2_grpc.add_ReplayServicer_to_server(
        ReplayServicer(self.queue, vocab_size=self.vocab_size), server)
    self.port = auth.bind_grpc(server, self.host, self.port)
    await server.start()
    self._grpc = server
    log.info("replay queue: grpc %s", self.address)

  async def stop(self, grace: float = 1.0) -> None:
    if self._grpc is not None:
      await self._grpc.stop(grace=grace)
      self._grpc = None

  @property
  def address(self) -> str:
    return auth.host_port(self.host, self.port)


async def _serve(server: ReplayServer) -> None:
  stopped = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stopped.set)
  await server.start()
  print(f"replay queue listening on {server.address}", flush=True)
  try:
    await stopped.wait()
  finally:
    await server.stop()


def serve(journal_dir: str | None, host: str = "127.0.0.1", port: int = 0,
          token: str | None = None, compact_bytes: int = 256 << 20,
          vocab_size: int | None = None, max_group_bytes: int = 64 << 20) -> None:
  """Runs a replay queue service until SIGTERM or SIGINT."""
  queue = ReplayQueue(journal_dir, compact_bytes=compact_bytes, max_group_bytes=max_group_bytes)
  server = ReplayServer(queue, host, port, token, vocab_size)
  try:
    asyncio.run(_serve(server))
  finally:
    queue.close()  # a compaction under way finishes first


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m asearcher_jax.replay.server",
                              description="The replay queue between rollout workers and learner.")
  p.add_argument("--journal", help="journal directory (omit: in memory, lost on exit)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
  p.add_argument("--token", default=None, help="bearer token (default $ASEARCHER_TOKEN)")
  p.add_argument("--compact-mb", type=float, default=256.0,
                 help="rewrite the journal once consumed payload in it exceeds this")
  p.add_argument("--vocab-size", type=int, default=None,
                 help="the policy's vocabulary: a group holding another token id is refused")
  p.add_argument("--max-group-mb", type=float, default=64.0,
                 help="a group larger than this is refused")
  args = p.parse_args(argv)
  follow_supervisor()  # a child of `asearcher train` dies with it
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if not args.journal:
    log.warning("no --journal: the queue lives in memory and a restart loses it")
  try:
    serve(args.journal, args.host, args.port, args.token, int(args.compact_mb * (1 << 20)),
          args.vocab_size, int(args.max_group_mb * (1 << 20)))
  except AsearcherError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
