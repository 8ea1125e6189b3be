"""orbax training-state checkpoints: resharding restore, optimizer state, async and crash safety."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from asearcher_jax.checkpoint import Checkpointer, abstract_like
from asearcher_jax.errors import CheckpointError
from asearcher_jax.models import abstract_model, create_model, flat_params, param_shardings
from asearcher_jax.sharding import make_mesh
from asearcher_jax.train.config import OptimizerSection
from asearcher_jax.train.optimizer import make_optimizer, opt_state_shardings

CFG = tiny_config("qwen3", vocab_size=128)
MESH_A = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
MESH_B = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def targets(mesh, optimizer):
  model = abstract_model(CFG)
  shardings = param_shardings(model, mesh)
  params = abstract_like(flat_params(model), shardings)
  opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                     jax.eval_shape(optimizer.init, params),
                     opt_state_shardings(optimizer, params, shardings))
  return params, opt


def test_save_on_one_mesh_restore_on_another(tmp_path):
  optimizer = make_optimizer(OptimizerSection(learning_rate=1e-3))
  params = flat_params(create_model(CFG, MESH_A, seed=0))
  opt_state = jax.jit(optimizer.init)(params)
  grads = jax.tree.map(jnp.ones_like, params)  # one real update so the moments are non-zero
  updates, opt_state = jax.jit(optimizer.update)(grads, opt_state, params)
  with Checkpointer(str(tmp_path), async_save=True) as ckpt:
    ckpt.save(5, params=params, opt_state=opt_state, version=3, metadata={"note": "x"})
  params_t, opt_t = targets(MESH_B, optimizer)
  with Checkpointer(str(tmp_path), read_only=True) as ckpt:
    out = ckpt.restore(params_target=params_t, opt_state_target=opt_t)
  assert (out["step"], out["version"], out["metadata"]) == (5, 3, {"note": "x"})
  assert_trees_equal(out["params"], params)
  assert_trees_equal(out["opt_state"], opt_state)
  assert out["params"]["layers/wqkv"].sharding == params_t["layers/wqkv"].sharding
  assert out["params"]["layers/wqkv"].sharding.mesh.shape == MESH_B.shape
  mu = out["opt_state"][1][0].mu["layers/wqkv"]  # chain(clip, adamw) -> adam moments
  assert mu.sharding.spec == params_t["layers/wqkv"].sharding.spec


def test_interrupted_async_save_leaves_previous_step_and_can_be_redone(tmp_path):
  params = flat_params(create_model(CFG, MESH_A, seed=0))
  later = jax.tree.map(lambda x: x + 1, params)
  with Checkpointer(str(tmp_path), async_save=True) as ckpt:
    ckpt.save(1, params=params)
    ckpt.wait()
    assert ckpt.latest_step() == 1
  # A crash mid-save leaves orbax's temporary directory behind, never a step directory.
  shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp-1234")
  (tmp_path / "2.orbax-checkpoint-tmp-1234" / "commit_success.txt").unlink(missing_ok=True)
  params_t, _ = targets(MESH_A, make_optimizer(OptimizerSection()))
  with Checkpointer(str(tmp_path), async_save=True) as ckpt:
    assert ckpt.all_steps() == [1]
    assert_trees_equal(ckpt.restore(params_target=params_t)["params"], params)
    ckpt.save(2, params=later)  # resuming training saves step 2 again
  with Checkpointer(str(tmp_path), read_only=True) as ckpt:
    assert ckpt.all_steps() == [1, 2]
    assert_trees_equal(ckpt.restore(2, params_target=params_t)["params"], later)


def test_max_to_keep_prunes_old_steps(tmp_path):
  params = flat_params(create_model(CFG, MESH_A, seed=0))
  with Checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, params=params)
  assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [2, 3]


@pytest.mark.parametrize("damage", ["params", "meta", "params/_METADATA"])
def test_a_half_deleted_step_is_not_listed_and_the_one_before_restores(tmp_path, damage):
  """A deletion killed half-way (orbax prunes old steps with rmtree) or a disk fault can leave
  a step without one of its items: it is not listed, and a resume takes the step before it."""
  params = flat_params(create_model(CFG, MESH_A, seed=0))
  with Checkpointer(str(tmp_path), async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, params=params, version=step)
  target = tmp_path / "2" / damage
  shutil.rmtree(target) if target.is_dir() else target.unlink()
  params_t, _ = targets(MESH_A, make_optimizer(OptimizerSection()))
  with Checkpointer(str(tmp_path), read_only=True) as ckpt:
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    restored = ckpt.restore(params_target=params_t)
  assert restored["version"] == 1
  assert_trees_equal(restored["params"], params)
  # A run resuming from step 1 reaches step 2 again: the damaged one is removed when the
  # directory is opened for writing, so the save succeeds (orbax refused it: the learner died
  # there at every restart) and max_to_keep counts whole steps only.
  with Checkpointer(str(tmp_path), max_to_keep=2, async_save=False) as ckpt:
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [1]
    for step in (2, 3):
      ckpt.save(step, params=params, version=step)
    assert ckpt.all_steps() == [2, 3]


def test_missing_step_and_missing_directory_are_clear(tmp_path):
  with pytest.raises(CheckpointError, match="no such checkpoint directory"):
    Checkpointer(str(tmp_path / "nope"), read_only=True)
  params = flat_params(create_model(CFG, MESH_A, seed=0))
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, params=params)
  params_t, _ = targets(MESH_A, make_optimizer(OptimizerSection()))
  with Checkpointer(str(tmp_path), read_only=True) as ckpt:
    with pytest.raises(CheckpointError, match=r"no step 7 \(have \[1\]\)"):
      ckpt.restore(7, params_target=params_t)
