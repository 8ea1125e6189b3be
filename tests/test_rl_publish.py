"""Weight publication's colocated path, and the rollout worker's prompt stream."""

import jax
import numpy as np
import pytest
from conftest import single_device_mesh, tiny_config
from flax import nnx

from asearcher_jax.agent import Trajectory
from asearcher_jax.data import QAItem
from asearcher_jax.inference import Driver, Engine, Request, SamplingParams
from asearcher_jax.models import create_model
from asearcher_jax.models.params import flat_state
from asearcher_jax.replay import Group, ReplayQueue
from asearcher_jax.replay.local import LocalReplay
from asearcher_jax.rl.publish import DriverPublisher
from asearcher_jax.rl.rollout import PromptStream

MESH = single_device_mesh()
CFG = tiny_config("qwen3", vocab_size=128)


def test_driver_publisher_commits_a_copy_and_tags_new_tokens():
  served = create_model(CFG, MESH, seed=0, dtype="float32")
  learner = create_model(CFG, MESH, seed=1, dtype="float32")
  params = nnx.state(learner, nnx.Param)
  want = {k: np.asarray(v) for k, v in flat_state(params).items()}
  with Driver(Engine(served, slots=2, max_len=32, mesh=MESH)) as driver:
    out = DriverPublisher([driver]).publish(1, params)
    assert out["driver0"]["version"] == 1 and driver.version == 1
    for v in jax.tree.leaves(params):  # the learner donates its buffers to the next step
      v.delete()
    got = {k: np.asarray(v) for k, v in flat_state(driver.engine.params).items()}
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
    r = driver.submit(Request([1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=4)))
    assert r.wait(60).versions == [1, 1, 1, 1]


def test_prompt_stream_epochs_are_shuffled_and_resumable():
  items = [QAItem(f"q{i}", f"question {i}", ("a",)) for i in range(5)]
  s = PromptStream(items, seed=7)
  first = [s.next()[1].qid for _ in range(10)]
  assert sorted(first[:5]) == sorted(first[5:]) == [f"q{i}" for i in range(5)]  # two epochs
  assert first[:5] != first[5:] and s.epoch == 2 and s.cursor == 10
  again = PromptStream(items, seed=7, cursor=7)  # a restarted worker at the recorded cursor
  assert [again.next()[1].qid for _ in range(3)] == first[7:10]


def _group(i: int) -> Group:
  rng = np.random.default_rng(i)
  trajs = []
  for j in range(2):
    t = Trajectory(qid=f"q{i}", question="?", answers=["a"], group_id=f"g{i}", sample=j)
    t.tokens = rng.integers(0, 100, 40).astype(np.int32)
    t.loss_mask = np.arange(40) >= 13
    t.behav_logp = np.where(t.loss_mask, -3.0, 0.0).astype(np.float32)
    t.version = np.where(t.loss_mask, 0, -1).astype(np.int32)
    t.seq_starts, t.reward, t.status = [0], float(j), "answered"
    trajs.append(t.to_record())
  return Group(group_id=f"g{i}", qid=f"q{i}", submit_version=0, worker="w0", cursor=i + 1,
               trajectories=trajs)


def test_a_learner_killed_after_the_servers_committed_restarts_above_their_version(tmp_path):
  """Killed after the servers committed version v and before the queue heard of it, a restarted
  learner took v again for other weights; the servers refuse a version that is not newer, so
  it died at every restart. It starts above the newest version any server holds, and moves
  the queue's clock up to it first."""
  from asearcher_jax.config import Config
  from asearcher_jax.models.pretrained import load_policy
  from asearcher_jax.rl.learner import Learner
  arch = {"family": "qwen3", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
          "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
          "tie_embeddings": True, "eos_token_id": 127}
  cfg = Config(model={"arch": arch, "dtype": "float32", "attention": "xla", "remat": "none"},
               optimizer={"learning_rate": 1e-3},
               checkpoint={"every_steps": 1, "async_save": False},
               rl={"batch_groups": 1, "total_steps": 4, "row_tokens": 64, "micro_batch_rows": 1,
                   "max_head_offpolicyness": 100},
               run={"output_dir": str(tmp_path)})
  queue = ReplayQueue(str(tmp_path / "journal"))
  for i in range(4):
    queue.put(_group(i))

  class KilledAfterTheCommit(DriverPublisher):
    def publish(self, version, params):
      super().publish(version, params)
      raise SystemExit("killed")

  def learner(publisher):
    model, _, _ = load_policy(cfg.model, MESH, progress=False)
    return Learner(cfg, model=model, replay=LocalReplay(queue), publisher=publisher,
                   out_dir=str(tmp_path), echo=lambda s: None)

  served, _, _ = load_policy(cfg.model, MESH, progress=False)
  with Driver(Engine(served, slots=1, max_len=64, mesh=MESH)) as driver:
    with pytest.raises(SystemExit):
      learner(KilledAfterTheCommit([driver])).run(steps=1)
    assert (driver.version, queue.version) == (1, 0)  # the servers hold v1; the queue never heard
    for _ in range(2):  # before its first checkpoint, then from it
      again = learner(DriverPublisher([driver]))
      again.restore()
      again.run(steps=1)
      assert again.version == driver.version == queue.version
    assert driver.version >= 3
