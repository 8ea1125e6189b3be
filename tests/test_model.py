"""Forward-pass invariants: cached decoding, packing, attention kernels, remat, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import single_device_mesh, tiny_config
from flax import nnx

from asearcher_jax.models import create_model, flat_params
from asearcher_jax.models.qwen import KVCache

RNG = np.random.RandomState(1)
MESH = single_device_mesh()


def forward(model, tokens, positions=None, segment_ids=None):
  logits, _ = jax.jit(lambda m, t, p, s: m(t, p, s))(model, tokens, positions, segment_ids)
  return np.asarray(logits)


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def model(request):
  return create_model(tiny_config(request.param), MESH, seed=3, dtype="float32")


def cached(model, tokens, positions, cache):
  """One call of the cache path: write tokens at positions, return float32 logits and the cache."""
  logits, cache = jax.jit(lambda m, t, p, c: m(t, p, cache=c))(model, jnp.asarray(tokens),
                                                                jnp.asarray(positions), cache)
  return np.asarray(logits), cache


def test_prefill_then_steps_equals_full_forward(model):
  b, prompt, steps = 3, 7, 6
  tokens = RNG.randint(0, 97, (b, prompt + steps)).astype(np.int32)
  full = forward(model, jnp.asarray(tokens))
  # Rows have different prompt lengths: right-padded prefill, then per-row positions.
  lengths = np.array([7, 4, 5], np.int32)
  padded = np.where(np.arange(prompt) < lengths[:, None], tokens[:, :prompt], 0)
  cache = KVCache.zeros(model.cfg, b, 32, jnp.float32)
  logits, cache = cached(model, padded, np.broadcast_to(np.arange(prompt), (b, prompt)), cache)
  np.testing.assert_allclose(logits[np.arange(b), lengths - 1], full[np.arange(b), lengths - 1],
                             atol=1e-5)
  pos = lengths.copy()
  for _ in range(steps):  # padding was written past each prompt; each step overwrites it first
    nxt = tokens[np.arange(b), pos]
    logits, cache = cached(model, nxt[:, None], pos[:, None], cache)
    np.testing.assert_allclose(logits[:, 0], full[np.arange(b), pos], atol=1e-5)
    pos += 1


def test_prefill_on_top_of_existing_prefix_and_windowed_reads(model):
  """Multi-turn reuse: only the new tokens after a cached prefix; a window reads fewer slots."""
  tokens = RNG.randint(0, 97, (2, 12)).astype(np.int32)
  full = forward(model, jnp.asarray(tokens))
  cache = KVCache.zeros(model.cfg, 2, 64, jnp.float32)
  _, cache = cached(model, tokens[:, :5], np.broadcast_to(np.arange(5), (2, 5)), cache)
  logits, cache = cached(model, tokens[:, 5:], np.broadcast_to(np.arange(5, 12), (2, 7)), cache)
  np.testing.assert_allclose(logits, full[:, 5:], atol=1e-5)
  windowed = jax.jit(lambda m, t, p, c: m.logits(m.hidden_states(t, p, cache=c, kv_window=16)[0]))
  out = windowed(model, jnp.asarray(tokens[:, 11:]), jnp.full((2, 1), 11, jnp.int32), cache)
  np.testing.assert_allclose(np.asarray(out)[:, 0], full[:, 11], atol=1e-5)


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
  ref = forward(create_model(cfg, MESH, seed=0, dtype="float32", attention_impl="reference"),
                tokens)
  xla = forward(create_model(cfg, MESH, seed=0, dtype="float32", attention_impl="xla"), tokens)
  np.testing.assert_allclose(xla, ref, atol=1e-5)


def test_bf16_compute_stays_close_to_fp32():
  cfg = tiny_config("qwen2")
  tokens = jnp.asarray(RNG.randint(0, 97, (2, 9)))
  f32 = forward(create_model(cfg, MESH, seed=0, dtype="float32"), tokens)
  bf16_model = create_model(cfg, MESH, seed=0, dtype="bfloat16")
  assert flat_params(bf16_model)["layers/wqkv"].dtype == jnp.float32  # fp32 master weights
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
  for remat in ("full", "attention", "dots", "dots_no_batch"):
    other = grads(create_model(cfg, MESH, seed=0, dtype="float32", remat=remat))
    for (path, b), (_, o) in zip(base, other):
      np.testing.assert_allclose(o, b, atol=1e-6, err_msg=f"{remat} {jax.tree_util.keystr(path)}")


def test_parameters_carry_logical_axes():
  model = create_model(tiny_config("qwen2"), MESH, seed=0)
  axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], nnx.state(model, nnx.Param),
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert axes["layers"]["wqkv"] == ("layers", "embed", "kv_heads", "qkv", "head_dim")
  assert axes["embed"] == ("vocab", "embed")


def test_one_matmul_makes_q_k_v_and_one_makes_gate_and_up():
  """A layer reads its weights in four matmuls (q/k/v, out, gate/up, down), from weights cast to
  the compute dtype once, before the layer loop."""
  cfg = tiny_config("qwen2")
  model = create_model(cfg, MESH, seed=0, dtype="bfloat16", attention_impl="xla")
  tokens = jnp.zeros((1, 8), jnp.int32)
  hlo = jax.jit(lambda m, t: m(t)[0]).lower(model, tokens).as_text()
  dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
  g = cfg.num_heads // cfg.num_kv_heads
  E, K, D, F = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  weight_dots = [d for d in dots if f"tensor<{E}x{K}x{g + 2}x{D}xbf16>" in d
                 or f"tensor<{E}x2x{F}xbf16>" in d or f"tensor<{F}x{E}xbf16>" in d
                 or f"tensor<{cfg.num_heads}x{D}x{E}xbf16>" in d]
  assert len(weight_dots) == 4, "\n".join(dots)
  assert len(dots) == 4 + 2 + 1  # and attention's two, and the LM head
  layer_casts = [line for line in hlo.splitlines() if "stablehlo.convert" in line
                 and f"tensor<{cfg.num_layers}x{E}x{K}x{g + 2}x{D}xf32>" in line]
  assert len(layer_casts) == 1  # all layers' q/k/v weights, once, outside the scan
