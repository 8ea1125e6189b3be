"""The learner loop: lease B groups, train one decoupled-PPO step, publish the weights, advance
the version clock, checkpoint, and only then acknowledge what was trained.

Exactly-once: leases are acknowledged after the checkpoint that contains their training is on
disk (leases in between are renewed). A learner killed at any point restarts from its last
checkpoint; the queue hands back every group that checkpoint had not absorbed, and the groups
of the checkpoint's own last leases (in case the kill fell between save and ack) are recognised
by id, acknowledged and skipped. So no group is lost and none is trained twice.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np
from flax import nnx

from asearcher_jax import distributed
from asearcher_jax.checkpoint import Checkpointer, abstract_like
from asearcher_jax.models.params import flat_state, param_shardings, state_like
from asearcher_jax.replay.validate import decode_trajectory
from asearcher_jax.retry import retrying_sync
from asearcher_jax.rl.training_log import MetricsWriter, NoMetrics, console_line, episode_metrics

if TYPE_CHECKING:  # annotations only: config.py assembles every section, above this module
  from asearcher_jax.config import Config

log = logging.getLogger(__name__)


class Learner:
  def __init__(self, cfg: Config, *, model, replay, publisher, out_dir: str,
               echo: Callable[[str], None] = print):
    from asearcher_jax.rl.step import make_ppo_step
    from asearcher_jax.train.optimizer import make_optimizer
    self.cfg, self.replay, self.publisher, self.echo = cfg, replay, publisher, echo
    self.model = model
    self.vocab_size = model.cfg.vocab_size
    self.dropped_groups = 0  # leased groups no step used: poison, stale (logged, acknowledged)
    self.mesh = next(iter(jax.tree.leaves(nnx.state(model)))).sharding.mesh
    self.params, self.opt_state, self.step_fn = make_ppo_step(
        model, make_optimizer(cfg.optimizer, cfg.rl.total_updates), cfg.rl)
    ck = cfg.checkpoint
    self.ckpt = Checkpointer(ck.directory or os.path.join(out_dir, "checkpoints"),
                             max_to_keep=ck.max_to_keep, async_save=ck.async_save)
    # one writer of the run's metrics and TensorBoard events, however many processes train
    self.metrics = MetricsWriter(out_dir) if distributed.is_primary() else NoMetrics()
    self.version = 0
    self.step = 0
    self.pending: list[str] = []  # leases trained on since the last checkpoint
    self.pending_groups: list[str] = []
    self.skip: set[str] = set()  # groups the restored checkpoint already trained on
    self._stop = False
    self.saved_step = 0
    self.lease_groups: dict[str, list[str]] = {}  # pending lease -> its group ids
    self._lock = threading.Lock()
    self._held: list[str] = []  # leases to keep renewing
    self._done = threading.Event()

  # -- checkpoints ---------------------------------------------------------------------------
  def _targets(self):
    params_t = abstract_like(flat_state(self.params), param_shardings(self.model, self.mesh))
    opt_t = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                         self.opt_state)
    return params_t, opt_t

  def restore(self) -> bool:
    """Resumes from the latest checkpoint (False: none, a start from step 0). Metrics lines of
    the steps after it are dropped: those steps are trained again, on other groups."""
    if self.ckpt.latest_step() is None:
      self.metrics.rewind(0)
      return False
    params_t, opt_t = self._targets()
    out = self.ckpt.restore(params_target=params_t, opt_state_target=opt_t)
    self.params = state_like(self.params, out["params"])
    self.opt_state = out["opt_state"]
    self.step, self.version = int(out["step"]), int(out["version"])
    meta = out["metadata"]
    self.skip = set(meta.get("last_groups", []))
    # The servers may already have served later versions (published after this checkpoint):
    # the restored weights take a version above all of them, so versions stay monotone and
    # each names one set of weights.
    self.version = max(self.version, self._served()) + 1  # a fresh tag, newer than any served
    self.saved_step = self.step
    self.metrics.rewind(self.step)
    self.echo(f"resumed from step {self.step} (publishing it as version {self.version}); "
              f"{len(self.skip)} groups of its last leases will be skipped if they come back")
    return True

  def checkpoint(self) -> None:
    """Saves (unless nothing was trained since the last save), then acknowledges the leases
    the save absorbed. Group ids whose ack fails (the lease expired, the queue restarted) are
    remembered -- in this and every later checkpoint -- so they are skipped if they return."""
    if self.step != self.saved_step:
      remembered = sorted(set(self.pending_groups) | self.skip)
      self.ckpt.save(self.step, params=flat_state(self.params), opt_state=self.opt_state,
                     version=self.version,
                     metadata={"last_groups": remembered, "time": time.time()})
      self.ckpt.wait()  # on disk before its leases are acknowledged
      self.saved_step = self.step
    for lease in self.pending:
      if not self._ack(lease):
        log.warning("lease %s was lost before its checkpoint was saved; its groups will be "
                    "skipped if they come back", lease)
        self.skip.update(self.lease_groups.get(lease, ()))
      self.lease_groups.pop(lease, None)
    with self._lock:
      self._held = [x for x in self._held if x not in self.pending]
    self.pending, self.pending_groups = [], []

  def _ack(self, lease: str) -> bool:
    try:  # acks are idempotent: retrying after an outage is safe
      for attempt in retrying_sync(attempts=5, base_s=1.0, max_s=30.0, jitter=False):
        with attempt:
          try:
            return self.replay.ack(lease)
          except Exception:  # noqa: BLE001 -- the queue may be restarting
            log.warning("ack of lease %s failed (attempt %d)", lease,
                        attempt.retry_state.attempt_number, exc_info=True)
            raise
    except Exception:  # noqa: BLE001 -- given up: the caller skips the lease's groups
      return False

  def _served(self) -> int:
    """The newest version served: the queue's clock, or above it a version the servers
    committed just before a learner died, its clock not yet moved. The queue is moved up to it,
    so rollouts of the next publication are admitted (a token may be one version ahead)."""
    queue = int(self.replay.state("").version)
    servers = int(self.publisher.served())
    if servers > queue:
      self.replay.set_version(servers)
    return max(queue, servers)

  # -- the loop --------------------------------------------------------------------------------
  def publish(self) -> None:
    t0 = time.perf_counter()
    out = self.publisher.publish(self.version, self.params)
    self.replay.set_version(self.version)
    self.publish_s = time.perf_counter() - t0
    served = [r["version"] for r in out.values() if isinstance(r, dict) and "version" in r]
    self.served_version = min(served) if served else None

  def _lease(self):
    rl = self.cfg.rl
    while not self._stop_requested():
      lease = self.replay.lease(rl.batch_groups, rl.lease_timeout_s, 1.0)
      if lease is not None:
        with self._lock:
          self._held.append(lease.lease_id)
        return lease
    return None

  def _stop_requested(self) -> bool:
    """Whether to give up waiting for a lease and stop."""
    return self._stop

  def _heartbeat(self) -> None:
    """Renews every lease the learner holds (training, or waiting for a checkpoint) well
    before it expires, however long a step or a checkpoint takes."""
    period = self.cfg.rl.lease_timeout_s / 3
    while not self._done.wait(period):
      with self._lock:
        held = list(self._held)
      for lease in held:
        try:
          self.replay.renew(lease, self.cfg.rl.lease_timeout_s)
        except Exception:  # noqa: BLE001 -- the queue may be restarting; try again next beat
          log.warning("could not renew lease %s", lease, exc_info=True)

  def run(self, steps: int | None = None) -> dict[str, Any]:
    """Trains until `rl.total_steps` (or `steps` more); returns the last metrics."""
    from asearcher_jax.rl.batch import build_batch, shard_batch
    rl = self.cfg.rl
    total = rl.total_steps if steps is None else self.step + steps
    if self.version == 0:
      # Restarted before its first checkpoint: the initial weights take a fresh tag above
      # everything served, as restore() gives restored ones (versions only move forward).
      served = self._served()
      if served > 0:
        self.version = served + 1
    if self.version > 0:  # resumed: the servers must serve what the learner holds
      self.publish()
    else:  # a fresh run: the servers load the same initial policy from the same config
      self.replay.set_version(0)
      self.publish_s, self.served_version = 0.0, None
    every = self.cfg.checkpoint.every_steps
    last: dict[str, Any] = {}
    previous = {s: signal.signal(s, self._on_term) for s in (signal.SIGTERM, signal.SIGINT)} \
        if _main_thread() else {}
    self._done.clear()
    beat = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
    beat.start()
    clean = False
    try:
      while self.step < total and not self._stop:
        t0 = time.perf_counter()
        lease = self._lease()
        if lease is None:
          break
        wait_s = time.perf_counter() - t0
        groups, ids = [], []
        for g in lease.groups:
          # Trained already: before a restart (only the ack was lost), or since the last
          # checkpoint under a lease that expired anyway (a stalled process).
          if g.group_id in self.skip or g.group_id in self.pending_groups:
            continue
          try:  # the last line against poison: dropped with its reason, acked with the lease
            trajs = [decode_trajectory(b, f"group {g.group_id} trajectory {i}",
                                       vocab_size=self.vocab_size, max_version=self.version)
                     for i, b in enumerate(g.trajectories)]
          except ValueError as e:
            log.error("dropping a group the learner cannot train on: %s", e)
            self.dropped_groups += 1
            continue
          groups.append(trajs)
          ids.append(g.group_id)
        self.lease_groups[lease.lease_id] = [g.group_id for g in lease.groups]
        batch, info = build_batch(groups, rl, learner_version=self.version) if groups else \
            (None, {"num_tokens": 0})
        if not info["num_tokens"]:
          # Nothing to train on (every group poison, trained already or dropped stale): no
          # step and no new version, which would make the servers swap to the same weights.
          # The lease is acknowledged with the next checkpoint.
          if groups:
            log.warning("lease of groups %s: no loss token to train on (%d dropped stale)",
                        ids, info.get("groups_dropped_stale", 0))
          self.dropped_groups += len(groups)
          self.pending.append(lease.lease_id)
          self.pending_groups.extend(self.lease_groups[lease.lease_id])
          continue
        t1 = time.perf_counter()
        batch = shard_batch(batch, self.mesh)
        self.params, self.opt_state, m = self.step_fn(self.params, self.opt_state, batch)
        m = {k: float(v) for k, v in jax.device_get(m).items() if np.ndim(v) == 0}
        if not m.get("fresh_tokens"):  # no token of this version: the gap is not measured
          m.pop("logp_gap_mean", None), m.pop("logp_gap_max", None)
        if m.get("nonfinite_updates"):
          log.error("step %d: %d update(s) skipped, their loss or gradient not finite "
                    "(groups %s)", self.step + 1, int(m["nonfinite_updates"]), ids)
        train_s = time.perf_counter() - t1
        self.pending.append(lease.lease_id)  # trained: acknowledged with the next checkpoint
        self.pending_groups.extend(g.group_id for g in lease.groups)
        self.step += 1
        self.version += 1
        self.publish()
        trained = info["used"]  # the groups build_batch kept: not those dropped stale
        self.dropped_groups += info["groups_dropped_stale"]
        last = {"version": self.version,
                **episode_metrics([t for i in trained for t in groups[i]]),
                **_batch_info(info), **m,  # the step's num_tokens: those of applied updates
                "dropped_groups": self.dropped_groups, "wait_s": wait_s, "train_s": train_s,
                "publish_s": self.publish_s, "served_version": self.served_version,
                "tokens_per_s": m.get("num_tokens", 0.0) / max(train_s, 1e-9),
                "step_s": time.perf_counter() - t0, "groups": [ids[i] for i in trained]}
        # Before the checkpoint: a kill between the two leaves a line that the restore drops
        # (and trains again), never a checkpointed step without its line.
        self.metrics.write(self.step, last)
        if self.step % every == 0 or self.step >= total:
          self.checkpoint()
        self.echo(console_line(self.step, total, last))
      clean = True
    finally:
      try:
        if clean and self.pending:  # after an error the state may be mid-step: no save
          self.checkpoint()
      finally:
        self._done.set()
        beat.join()
        for s, h in previous.items():
          signal.signal(s, h)
    return last

  def _on_term(self, signum, _frame):
    self.echo(f"learner: {signal.Signals(signum).name}, finishing the step, checkpointing and "
              "stopping")
    self._stop = True

  def close(self) -> None:
    self.ckpt.close()
    self.metrics.close()
    self.publisher.close()


def _main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


def _batch_info(info: dict[str, Any]) -> dict[str, float]:
  out = {}
  for k, v in info.items():
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      out[k] = float(v)
  hist = info.get("staleness_hist") or info.get("staleness")
  if isinstance(hist, dict) and hist:
    n = sum(hist.values())
    out["staleness_mean"] = sum(int(k) * c for k, c in hist.items()) / max(n, 1)
    out["staleness_max"] = float(max(int(k) for k in hist))
  return out
