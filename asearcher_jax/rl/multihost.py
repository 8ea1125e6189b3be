"""The learner when its mesh spans several processes (hosts): one learner, many controllers.

Every process runs the same loop on its own shards, so each must train on exactly the same
batch and take exactly the same branches. Process 0 alone talks to the replay queue; what it
leases (or that it stops) is broadcast, every process packs the same batch from it, and each
puts only its own rows on its devices. Acknowledgements and queue state are answered by process
0 for all; lease renewals (a background thread, never a collective) are process 0's alone.
Only process 0 writes metrics and prints.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time

from asearcher_jax import distributed
from asearcher_jax.replay.client import ReplayState, group_from_proto, group_to_proto
from asearcher_jax.replay.protos import replay_pb2
from asearcher_jax.replay.queue import Lease
from asearcher_jax.rl.learner import Learner


def encode_lease(lease: Lease | None) -> bytes:
  if lease is None:
    return b""
  return replay_pb2.LeaseResponse(
      lease_id=lease.lease_id, groups=[group_to_proto(g) for g in lease.groups],
      expires_in_s=max(0.0, lease.expires - time.monotonic())).SerializeToString()


def decode_lease(data: bytes) -> Lease | None:
  if not data:
    return None
  p = replay_pb2.LeaseResponse.FromString(data)
  return Lease(p.lease_id, [group_from_proto(g) for g in p.groups],
               time.monotonic() + p.expires_in_s)


def _state_from_json(data: bytes) -> ReplayState:
  d = json.loads(data)
  d["queued_by_version"] = {int(k): v for k, v in d["queued_by_version"].items()}
  return ReplayState(**d)


class ReplicatedReplay:
  """A replay client for every process of a multi-process learner; only process 0 holds a
  connection (`client` is None elsewhere)."""

  def __init__(self, client):
    if distributed.is_primary() and client is None:
      raise ValueError("process 0 of the learner needs a replay client")
    self.client = client

  def lease(self, count: int, timeout_s: float, wait_s: float = 0.0) -> Lease | None:
    """Process 0's lease; the learner broadcasts it (MultiHostLearner._lease)."""
    if not distributed.is_primary():
      raise RuntimeError("only process 0 leases from the replay queue")
    return self.client.lease(count, timeout_s, wait_s)

  def renew(self, lease_id: str, timeout_s: float) -> bool:
    return self.client.renew(lease_id, timeout_s) if distributed.is_primary() else True

  def ack(self, lease_id: str) -> bool:
    return bool(distributed.on_primary(lambda: self.client.ack(lease_id)))

  def set_version(self, version: int) -> int:
    # through process 0 for all, as ack: its failure must stop every process, not process 0
    # alone while the others wait in the next collective
    return distributed.on_primary(lambda: self.client.set_version(version))

  def state(self, worker: str = "") -> ReplayState:
    return distributed.on_primary(lambda: self.client.state(worker),
                                  encode=lambda s: json.dumps(dataclasses.asdict(s)).encode(),
                                  decode=_state_from_json)

  def close(self) -> None:
    if self.client is not None:
      self.client.close()


class MultiHostLearner(Learner):
  """`Learner` over a mesh that spans processes: process 0 decides, everyone trains."""

  _term = False  # process 0 was asked to stop (SIGTERM, SIGINT): acted on at its next lease

  def _lease(self):
    """Process 0 leases (or gives up, stopping); everyone gets the same answer, or raises
    process 0's error (the others waited in the broadcast for ever when it raised)."""
    lease = distributed.on_primary(super()._lease, encode=encode_lease, decode=decode_lease)
    if lease is None:
      self._stop = True  # process 0 is stopping: so is everyone, at the same step
    return lease

  def _stop_requested(self) -> bool:
    return self._term

  def _on_term(self, signum, frame):
    # Only noted: process 0 must still enter its next lease's broadcast, whose empty answer
    # stops every process at the same step, so all take the final checkpoint (a collective
    # save) together. Leaving its loop at once left the others waiting there for ever.
    if distributed.is_primary():
      self.echo(f"learner: {signal.Signals(signum).name}, finishing the step; every process "
                "checkpoints and stops")
      self._term = True
