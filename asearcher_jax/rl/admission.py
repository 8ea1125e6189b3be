"""Admission control for rollouts: AReaL's staleness rule, applied by one rollout worker.

The learner trains on B groups per step at policy version v. A worker whose share of those B
groups is `quota = B · share` may start a new group only while

  accepted + running < (η + v + 1) · quota   and   running < max_concurrent,

so the rollout side never gets more than η steps of data ahead of the learner (η = 0 is
synchronous RL: exactly B groups per version, all sampled by the weights they train). `accepted`
counts every group this worker ever put on the replay queue, consumed or not. Groups the dynamic
filter rejected, that failed, or that the consumer dropped as stale do not count, so they free
capacity; otherwise each lost group would shrink the budget for good and the learner, which
needs (v + 1) · B consumed groups to reach v + 1, would starve once more than η · B were lost.

What the rule bounds is the consumed staleness *if* the consumer takes groups in non-decreasing
submit version, waiting for an older group still in flight: at most (η + a + 1) · B accepted
groups have submit version ≤ a, so one of them is trained by step a + η at the latest
(the paper's ⌊(N_r − 1)/B⌋ ≤ v + η). It is not a per-trajectory bound on its own: a queue that
serves only finished groups lets a straggler be overtaken and trained arbitrarily late (AReaL
PR #1722), which is why the learner also has a consume-time guard (`rl.max_token_staleness`).
A group that guard drops must come back through `drop_accepted`. tests/test_admission.py
checks these statements by simulation.
"""

from __future__ import annotations

import math
import numbers
import threading
from typing import Any


def _int(name: str, value: Any, lo: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if value < lo:
    raise ValueError(f"{name} must be >= {lo}, got {value}")
  return int(value)


class AdmissionController:
  """The staleness rule for one rollout worker; thread-safe (one lock, no blocking calls)."""

  def __init__(self, batch_groups: int, eta: int, max_concurrent: int, share: float = 1.0):
    self.batch_groups = _int("batch_groups", batch_groups, 1)
    self.eta = _int("eta", eta, 0)
    self.max_concurrent = _int("max_concurrent", max_concurrent, 1)
    if isinstance(share, bool) or not isinstance(share, numbers.Real) or \
        not 0 < float(share) <= 1:
      raise ValueError(f"share must be a number in (0, 1], got {share!r}")
    self.share = float(share)
    # A whole number of groups per step, so that the workers' quotas add up to exactly B:
    # fewer would starve the learner at eta = 0, more would break the bound.
    exact = self.batch_groups * self.share
    self.quota = round(exact)
    if self.quota < 1 or not math.isclose(exact, self.quota, rel_tol=0, abs_tol=1e-6):
      raise ValueError(
          f"batch_groups * share must be a whole number >= 1 of groups per step, got "
          f"{self.batch_groups} * {share!r} = {exact:g}; give workers uneven shares "
          f"(see AdmissionController.for_worker)")
    self._lock = threading.Lock()
    self._accepted = 0
    self._running = 0
    self._rejected = 0  # filtered or failed (statistics only)
    self._dropped = 0  # accepted, then dropped as stale by the consumer (statistics only)

  @classmethod
  def for_worker(cls, rl: Any, worker: int, num_workers: int) -> AdmissionController:
    """Worker `worker` of `num_workers` under an RLSection: B split as evenly as whole groups
    allow (B = 8 over 3 workers gives 3, 3, 2), max_concurrent_groups per worker."""
    n = _int("num_workers", num_workers, 1)
    i = _int("worker", worker, 0)
    if i >= n:
      raise ValueError(f"worker must be < num_workers ({n}), got {i}")
    b = rl.batch_groups
    if b < n:
      raise ValueError(f"batch_groups ({b}) < num_workers ({n}): some worker would get no "
                       f"groups per step; use fewer workers or a larger batch")
    quota = b // n + (i < b % n)
    return cls(b, rl.max_head_offpolicyness, rl.max_concurrent_groups, share=quota / b)

  def limit(self, version: int) -> int:
    """accepted + running may not reach this at `version`."""
    return (self.eta + _int("version", version, 0) + 1) * self.quota

  def _capacity(self, version: int) -> int:
    by_staleness = self.limit(version) - self._accepted - self._running
    return max(0, min(self.max_concurrent - self._running, by_staleness))

  def capacity(self, version: int) -> int:
    """How many more groups may start now, at learner version `version`."""
    with self._lock:
      return self._capacity(version)

  def try_start(self, version: int) -> bool:
    """Admit one group if the rule allows (running += 1). The caller tags it with `version`."""
    with self._lock:
      if self._capacity(version) <= 0:
        return False
      self._running += 1
      return True

  def _finish(self, what: str) -> None:
    if self._running <= 0:
      raise RuntimeError(f"{what}() without a running group (a finish called twice?)")
    self._running -= 1

  def finish_accepted(self) -> None:
    """The group reached the replay queue: it now counts against the budget for good."""
    with self._lock:
      self._finish("finish_accepted")
      self._accepted += 1

  def finish_rejected(self) -> None:
    """The group was filtered out, failed or was cancelled: its capacity is free again."""
    with self._lock:
      self._finish("finish_rejected")
      self._rejected += 1

  def drop_accepted(self, n: int = 1) -> None:
    """`n` accepted groups were dropped unused (stale at consume time): free their capacity.
    The replay queue's per-worker record that `restore` reads must leave them out as well."""
    n = _int("n", n, 1)
    with self._lock:
      if n > self._accepted:
        raise ValueError(f"cannot drop {n} groups: only {self._accepted} accepted")
      self._accepted -= n
      self._dropped += n

  def restore(self, accepted: int) -> None:
    """After a worker restart: `accepted` as the replay queue recorded it for this worker.
    Running restarts at 0, since a dead worker's in-flight groups were never put. Without
    this, a restored version with accepted = 0 lets the worker run (v + η + 1) · quota groups
    ahead and staleness grows without bound (AReaL #1388)."""
    accepted = _int("accepted", accepted, 0)
    with self._lock:
      if self._running:
        raise RuntimeError(f"restore() with {self._running} groups running: it is meant for a "
                           f"fresh controller after a restart")
      self._accepted = accepted

  def state(self) -> dict[str, Any]:
    with self._lock:
      return {"accepted": self._accepted, "running": self._running,
              "rejected": self._rejected, "dropped": self._dropped,
              "batch_groups": self.batch_groups, "quota": self.quota, "share": self.share,
              "eta": self.eta, "max_concurrent": self.max_concurrent}
