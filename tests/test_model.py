"""Forward-pass invariants: cached decoding, packing, attention kernels, remat, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import single_device_mesh, tiny_config
from flax import nnx

from asearcher_jax.models import create_model, flat_params
from asearcher_jax.models.decode import decode_step, greedy_generate, prefill

RNG = np.random.RandomState(1)
MESH = single_device_mesh()


def forward(model, tokens, positions=None, segment_ids=None):
  logits, _ = jax.jit(lambda m, t, p, s: m(t, p, s))(model, tokens, positions, segment_ids)
  return np.asarray(logits)


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def model(request):
  return create_model(tiny_config(request.param), MESH, seed=3, dtype="float32")


def test_prefill_then_steps_equals_full_forward(model):
  b, prompt, steps = 3, 7, 6
  tokens = RNG.randint(0, 97, (b, prompt + steps)).astype(np.int32)
  full = forward(model, jnp.asarray(tokens))
  # Rows have different prompt lengths: right-padded prefill, then per-row positions.
  lengths = np.array([7, 4, 5], np.int32)
  padded = np.where(np.arange(prompt) < lengths[:, None], tokens[:, :prompt], 0)
  cache = model.init_cache(b, 32)
  logits, cache = prefill(model, jnp.asarray(padded), jnp.asarray(lengths), cache)
  np.testing.assert_allclose(np.asarray(logits), full[np.arange(b), lengths - 1], atol=1e-5)
  pos = lengths.copy()
  for _ in range(steps):
    nxt = tokens[np.arange(b), pos]
    logits, cache = decode_step(model, jnp.asarray(nxt), jnp.asarray(pos), cache)
    np.testing.assert_allclose(np.asarray(logits), full[np.arange(b), pos], atol=1e-5)
    pos += 1


def test_prefill_on_top_of_existing_prefix(model):
  """Multi-turn reuse: prefilling only the new tokens after a cached prefix."""
  tokens = RNG.randint(0, 97, (2, 12)).astype(np.int32)
  full = forward(model, jnp.asarray(tokens))
  cache = model.init_cache(2, 16)
  _, cache = prefill(model, jnp.asarray(tokens[:, :5]), jnp.full((2,), 5, jnp.int32), cache)
  logits, _ = prefill(model, jnp.asarray(tokens[:, 5:]), jnp.full((2,), 7, jnp.int32), cache,
                      start=jnp.full((2,), 5, jnp.int32))
  np.testing.assert_allclose(np.asarray(logits), full[:, -1], atol=1e-5)


def test_greedy_generate_matches_argmax_of_full_forward(model):
  prompt = RNG.randint(0, 97, 5).tolist()
  out = greedy_generate(model, [prompt], max_new_tokens=6)[0]
  seq = list(prompt)
  for _ in range(6):
    seq.append(int(forward(model, jnp.asarray([seq]))[0, -1].argmax()))
  assert out == seq[len(prompt):]


def test_packed_rows_equal_separate_sequences(model):
  a = RNG.randint(0, 97, 5).astype(np.int32)
  b = RNG.randint(0, 97, 8).astype(np.int32)
  packed = np.concatenate([a, b, np.zeros(3, np.int32)])[None]
  segments = np.array([[1] * 5 + [2] * 8 + [0] * 3], np.int32)
  positions = np.array([list(range(5)) + list(range(8)) + [0, 1, 2]], np.int32)
  out = forward(model, jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments))
  np.testing.assert_allclose(out[0, :5], forward(model, jnp.asarray(a[None]))[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 5:13], forward(model, jnp.asarray(b[None]))[0], atol=1e-5)


def test_fused_attention_path_equals_reference():
  cfg = tiny_config("qwen3")
  tokens = jnp.asarray(RNG.randint(0, 97, (2, 9)))
  ref = forward(create_model(cfg, MESH, seed=0, dtype="float32", attention_impl="reference"), tokens)
  xla = forward(create_model(cfg, MESH, seed=0, dtype="float32", attention_impl="xla"), tokens)
  np.testing.assert_allclose(xla, ref, atol=1e-5)


def test_bf16_compute_stays_close_to_fp32():
  cfg = tiny_config("qwen2")
  tokens = jnp.asarray(RNG.randint(0, 97, (2, 9)))
  f32 = forward(create_model(cfg, MESH, seed=0, dtype="float32"), tokens)
  bf16_model = create_model(cfg, MESH, seed=0, dtype="bfloat16")
  assert flat_params(bf16_model)["layers/wq"].dtype == jnp.float32  # fp32 master weights
  out = forward(bf16_model, tokens)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, f32, atol=0.05)


def test_remat_policies_give_identical_gradients():
  cfg = tiny_config("qwen3")
  tokens = jnp.asarray(RNG.randint(0, 97, (2, 9)))

  def grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
      logits, _ = nnx.merge(graphdef, p, rest)(tokens)
      return jnp.mean(jax.nn.logsumexp(logits, -1))

    g = jax.jit(jax.grad(loss))(params)
    return jax.tree.leaves_with_path(nnx.to_pure_dict(g))

  base = grads(create_model(cfg, MESH, seed=0, dtype="float32"))
  for remat in ("full", "dots", "dots_no_batch"):
    other = grads(create_model(cfg, MESH, seed=0, dtype="float32", remat=remat))
    for (path, b), (_, o) in zip(base, other):
      np.testing.assert_allclose(o, b, atol=1e-6, err_msg=f"{remat} {jax.tree_util.keystr(path)}")


def test_parameters_carry_logical_axes():
  model = create_model(tiny_config("qwen2"), MESH, seed=0)
  axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], nnx.state(model, nnx.Param),
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert axes["layers"]["wq"] == ("layers", "embed", "q_heads", "head_dim")
  assert axes["embed"] == ("vocab", "embed")
