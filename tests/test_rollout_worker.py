"""The rollout worker on its own (agent, scorer and queue faked): groups whose rewards are all
equal are filtered, mixed ones are put whole, and every scored group, filtered or not, is logged
for the learning curve."""

import asyncio
import logging
import types

import pytest

from asearcher_jax.agent import Trajectory
from asearcher_jax.data.qa import QAItem
from asearcher_jax.jsonl import Follower, append_lines
from asearcher_jax.reward.scorer import Score
from asearcher_jax.rl.config import RLSection
from asearcher_jax.rl.plot import by_version, plot_metrics
from asearcher_jax.rl.rollout import PromptStream, RolloutWorker
from asearcher_jax.rl.training_log import (
  RolloutLogs,
  read_rollout_logs,
  rollout_log_path,
  starved,
)


class Agent:
  """Answers `q-right` right every time, `q-wrong` wrong every time, `q-mixed` right in even
  samples only."""

  async def run(self, item, *, sample, group_id, seed, submit_version):
    right = item.qid == "q-right" or (item.qid == "q-mixed" and sample % 2 == 0)
    return Trajectory(qid=item.qid, question=item.question, answers=list(item.answers),
                      group_id=group_id, sample=sample, status="answered",
                      prediction=item.answers[0] if right else "nobody",
                      submit_version=submit_version)


class Scorer:
  async def score(self, *, prediction, answers, **_):
    em = float(prediction in answers)
    return Score(reward=em, metrics={"em": em})


class Replay:
  def __init__(self):
    self.groups = []

  async def state(self, worker):
    return types.SimpleNamespace(version=3, accepted=len(self.groups), cursor=0)

  async def put(self, group):
    self.groups.append(group)
    return "accepted"


def test_equal_reward_groups_are_filtered_and_every_scored_group_is_logged(tmp_path):
  items = [QAItem(qid=q, question=f"{q}?", answers=("Ada",))
           for q in ("q-right", "q-mixed", "q-wrong")]
  replay = Replay()
  log = rollout_log_path(str(tmp_path), 0)
  rl = RLSection(group_size=4, batch_groups=2, max_head_offpolicyness=100)
  w = RolloutWorker(worker=0, workers=1, rl=rl, agent=Agent(), scorer=Scorer(), replay=replay,
                    prompts=PromptStream(items, seed=0), poll_s=0.01, log_path=log)
  # max_groups counts accepted groups: two mixed ones take two passes over the three questions.
  asyncio.run(w.run(max_groups=2))

  assert [g.qid for g in replay.groups] == ["q-mixed", "q-mixed"]
  assert all(len(g.trajectories) == 4 for g in replay.groups)
  assert w.stats.filtered >= 3 and w.stats.accepted == 2
  rows = read_rollout_logs(str(tmp_path))
  assert len(rows) == w.stats.accepted + w.stats.filtered  # every scored group, once
  by_kind = {(r["filtered"], r["success"]) for r in rows}
  assert by_kind == {(True, 1.0), (True, 0.0), (False, 0.5)}
  assert all(r["version"] == 3 and r["group"].startswith("w0-") for r in rows)
  # The curve's "all groups" line is the plain success over them, not the filtered 0.5.
  assert by_version(rows, "success") == ([3], [sum(r["success"] for r in rows) / len(rows)])
  png = tmp_path / "curve.png"
  assert plot_metrics([{"step": 1, "success": 0.5, "reward": 0.5}], str(png), title="t",
                      rollouts=rows) == str(png)
  assert png.read_bytes()[:4] == b"\x89PNG"


def score_groups(tmp_path, qids, count):
  """The worker's log after it has scored `count` groups of `qids` (filtered or not)."""
  items = [QAItem(qid=q, question=f"{q}?", answers=("Ada",)) for q in qids]
  rl = RLSection(group_size=4, batch_groups=2, max_head_offpolicyness=100)
  w = RolloutWorker(worker=0, workers=1, rl=rl, agent=Agent(), scorer=Scorer(), replay=Replay(),
                    prompts=PromptStream(items, seed=0), poll_s=0.01,
                    log_path=rollout_log_path(str(tmp_path), 0))

  async def main():
    stop = asyncio.Event()
    run = asyncio.create_task(w.run(stop=stop))
    while w.stats.filtered + w.stats.accepted < count and not run.done():
      await asyncio.sleep(0.01)
    stop.set()
    await run

  asyncio.run(main())
  return read_rollout_logs(str(tmp_path))


def test_a_run_whose_groups_are_all_filtered_is_told_why_it_gets_no_data(tmp_path, caplog):
  """The supervisor's console line while no step comes: every group scored since the last step
  filtered out (a policy that always fails), at least `least` of them; and the worker's own log
  line (multi-host launches run workers without the supervisor), at 16 groups in a row."""
  with caplog.at_level(logging.WARNING, logger="asearcher_jax.rl.rollout"):
    rows = score_groups(tmp_path / "wrong", ["q-wrong"], 20)
  assert len(rows) >= 20 and all(r["filtered"] for r in rows)
  notes = [r.getMessage() for r in caplog.records]
  counts = [16 * 2 ** i for i in range(8) if 16 * 2 ** i <= len(rows)]  # at each doubling
  assert [n.split(" groups")[0] for n in notes] == [f"the last {c}" for c in counts]
  assert "this worker scored were all filtered out" in notes[0]
  assert "mean reward 0.00" in notes[0] and "rl.filter_equal_rewards=false" in notes[0]
  note = starved(rows, since=0.0, least=16)
  assert note is not None and f"the last {len(rows)} groups" in note
  assert "mean reward 0.00, success 0.00" in note and "rl.filter_equal_rewards=false" in note
  assert starved(rows, since=0.0, least=len(rows) + 1) is None  # not yet enough of them
  assert starved(rows, since=rows[-1]["time"] + 1, least=1) is None  # none since the last step
  # One group the learner could use among them: it is not starved.
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="asearcher_jax.rl.rollout"):
    mixed = score_groups(tmp_path / "mixed", ["q-wrong", "q-wrong", "q-mixed", "q-wrong"], 20)
  assert any(not r["filtered"] for r in mixed) and starved(mixed, since=0.0, least=16) is None
  assert not caplog.records  # a usable group every four: the worker is not starved either


def test_the_supervisor_reads_each_log_line_once_and_only_when_complete(tmp_path):
  """What `asearcher train` polls (metrics.jsonl, every worker's group log) it reads from where
  it stopped: each line once, a line still being written when it is done, a torn one never."""
  path = str(tmp_path / "metrics.jsonl")
  follow = Follower(path)
  assert follow.read() == []  # not written yet
  append_lines(path, [{"step": 1}, {"step": 2}])
  with open(path, "a") as f:
    f.write('{"step": 3, "lo')  # the learner mid-write
  assert follow.read() == [{"step": 1}, {"step": 2}]
  with open(path, "a") as f:
    f.write('ss": 0.5}\n')
  assert follow.read() == [{"step": 3, "loss": 0.5}] and follow.read() == []
  with open(path, "a") as f:
    f.write('{"step": 4, "lo')  # a crash mid-write; the restarted learner cuts it off
  append_lines(path, [{"step": 4}])
  assert follow.read() == [{"step": 4}]
  with open(path, "a") as f:
    f.write("{bad\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl:5: unreadable line"):
    follow.read()

  rows = score_groups(tmp_path / "run", ["q-mixed", "q-wrong"], 6)
  logs = RolloutLogs(str(tmp_path / "run"))
  assert logs.update() == rows
  more = score_groups(tmp_path / "run", ["q-right"], 3)  # appended to the same worker's log
  assert logs.update() == more == read_rollout_logs(str(tmp_path / "run"))
  assert len(more) > len(rows)


class FlakyReplay(Replay):
  """Fails the first puts with the given errors, then answers `status`."""

  def __init__(self, fails, status="accepted"):
    super().__init__()
    self.fails, self.status, self.calls = list(fails), status, 0

  async def put(self, group):
    self.calls += 1
    if self.fails:
      raise self.fails.pop(0)
    self.groups.append(group)
    return self.status


def test_put_retries_transient_errors_but_not_refusals(monkeypatch):
  sleeps = []

  async def fake_sleep(s):
    sleeps.append(s)

  monkeypatch.setattr(asyncio, "sleep", fake_sleep)
  item = QAItem(qid="q-mixed", question="q-mixed?", answers=("Ada",))

  def put_once(replay):
    sleeps.clear()
    w = RolloutWorker(worker=0, workers=1, rl=RLSection(group_size=2, batch_groups=1),
                      agent=Agent(), scorer=Scorer(), replay=replay,
                      prompts=PromptStream([item], seed=0), poll_s=0.01)
    assert w.admission.try_start(3)
    asyncio.run(w._group(item, 0, 3))
    s = w.stats
    return replay.calls, list(sleeps), (s.accepted, s.duplicates, s.failed)

  # a duplicate on the first try was queued before a restart; after a retry it is our own put
  assert put_once(FlakyReplay([], "duplicate")) == (1, [], (0, 1, 0))
  assert put_once(FlakyReplay([OSError()], "duplicate")) == (2, [1.0], (1, 0, 0))
  assert put_once(FlakyReplay([ValueError("refused")])) == (1, [], (0, 0, 1))
  assert put_once(FlakyReplay([OSError()] * 4)) == (4, [1.0, 2.0, 4.0], (0, 0, 1))


class SlowAgent:
  """Episodes that run until cancelled, holding a decode session they end on the way out,
  over a client that refuses calls once it is closed (as gRPC's does)."""

  def __init__(self):
    self.started, self.ended, self.closed = 0, 0, False

  async def run(self, item, *, sample, group_id, seed, submit_version):
    self.started += 1
    try:
      await asyncio.Event().wait()
    finally:
      if self.closed:
        raise RuntimeError("Channel is closed.")
      await asyncio.sleep(0)  # an RPC
      self.ended += 1


def test_a_stopped_worker_ends_its_episodes_sessions_before_it_returns(caplog):
  items = [QAItem(qid=f"q{i}", question=f"q{i}?", answers=("Ada",)) for i in range(3)]
  agent = SlowAgent()
  w = RolloutWorker(worker=0, workers=1, rl=RLSection(group_size=2, batch_groups=2),
                    agent=agent, scorer=Scorer(), replay=Replay(),
                    prompts=PromptStream(items, seed=0), poll_s=0.01)

  async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, stop.set)
    await w.run(stop=stop)
    agent.closed = True  # what the caller does next: close the decode client
    await asyncio.sleep(0.05)

  asyncio.run(main())
  assert agent.started > 0 and agent.ended == agent.started
  assert w.stats.failed == 0 and "failed" not in caplog.text


class DeadDecodeAgent:
  """Every episode aborts at once, as with a decode server that is down."""

  async def run(self, item, *, sample, group_id, seed, submit_version):
    await asyncio.sleep(0)
    return Trajectory(qid=item.qid, question=item.question, answers=list(item.answers),
                      group_id=group_id, sample=sample, status="aborted",
                      error="decode server 127.0.0.1:1: UNAVAILABLE",
                      submit_version=submit_version)


def test_groups_that_keep_aborting_back_off_and_then_stop_the_worker(monkeypatch, caplog):
  """A worker whose every episode aborts started its next group at once: thousands a second,
  a warning each, its data shard run through many times, and no exit anyone would see. The
  pause after each aborted group doubles, and after rollout.GIVE_UP_S of nothing but aborts
  the worker stops with an error."""
  from asearcher_jax.rl import rollout
  items = [QAItem(qid=f"q{i}", question="?", answers=("a",)) for i in range(500)]

  def worker():
    return RolloutWorker(worker=0, workers=1, rl=RLSection(group_size=2, batch_groups=2),
                         agent=DeadDecodeAgent(), scorer=Scorer(), replay=Replay(),
                         prompts=PromptStream(items), poll_s=0.01)

  async def for_a_while(w, seconds):
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    await w.run(stop=stop)

  w = worker()
  with caplog.at_level(logging.WARNING):
    asyncio.run(for_a_while(w, 1.2))
  # The first groups admitted together, then one after pauses of 0.5 s (and 1 s): a handful.
  assert 0 < w.stats.failed == w.stats.started < 20 and w.prompts.cursor < 20
  assert len(caplog.records) <= 5 and "groups in a row" in caplog.text

  monkeypatch.setattr(rollout, "BACKOFF_S", (0.01, 0.02))
  monkeypatch.setattr(rollout, "GIVE_UP_S", 0.3)
  with pytest.raises(rollout.RolloutStalled, match="every group aborted for 0 s .*UNAVAILABLE"):
    asyncio.run(for_a_while(worker(), 30))


class FlakyToolsAgent(Agent):
  """Episode 1 of each `q-mixed` group ends on a retrieval server's failures (`env_error`)."""

  async def run(self, item, *, sample, group_id, seed, submit_version):
    t = await super().run(item, sample=sample, group_id=group_id, seed=seed,
                          submit_version=submit_version)
    if item.qid == "q-mixed" and sample == 1:
      t.status, t.error, t.prediction = "env_error", "Tool error (timeout): no reply", None
    return t


def test_a_group_with_an_episode_the_tool_servers_ended_is_dropped_unscored():
  """Its reward of 0 would be the server's failure, taught to the policy as its own."""
  scored = []

  class CountingScorer(Scorer):
    async def score(self, *, prediction, answers, **kw):
      scored.append(prediction)
      return await super().score(prediction=prediction, answers=answers, **kw)
  items = [QAItem(qid="q-mixed", question="?", answers=("Ada",))]
  replay = Replay()
  w = RolloutWorker(worker=0, workers=1, rl=RLSection(group_size=4, batch_groups=2),
                    agent=FlakyToolsAgent(), scorer=CountingScorer(), replay=replay,
                    prompts=PromptStream(items), poll_s=0.01)

  async def for_a_while():
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, stop.set)
    await w.run(stop=stop)
  asyncio.run(for_a_while())
  assert replay.groups == [] and w.stats.failed == w.stats.started > 0
  assert w.stats.status["env_error"] == w.stats.started
  assert None not in scored  # the env_error episodes were never scored


class SlowFirstAgent(Agent):
  """The question "slow?" takes a while: its group finishes after the next one's."""

  async def run(self, item, **kw):
    await asyncio.sleep(0.5 if item.question == "slow?" else 0.0)
    return await super().run(item, **kw)


def test_a_group_that_finishes_early_does_not_move_the_resume_point_past_one_in_flight():
  """A restarted worker resumes at the cursor the queue holds. Each group recorded its own
  `cursor + 1`, so a fast group put while an earlier prompt was still in flight moved it past
  that prompt (skipped after a crash), and the slow one then moved it back."""
  items = [QAItem(qid="q-mixed", question=q, answers=("Ada",)) for q in ("slow?", "fast?")]
  replay = Replay()
  w = RolloutWorker(worker=0, workers=1, rl=RLSection(group_size=2, batch_groups=2),
                    agent=SlowFirstAgent(), scorer=Scorer(), replay=replay,
                    prompts=PromptStream(items), poll_s=0.01)
  asyncio.run(w.run(max_groups=2))
  assert [(g.group_id, g.cursor) for g in replay.groups] == [("w0-1", 0), ("w0-0", 2)]
