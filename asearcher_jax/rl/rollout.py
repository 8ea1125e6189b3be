"""The rollout worker: prompts from a dataset shard, groups of G episodes admitted under the
staleness rule, scored, filtered, and put on the replay queue whole.

A group is put only when all its episodes are done (group-atomic), so a worker that dies
mid-episode leaves nothing half-made behind; its in-flight groups never count as accepted and
a restarted worker recovers its accepted count and data cursor from the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from typing import Any, Sequence

from asearcher_jax.agent import Agent, Trajectory, score
from asearcher_jax.agent.episode import derive_seed
from asearcher_jax.agent.trajectory import INFRA_STATUSES
from asearcher_jax.data.qa import QAItem
from asearcher_jax.errors import AsearcherError
from asearcher_jax.jsonl import append_lines
from asearcher_jax.retry import retrying
from asearcher_jax.reward.scorer import Scorer
from asearcher_jax.rl.admission import AdmissionController
from asearcher_jax.rl.training_log import STARVED_ADVICE, episode_metrics, starved_after

log = logging.getLogger(__name__)

# Groups that abort one after another (a decode or search server down, a token refused): the
# next starts after a pause that doubles from the first to the longest, so a worker does not
# spin through its data logging a warning per prompt; and when every group has aborted for
# GIVE_UP_S the worker stops with an error, which its supervisor (or `wait -n`) sees.
BACKOFF_S = (0.5, 30.0)
GIVE_UP_S = 600.0


class RolloutStalled(AsearcherError):
  """Every group aborted for GIVE_UP_S: the worker cannot make progress."""


class PromptStream:
  """An endless, epoch-shuffled walk over this worker's shard of the questions. `cursor` counts
  questions handed out since the start of training, so it alone fixes the position (and the
  epoch) after a restart."""

  def __init__(self, items: Sequence[QAItem], seed: int = 0, cursor: int = 0):
    if not items:
      raise ValueError("the rollout worker's dataset shard is empty")
    self.items, self.seed, self.cursor = list(items), seed, cursor
    self._epoch, self._order = -1, []

  @property
  def epoch(self) -> int:
    return self.cursor // len(self.items)

  def next(self) -> tuple[int, QAItem]:
    epoch, i = divmod(self.cursor, len(self.items))
    if epoch != self._epoch:
      self._order = list(range(len(self.items)))
      random.Random(f"{self.seed}/{epoch}").shuffle(self._order)
      self._epoch = epoch
    self.cursor += 1
    return self.cursor - 1, self.items[self._order[i]]


@dataclasses.dataclass
class WorkerStats:
  started: int = 0
  accepted: int = 0
  filtered: int = 0  # all rewards equal
  failed: int = 0  # an episode aborted or the group raised
  duplicates: int = 0  # already on the queue (a prompt redone after a restart)
  episodes: int = 0
  status: dict[str, int] = dataclasses.field(default_factory=dict)


class RolloutWorker:
  """`replay` is a ReplayClient (asyncio); `agent` runs episodes; `scorer` gives rewards.

  With `log_path`, every scored group (kept or filtered) appends one line of episode metrics
  there: the learner sees only the groups that pass the filter, whose success is near 0.5 by
  construction, so this log is where the policy's success on its training questions shows."""

  def __init__(self, *, worker: int, workers: int, rl, agent: Agent, scorer: Scorer, replay,
               prompts: PromptStream, poll_s: float = 0.2, seed: int = 0,
               log_path: str | None = None):
    self.worker, self.rl, self.agent, self.scorer = f"w{worker}", rl, agent, scorer
    self.replay, self.prompts, self.poll_s, self.seed = replay, prompts, poll_s, seed
    self.log_path = log_path
    self.admission = AdmissionController.for_worker(rl, worker, workers)
    self.stats = WorkerStats()
    self._in_flight: set[int] = set()  # cursors of the groups still running
    self.version = 0
    # Mean rewards of the groups filtered out since the last one kept: a worker whose groups
    # all score alike feeds the learner nothing, which its log says at each doubling from here.
    self._alike: list[float] = []
    self._warn_at = starved_after(rl)
    # Aborted groups in a row: how many, since when, the last one's time and error.
    self._aborts, self._aborting_since, self._last_abort, self._abort_error = 0, 0.0, 0.0, ""

  def _paused(self) -> bool:
    """Whether aborted groups hold the next start back (their pause not over yet); raises
    RolloutStalled when every group has aborted for GIVE_UP_S."""
    if not self._aborts:
      return False
    now = time.monotonic()
    if now - self._aborting_since >= GIVE_UP_S:
      raise RolloutStalled(f"worker {self.worker}: every group aborted for {GIVE_UP_S:.0f} s "
                           f"({self._aborts} in a row); the last: {self._abort_error}")
    first, longest = BACKOFF_S
    return now < self._last_abort + min(first * 2 ** (self._aborts - 1), longest)

  async def recover(self) -> None:
    """Accepted count and data cursor as the queue recorded them (a restart continues)."""
    state = await self.replay.state(self.worker)
    self.version = int(state.version)
    self.admission.restore(int(state.accepted))
    self.prompts.cursor = max(self.prompts.cursor, int(state.cursor))

  async def run(self, *, max_groups: int | None = None, stop: asyncio.Event | None = None) -> None:
    """Runs until `stop` is set, or until `max_groups` groups are on the queue."""
    await self.recover()
    running: set[asyncio.Task] = set()
    stop = stop or asyncio.Event()
    last_poll = 0.0

    def want_more() -> bool:
      return max_groups is None or self.stats.accepted + len(running) < max_groups

    try:
      while not stop.is_set() and (want_more() or running):
        if time.monotonic() - last_poll >= self.poll_s:
          self.version = int((await self.replay.state(self.worker)).version)
          last_poll = time.monotonic()
        while want_more() and not self._paused() and self.admission.try_start(self.version):
          cursor, item = self.prompts.next()
          self.stats.started += 1
          self._in_flight.add(cursor)
          running.add(asyncio.create_task(self._group(item, cursor, self.version)))
        if running:
          done, running = await asyncio.wait(running, timeout=self.poll_s,
                                             return_when=asyncio.FIRST_COMPLETED)
          for t in done:
            t.result()  # _group handles its own failures; anything else is a bug worth seeing
        else:
          await asyncio.sleep(self.poll_s)
    finally:
      for t in running:
        t.cancel()
      # Wait for the cancelled groups to unwind: their episodes free their decode sessions on
      # the way out, which needs the clients the caller closes once this returns (before,
      # each in-flight group then failed on a closed channel and logged a traceback at every
      # stop).
      await asyncio.gather(*running, return_exceptions=True)

  async def _group(self, item: QAItem, cursor: int, version: int) -> None:
    group_id = f"{self.worker}-{cursor}"
    try:
      tasks = [asyncio.create_task(self._episode(item, group_id, i, version))
               for i in range(self.rl.group_size)]
      try:
        trajs = await asyncio.gather(*tasks)
      except BaseException:  # no episode outlives its group (admission counted the group)
        for t in tasks:
          t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
      for t in trajs:
        self.stats.status[t.status] = self.stats.status.get(t.status, 0) + 1
      self.stats.episodes += len(trajs)
      if any(t.status in INFRA_STATUSES for t in trajs):  # the infrastructure failed it
        self.stats.failed += 1
        self.admission.finish_rejected()
        self._abort_error = next(f"{t.status}: {t.error}" for t in trajs
                                 if t.status in INFRA_STATUSES)
        now = time.monotonic()
        self._aborts, self._last_abort = self._aborts + 1, now
        self._aborting_since = self._aborting_since if self._aborts > 1 else now
        if self._aborts & (self._aborts - 1) == 0:  # the 1st, 2nd, 4th, 8th... in a row
          log.warning("group %s dropped: an episode aborted (%s); %d groups in a row", group_id,
                      self._abort_error, self._aborts)
        return
      self._aborts = 0
      filtered = self.rl.filter_equal_rewards and len({t.reward for t in trajs}) == 1
      if self.log_path:
        append_lines(self.log_path, [{"group": group_id, "version": version,
                                      "filtered": filtered, "time": time.time(),
                                      **episode_metrics(trajs)}])
      if filtered:
        self.stats.filtered += 1
        self.admission.finish_rejected()
        self._alike.append(trajs[0].reward)
        if len(self._alike) >= self._warn_at:
          log.warning("the last %d groups this worker scored were all filtered out, every "
                      "episode of each scoring alike (mean reward %.2f): it gives the learner "
                      "nothing. %s", len(self._alike), sum(self._alike) / len(self._alike),
                      STARVED_ADVICE)
          self._warn_at *= 2
        return
      self._alike, self._warn_at = [], starved_after(self.rl)
      # Where a restart resumes: the first prompt not yet finished. Groups finish out of
      # order, so this group's own `cursor + 1` would skip the prompts still in flight.
      resume = min(self._in_flight - {cursor}, default=self.prompts.cursor)
      record = group_record(group_id, item, version, self.worker, resume, trajs)
      # Puts are idempotent by group id: a retry never doubles. A refusal (ValueError,
      # INVALID_ARGUMENT) is not retried: the same group would be refused again.
      async for attempt in retrying(
          attempts=4, base_s=1.0, max_s=4.0, jitter=False,
          retry_on=lambda e: isinstance(e, Exception) and not isinstance(e, ValueError),
          before_sleep=lambda s: log.warning("put of group %s failed; retrying", group_id,
                                             exc_info=s.outcome.exception())):
        with attempt:
          status = await self.replay.put(record)
      first_try = attempt.retry_state.attempt_number == 1
      if status == "duplicate" and first_try:  # redone after a restart: already queued
        self.stats.duplicates += 1
        self.admission.finish_rejected()
        return
      self.stats.accepted += 1
      self.admission.finish_accepted()
    except asyncio.CancelledError:
      self.admission.finish_rejected()
      raise
    except Exception:  # noqa: BLE001 -- a failed group frees its capacity; the worker goes on
      log.exception("group %s failed", group_id)
      self.stats.failed += 1
      self.admission.finish_rejected()
    finally:
      self._in_flight.discard(cursor)

  async def _episode(self, item: QAItem, group_id: str, i: int, version: int) -> Trajectory:
    seed = derive_seed(self.seed, group_id, i)
    t = await self.agent.run(item, sample=i, group_id=group_id, seed=seed, submit_version=version)
    if t.status not in INFRA_STATUSES:
      await score(t, self.scorer)
    return t


def group_record(group_id: str, item: QAItem, version: int, worker: str, cursor: int,
                 trajs: Sequence[Trajectory]) -> Any:
  from asearcher_jax.replay import Group
  return Group(group_id=group_id, qid=item.qid, submit_version=version, worker=worker,
               cursor=cursor, trajectories=[t.to_record() for t in trajs],
               created=time.time())
