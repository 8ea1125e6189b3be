"""The staleness rule: hand-worked capacities, and a discrete-event simulation of rollout workers,
a replay queue and a learner that checks what the rule does and does not guarantee."""

from __future__ import annotations

import heapq
import math
import random
import threading
from collections import Counter
from dataclasses import dataclass

import pytest

from asearcher_jax.rl.admission import AdmissionController
from asearcher_jax.rl.config import RLSection

# ---------------------------------------------------------------------------------- unit tests


def test_capacity_by_version_hand_worked():
  c = AdmissionController(batch_groups=4, eta=2, max_concurrent=100)
  assert [c.capacity(v) for v in range(3)] == [12, 16, 20]  # (η + v + 1) · B
  assert all(c.try_start(0) for _ in range(12))
  assert not c.try_start(0) and c.capacity(0) == 0
  for _ in range(12):
    c.finish_accepted()
  assert c.capacity(0) == 0  # accepted groups keep counting: the learner has not caught up
  assert c.capacity(1) == 4  # one learner step later: B more
  assert all(c.try_start(1) for _ in range(4)) and not c.try_start(1)
  assert c.capacity(2) == 4 and c.capacity(5) == 16
  assert c.state() == {"accepted": 12, "running": 4, "rejected": 0, "dropped": 0,
                       "batch_groups": 4, "quota": 4, "share": 1.0, "eta": 2,
                       "max_concurrent": 100}


def test_concurrency_cap():
  c = AdmissionController(4, 2, max_concurrent=5)
  assert c.capacity(0) == 5
  assert all(c.try_start(0) for _ in range(5)) and not c.try_start(0)
  assert c.capacity(100) == 0  # staleness room, but no free slot
  c.finish_accepted()
  assert c.capacity(0) == 1
  c.finish_rejected()
  assert c.capacity(0) == 2


def test_eta0_is_exactly_b_per_version():
  c = AdmissionController(4, 0, max_concurrent=100)
  for v in range(5):
    started = 0
    while c.try_start(v):
      started += 1
    assert started == 4  # no more until the learner has trained on these four
    for _ in range(4):
      c.finish_accepted()
    assert c.capacity(v) == 0


def test_rejected_and_failed_groups_free_capacity():
  c = AdmissionController(4, 2, max_concurrent=100)
  assert all(c.try_start(0) for _ in range(12))
  for _ in range(3):  # dynamic filter (all rewards equal), a failure, a cancellation
    c.finish_rejected()
  assert c.capacity(0) == 3
  for _ in range(9):
    c.finish_accepted()
  assert c.capacity(0) == 3
  c.drop_accepted(2)  # the consumer dropped two as stale: they free capacity as well
  assert c.capacity(0) == 5
  assert {k: c.state()[k] for k in ("accepted", "running", "rejected", "dropped")} == \
      {"accepted": 7, "running": 0, "rejected": 3, "dropped": 2}


def test_restore_after_restart():
  # The learner is at version 5; the queue recorded 20 groups from this worker before it died.
  c = AdmissionController(4, 2, max_concurrent=100)
  c.restore(20)
  assert c.state()["running"] == 0
  assert c.capacity(5) == (2 + 5 + 1) * 4 - 20 == 12
  # Without restore the worker would see (η + v + 1)·B = 32 free slots: AReaL #1388.
  assert AdmissionController(4, 2, max_concurrent=100).capacity(5) == 32
  assert c.try_start(5)
  with pytest.raises(RuntimeError, match="running"):
    c.restore(20)


def test_share_for_several_workers():
  c = AdmissionController(8, 1, max_concurrent=100, share=0.25)
  assert c.quota == 2 and c.capacity(0) == 4 and c.capacity(3) == 10
  rl = RLSection(batch_groups=8, max_head_offpolicyness=1, max_concurrent_groups=5)
  workers = [AdmissionController.for_worker(rl, i, 3) for i in range(3)]
  assert [w.quota for w in workers] == [3, 3, 2]
  assert sum(w.limit(4) for w in workers) == (1 + 4 + 1) * 8  # the workers add up to the rule
  assert all(w.max_concurrent == 5 and w.eta == 1 for w in workers)
  with pytest.raises(ValueError, match="whole number"):
    AdmissionController(8, 1, 10, share=1 / 3)
  with pytest.raises(ValueError, match="num_workers"):
    AdmissionController.for_worker(rl, 0, 9)
  with pytest.raises(ValueError, match="worker must be"):
    AdmissionController.for_worker(rl, 3, 3)


@pytest.mark.parametrize("kwargs, error", [
    (dict(batch_groups=0), ValueError), (dict(batch_groups=-2), ValueError),
    (dict(batch_groups=1.5), TypeError), (dict(batch_groups=True), TypeError),
    (dict(eta=-1), ValueError), (dict(eta=None), TypeError),
    (dict(max_concurrent=0), ValueError), (dict(share=0.0), ValueError),
    (dict(share=1.5), ValueError), (dict(share=math.nan), ValueError),
    (dict(share="1"), ValueError), (dict(batch_groups=4, share=0.1), ValueError),
])
def test_bad_arguments(kwargs, error):
  args = dict(batch_groups=4, eta=2, max_concurrent=8) | kwargs
  with pytest.raises(error):
    AdmissionController(**args)


def test_bad_calls():
  c = AdmissionController(4, 2, 8)
  for bad in (-1, 1.0, None):
    with pytest.raises((TypeError, ValueError)):
      c.capacity(bad)
  with pytest.raises(RuntimeError, match="without a running group"):
    c.finish_accepted()
  with pytest.raises(RuntimeError, match="without a running group"):
    c.finish_rejected()
  with pytest.raises(ValueError, match="only 0 accepted"):
    c.drop_accepted()
  with pytest.raises(ValueError):
    c.restore(-1)


def test_thread_safe_admission():
  c = AdmissionController(16, 3, max_concurrent=10_000)
  admitted = []

  def worker():
    n = 0
    for _ in range(200):
      if c.try_start(0):
        n += 1
        c.finish_accepted() if n % 2 else c.finish_rejected()
    admitted.append(n)

  threads = [threading.Thread(target=worker) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  s = c.state()
  assert s["running"] == 0 and s["accepted"] + s["rejected"] == sum(admitted)
  assert s["accepted"] <= 64 and c.capacity(0) == 64 - s["accepted"]


def test_admission_alone_does_not_bound_a_straggler():
  """B = 1, η = 1: g starts at version 0 and never finishes, yet the learner advances forever
  on younger groups, so a queue that serves only finished groups would train g arbitrarily
  late. The rule bounds how far rollout runs ahead, not each trajectory (AReaL PR #1722)."""
  c = AdmissionController(1, 1, max_concurrent=2)
  assert c.try_start(0)  # g, the straggler
  for v in range(50):
    assert c.try_start(v)  # the group the learner trains on at step v
    c.finish_accepted()
  assert c.state()["running"] == 1  # g still running; had it finished now: staleness 49 > η


# ---------------------------------------------------------------------------------- simulation
#
# Discrete events: workers start groups of G episodes whenever their controller admits one; an
# episode is a heavy-tailed number of turns (Pareto), each turn generates tokens tagged with the
# policy version current when the turn starts (weights change only between turns) and then
# waits on a tool with lognormal latency. A finished group is rejected by the dynamic filter
# with probability p_reject, else put on the replay queue, which serves the oldest submit
# version first. The learner takes B groups, trains for a random time and bumps the version.
#
# Two queue behaviours: `wait_for_older` holds back a group while any older group (lower submit
# version) is still running, the order under which the rule is a theorem; without it the queue
# serves finished groups only (what a plain queue does). `guard` is the learner's consume-time
# check: a group whose oldest token is older than v − η is dropped and (if release_dropped)
# handed back to its worker's controller with drop_accepted.


@dataclass(eq=False)
class _Group:
  worker: int
  incarnation: int  # the worker's life it belongs to: a crash kills its running groups
  submit: int  # learner version at admission
  seq: int
  left: int  # episodes still running
  vmin: int = 1 << 30  # oldest token version
  vmax: int = -1  # newest token version
  tokens: int = 0


def simulate(seed, *, eta, steps=60, B=4, workers=1, max_concurrent=None, G=4, p_reject=0.25,
             step_mean=3.0, wait_for_older=True, guard=False, release_dropped=True,
             crash_at=None, restore_accepted=True):
  rng = random.Random(seed)
  rl = RLSection(batch_groups=B, max_head_offpolicyness=eta,
                 max_concurrent_groups=max_concurrent or 3 * B // workers)
  ctl = [AdmissionController.for_worker(rl, w, workers) for w in range(workers)]
  life = [0] * workers
  record = [0] * workers  # the replay queue's per-worker count of accepted (and not dropped)
  running = Counter()  # submit version -> running groups (what wait_for_older looks at)
  live = set()  # running groups
  queue = []  # (submit, seq, group)
  events = []  # (time, seq, kind, payload)
  seq = 0
  now, version, trained, dropped, consumed = 0.0, 0, False, 0, 0
  batch, staleness, token_ages = [], Counter(), Counter()

  def push(t, kind, payload=None):
    nonlocal seq
    seq += 1
    heapq.heappush(events, (t, seq, kind, payload))

  def turn_time():
    return 0.3 * rng.lognormvariate(0, 0.5) + 0.5 * rng.lognormvariate(-0.5, 1.2)

  def pump():
    nonlocal trained, dropped
    for w, c in enumerate(ctl):
      while c.try_start(version):
        g = _Group(w, life[w], version, seq, G)
        running[version] += 1
        live.add(g)
        for _ in range(G):  # an episode: Pareto turns (ASearcher caps them at 32)
          push(now, "turn", (g, min(32, int(rng.paretovariate(1.2)))))
    while not trained and queue:
      oldest_running = min((v for v, n in running.items() if n), default=1 << 30)
      if wait_for_older and oldest_running < queue[0][0]:
        break  # an older group may still come: the learner waits for it
      _, _, g = heapq.heappop(queue)
      if guard and version - g.vmin > eta:
        dropped += 1
        record[g.worker] -= 1
        if release_dropped and g.incarnation == life[g.worker]:
          ctl[g.worker].drop_accepted()
        continue
      batch.append(g)
      if len(batch) == B:
        for b in batch:
          staleness[version - b.submit] += 1
          token_ages[version - b.vmin] += b.tokens  # the oldest tokens bound all of them
          assert eta > 0 or b.vmin == b.vmax == version, "η = 0 must train on-policy"
        trained = True
        push(now + step_mean * rng.uniform(0.5, 1.5), "step")

  if crash_at is not None:
    push(crash_at, "crash")
  pump()
  while events and consumed < steps:
    now, _, kind, payload = heapq.heappop(events)
    if kind == "step":
      version, trained, consumed = version + 1, False, consumed + 1
      batch.clear()
    elif kind == "crash":  # worker 0 dies: its running groups vanish, a new one restores
      life[0] += 1
      for g in [g for g in live if g.worker == 0]:
        live.discard(g)
        running[g.submit] -= 1
      ctl[0] = AdmissionController.for_worker(rl, 0, workers)
      if restore_accepted:
        ctl[0].restore(record[0])
    else:  # a turn of an episode starts: its tokens carry the version of this moment
      g, turns_left = payload
      if g.incarnation != life[g.worker]:
        continue
      if turns_left:
        g.vmin, g.vmax = min(g.vmin, version), max(g.vmax, version)
        g.tokens += rng.randint(20, 400)
        push(now + turn_time(), "turn", (g, turns_left - 1))
        continue
      g.left -= 1
      if g.left:
        continue
      running[g.submit] -= 1
      live.discard(g)
      if rng.random() < p_reject:
        ctl[g.worker].finish_rejected()
      else:
        ctl[g.worker].finish_accepted()
        record[g.worker] += 1
        heapq.heappush(queue, (g.submit, g.seq, g))
    pump()
  return dict(steps=consumed, time=now, deadlock=consumed < steps, dropped=dropped,
              max_staleness=max(staleness, default=0), max_token_age=max(token_ages, default=0),
              staleness=staleness)


SEEDS = range(30)


@pytest.mark.parametrize("eta, workers", [(0, 1), (1, 1), (2, 2), (4, 1), (4, 3)])
def test_sim_bound_holds_when_consumption_follows_submit_order(eta, workers):
  """(1) every consumed group has submit version >= v − η, so every loss token too; (2) at
  η = 0 every token has exactly the learner's version (asserted inside); (3) no deadlock."""
  B = 6 if workers > 1 else 4
  worst = 0
  for seed in SEEDS:
    r = simulate(seed, eta=eta, B=B, workers=workers)
    assert not r["deadlock"], (seed, r)
    assert r["max_staleness"] <= eta and r["max_token_age"] <= eta, (seed, r)
    worst = max(worst, r["max_staleness"])
  print(f"eta={eta} workers={workers}: max staleness over {len(SEEDS)} seeds = {worst}")


def test_sim_eta0_on_policy_with_a_plain_queue():
  """At η = 0 nothing runs across a step, so even a queue that does not wait is on-policy."""
  for seed in SEEDS:
    r = simulate(seed, eta=0, wait_for_older=False)
    assert not r["deadlock"] and r["max_token_age"] == 0 and r["dropped"] == 0


def test_sim_plain_queue_exceeds_the_bound_and_the_guard_restores_it():
  """Serving finished groups only, stragglers are overtaken and trained late (the rule is a
  rate limiter); the consume-time guard drops them, and with drop_accepted nothing deadlocks."""
  plain = [simulate(s, eta=2, wait_for_older=False) for s in SEEDS]
  over = max(r["max_staleness"] for r in plain)
  assert not any(r["deadlock"] for r in plain)
  assert over > 2  # found: a heavy-tailed straggler trained more than η steps late
  guarded = [simulate(s, eta=2, wait_for_older=False, guard=True) for s in SEEDS]
  assert not any(r["deadlock"] for r in guarded)
  assert max(r["max_token_age"] for r in guarded) <= 2
  drops = sum(r["dropped"] for r in guarded)
  frac = drops / (drops + len(SEEDS) * 60 * 4)
  print(f"plain queue, eta=2: max staleness {over}; the guard drops {frac:.1%} of the groups")


def test_sim_drops_that_do_not_free_capacity_leak_the_budget():
  """Why drop_accepted exists: stale drops that keep counting as accepted eat the η·B of
  headroom; after η·B of them the worker is silently synchronous (one more would stall it)."""
  kw = dict(eta=1, steps=150, wait_for_older=False, guard=True)
  leaky = [simulate(s, release_dropped=False, **kw) for s in range(10)]
  freed = [simulate(s, **kw) for s in range(10)]
  assert not any(r["deadlock"] for r in leaky + freed)
  assert all(r["dropped"] <= 1 * 4 for r in leaky)
  assert sum(r["dropped"] for r in freed) > 10 * 4  # the guard keeps dropping, and may
  ratio = sum(r["time"] for r in leaky) / sum(r["time"] for r in freed)
  print(f"eta=1: leaking drops makes the run {ratio:.1f}x slower")
  assert ratio > 2


def test_sim_liveness_under_heavy_rejection():
  for seed in range(10):
    for eta in (0, 3):
      r = simulate(seed, eta=eta, steps=20, p_reject=0.9)
      assert not r["deadlock"] and r["max_staleness"] <= eta


def test_sim_eta_buys_throughput_on_long_tails():
  """(4) The same number of learner steps takes less simulated time at η = 4 than at η = 0."""
  t0 = sum(simulate(s, eta=0)["time"] for s in SEEDS)
  t4 = sum(simulate(s, eta=4)["time"] for s in SEEDS)
  t4_plain = sum(simulate(s, eta=4, wait_for_older=False, guard=True)["time"] for s in SEEDS)
  print(f"time eta=4 / eta=0: {t4 / t0:.2f} (ordered queue), {t4_plain / t0:.2f} (plain + guard)")
  assert t4 < 0.8 * t0 and t4_plain < 0.8 * t0


def test_sim_restart_keeps_the_bound_only_with_restore():
  """A worker dies mid-run and comes back: restoring accepted from the queue's record keeps the
  bound; starting from accepted = 0 at the current version does not (AReaL #1388)."""
  kw = dict(eta=1, B=6, workers=2, steps=80, step_mean=6.0, crash_at=60.0)
  for seed in range(10):
    r = simulate(seed, **kw)
    assert not r["deadlock"] and r["max_staleness"] <= 1, (seed, r)
  worst = max(simulate(s, restore_accepted=False, **kw)["max_staleness"] for s in range(10))
  print(f"restart without restore: max staleness {worst} (bound 1)")
  assert worst > 1
