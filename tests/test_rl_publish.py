"""Weight publication's colocated path, and the rollout worker's prompt stream."""

import jax
import numpy as np
from conftest import single_device_mesh, tiny_config
from flax import nnx

from asearcher_jax.data import QAItem
from asearcher_jax.inference import Driver, Engine, Request, SamplingParams
from asearcher_jax.models import create_model
from asearcher_jax.models.params import flat_state
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
