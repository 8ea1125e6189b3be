"""Sharded parameters and forward passes on 8 virtual CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import single_device_mesh, tiny_config

from asearcher_jax.errors import ShardingError
from asearcher_jax.models import create_model, flat_params
from asearcher_jax.sharding import make_mesh

CFG = tiny_config("qwen2", vocab_size=128, num_heads=8, num_kv_heads=4, head_dim=8)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 97, (8, 10)))


def forward(model, mesh):
  with jax.set_mesh(mesh):
    logits, _ = jax.jit(lambda m, t: m(t))(model, TOKENS)
  return np.asarray(logits)


@pytest.fixture(scope="module")
def reference():
  return forward(create_model(CFG, single_device_mesh(), seed=7, dtype="float32"),
                 single_device_mesh())


@pytest.mark.parametrize("shape", [
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 1, "fsdp": 2, "tensor": 4},
    {"data": 8, "fsdp": 1, "tensor": 1},
])
def test_sharded_forward_equals_unsharded(reference, shape):
  mesh = make_mesh(shape)
  model = create_model(CFG, mesh, seed=7, dtype="float32")
  np.testing.assert_allclose(forward(model, mesh), reference, atol=2e-5)


def test_parameters_are_born_sharded():
  mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  params = flat_params(create_model(CFG, mesh, seed=0))
  wqkv = params["layers/wqkv"]  # [L, E, K, N/K + 2, D]: each kv head beside its query heads
  assert wqkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None, None)
  assert {s.data.shape for s in wqkv.addressable_shards} == {(2, 16, 2, 4, 8)}
  w_gate_up = params["layers/w_gate_up"]  # [L, E, 2, F]
  assert w_gate_up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor")


def test_mesh_fill_axis_takes_remaining_devices():
  assert dict(make_mesh({"data": 2, "fsdp": -1, "tensor": 2}).shape) == {
      "data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("shape,message", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices, but 8 are available"),
    ({"data": 3, "fsdp": -1, "tensor": 1}, "do not divide the 8 available devices"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one axis may be -1"),
    ({"data": 1, "fsdp": 8, "pipeline": 1}, "unknown mesh axes ['pipeline']"),
])
def test_bad_mesh_shapes_are_refused(shape, message):
  with pytest.raises(ShardingError, match=message.replace("[", r"\[").replace("]", r"\]")):
    make_mesh(shape)


def test_mesh_that_does_not_divide_heads_names_tensor_and_axis():
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
  with pytest.raises(ShardingError, match=r"layers/[bw]qkv: dimension \d \(kv_heads, size 4\) is "
                     r"not divisible by mesh axis 'tensor' of size 8"):
    create_model(CFG, mesh)
