"""The rollout worker on its own (agent, scorer and queue faked): groups whose rewards are all
equal are filtered, mixed ones are put whole, and every scored group, filtered or not, is logged
for the learning curve."""

import asyncio
import types

from asearcher_jax.agent import Trajectory
from asearcher_jax.data.qa import QAItem
from asearcher_jax.reward.asearcher import Score
from asearcher_jax.rl.config import RLSection
from asearcher_jax.rl.metrics import read_rollout_logs, rollout_log_path
from asearcher_jax.rl.plot import by_version, plot_metrics
from asearcher_jax.rl.rollout import PromptStream, RolloutWorker


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
