"""Weight-only int8 serving (models/quant.py, `serve.quantization: int8`).

The contract: an int8 decode server computes exactly what the float model whose weights are
the dequantized int8 ones computes, and a version's int8 weights are a function of its float
weights alone, however they reach the server."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, single_device_mesh, tiny_config
from flax import nnx

from asearcher_jax.config import load_config
from asearcher_jax.errors import CheckpointError
from asearcher_jax.inference import Driver, Engine, Request, SamplingParams
from asearcher_jax.inference.weights import load_weights
from asearcher_jax.models import create_model, quant
from asearcher_jax.models.params import flat_state, state_like
from asearcher_jax.models.pretrained import save_policy
from asearcher_jax.models.qwen import QUANTIZED_AXES

MESH = single_device_mesh()
UNTIED = tiny_config("qwen3", vocab_size=128)  # q/k norms; embed and lm_head both int8
TIED = tiny_config("qwen2", tied=True, vocab_size=128)  # qkv bias; one int8 table, two uses
U32 = 2.0 ** -24  # float32 unit roundoff
U64 = 2.0 ** -53
RNG = np.random.RandomState(0)


def float_params(cfg, seed=0, dtype="float32"):
  model = create_model(cfg, MESH, seed=seed, param_dtype=dtype, dtype=dtype)
  return model, nnx.split(model, nnx.Param, ...)


def dequantized(params, dtype=jnp.float32):
  """A float State holding what the int8 `params` stand for."""
  flat = flat_state(params)
  return state_like(params, {k: quant.dequantize(v, QUANTIZED_AXES[k], dtype)
                             if quant.is_quant(v) else v for k, v in flat.items()})


@pytest.mark.parametrize("cfg", [UNTIED, TIED], ids=["untied", "tied"])
def test_each_weight_is_within_half_a_step_and_its_largest_lands_on_127(cfg):
  _, (_, params, _) = float_params(cfg)
  flat = flat_state(params)
  names = [k for k in QUANTIZED_AXES if k in flat]
  assert len(names) == (5 if cfg.tie_embeddings else 6)
  for name in names:
    axes = QUANTIZED_AXES[name]
    w = np.asarray(flat[name], np.float64)
    q = quant.quantize(flat[name], axes)
    assert q.quant.dtype == jnp.int8 and q.quant.shape == w.shape
    assert q.scale.shape == tuple(d for i, d in enumerate(w.shape) if i not in axes)
    s = np.expand_dims(np.asarray(q.scale, np.float64), axes)
    # |round(r) - r| <= 1/2 with r = fl(w / s), and w / s and q * s are one rounding each
    err = np.abs(w - np.asarray(quant.dequantize(q, axes), np.float64))
    assert np.all(err <= s * (0.5 + 2 * 127 * U32)), name
    assert np.all(np.abs(np.asarray(q.quant)).max(axis=axes) == 127), name


def test_a_channel_of_zeros_quantizes_to_zeros_with_no_division_by_zero():
  w = jnp.asarray(RNG.randn(8, 3), jnp.float32).at[:, 1].set(0.0)
  q = quant.quantize(w, (0,))
  assert float(q.scale[1]) == 1.0 and not np.asarray(q.quant[:, 1]).any()
  assert np.isfinite(np.asarray(quant.dequantize(q, (0,)))).all()


def test_int8_matmuls_and_lookups_equal_those_of_the_dequantized_weights():
  """Scaling the output equals scaling the weight: in float64 the two differ by the rounding
  of sums of E products, at most 2·E·u64 of the sum of their sizes."""
  with jax.enable_x64(True):
    x = jnp.asarray(RNG.randn(2, 3, 64))
    for spec, w, axes in [("bte,ecf->btcf", RNG.randn(64, 2, 96), (0,)),
                          ("bthd,hde->bte", RNG.randn(4, 16, 64), (0, 1))]:
      q = quant.quantize(jnp.asarray(w, jnp.float32), axes)
      if spec.startswith("bthd"):
        x = x.reshape(2, 3, 4, 16)
      deq = quant.dequantize(q, axes, jnp.float64)
      got = quant.einsum(spec, x, q)
      assert got.dtype == jnp.float64
      size = jnp.einsum(spec, jnp.abs(x), jnp.abs(deq))
      n = np.prod([w.shape[i] for i in axes])
      assert np.all(np.abs(got - jnp.einsum(spec, x, deq)) <= 2 * n * U64 * size)
    table = quant.quantize(jnp.asarray(RNG.randn(128, 64), jnp.float32), (1,))
    ids = jnp.asarray([[3, 127, 0]])
    deq = quant.dequantize(table, (1,), jnp.float64)
    np.testing.assert_array_equal(quant.take_rows(table, ids, jnp.float64), deq[ids])
    h = jnp.asarray(RNG.randn(1, 3, 64))  # the tied head: the table's transpose, same scales
    size = jnp.einsum("bte,ev->btv", jnp.abs(h), jnp.abs(deq.T))
    assert np.all(np.abs(quant.einsum("bte,ev->btv", h, table.T)
                         - jnp.einsum("bte,ev->btv", h, deq.T)) <= 2 * 64 * U64 * size)


@pytest.mark.parametrize("cfg", [UNTIED, TIED], ids=["untied", "tied"])
def test_the_int8_model_is_the_float_model_of_its_dequantized_weights(cfg):
  """The whole forward in float64: hidden states and logits of the int8 model equal those of
  the float model holding the dequantized weights, to float64 rounding (int8's own error is
  ~1e-2 of a weight, so a misplaced scale is ~1e10 times this bound)."""
  with jax.enable_x64(True):
    _, (graphdef, params, rest) = float_params(cfg, dtype="float64")
    int8 = state_like(params, quant.quantize_flat(flat_state(params), QUANTIZED_AXES))
    q_model = nnx.merge(graphdef, int8, rest)
    f_model = nnx.merge(graphdef, dequantized(int8, jnp.float64), rest)
    tokens = jnp.asarray(RNG.randint(0, 128, (2, 11)))
    hq, _ = q_model.hidden_states(tokens)
    hf, _ = f_model.hidden_states(tokens)
    assert hq.dtype == jnp.float64
    np.testing.assert_allclose(hq, hf, rtol=0, atol=1e-9 * float(jnp.abs(hf).max()))
    lq, lf = (quant.einsum("bte,ev->btv", h, m.head()) for h, m in ((hq, q_model),
                                                                  (hf, f_model)))
    np.testing.assert_allclose(lq, lf, rtol=0, atol=1e-9 * float(jnp.abs(lf).max()))
    # and not the float model it was quantized from
    assert float(jnp.abs(hq - nnx.merge(graphdef, params, rest).hidden_states(tokens)[0]).max()) \
        > 1e-4


def _forward(model, ids):
  return np.asarray(jax.jit(lambda m, t: m(t)[0])(model, jnp.asarray([ids])))[0]


def _assert_greedy_of(model, prompt, output):
  """`output` is `model`'s greedy continuation of `prompt`: each token is the argmax of the full
  forward over what precedes it (one forward over the whole sequence, by induction)."""
  logits = _forward(model, prompt + output[:-1])[len(prompt) - 1:]
  assert output == logits.argmax(axis=-1).tolist()
  return logits


def test_an_int8_engine_decodes_as_the_float_model_of_its_dequantized_weights():
  """Token for token (greedy) and log-prob for log-prob (to 1e-4, as every float32 engine
  test) against the full forward of the dequantized model: prefill, paged decode and the head
  (here the tied one; the swap test below decodes an untied model) all read the int8
  weights."""
  model, (graphdef, _, rest) = float_params(TIED)
  engine = Engine(model, slots=3, max_len=64, mesh=MESH, quantization="int8")
  assert engine.quantization == "int8"
  twin = nnx.merge(graphdef, dequantized(engine.params), rest)
  prompts = [RNG.randint(0, 128, n).tolist() for n in (5, 17)]
  with Driver(engine, version=1) as d:
    reqs = [d.submit(Request(p, SamplingParams(temperature=0.0, max_new_tokens=8)))
            for p in prompts]
    results = [r.wait(120) for r in reqs]
  for p, r in zip(prompts, results):
    full = jax.nn.log_softmax(_assert_greedy_of(twin, p, r.output_ids), axis=-1)
    np.testing.assert_allclose(r.logprobs, [full[i, t] for i, t in enumerate(r.output_ids)],
                               atol=1e-4)


def test_the_plan_counts_the_bytes_an_int8_server_holds():
  from asearcher_jax.memory_plan import plan
  cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"), ["serve.quantization=int8"])
  model = create_model(cfg.model.arch, MESH, seed=0, dtype="float32")
  engine = Engine(model, slots=2, max_len=64, mesh=MESH, quantization="int8")
  items = {i.name: i.bytes for i in plan(cfg, devices=1, platform="cpu").groups[-1].items}
  assert items["parameters (int8 and float32)"] == sum(
      x.nbytes for x in jax.tree.leaves(engine.params))


def test_weight_swaps_quantize_what_is_published_however_it_arrives(tmp_path):
  """In-process params and an orbax policy checkpoint give the same int8 weights: those of
  quantizing the float version; already-int8 weights are refused; the driver serves them."""
  model, _ = float_params(UNTIED)
  engine = Engine(model, slots=2, max_len=64, mesh=MESH, quantization="int8")
  new_model, (graphdef, new_params, rest) = float_params(UNTIED, seed=1)
  flat = flat_state(new_params)
  expected = quant.quantize_flat(flat, QUANTIZED_AXES)
  save_policy(str(tmp_path / "policy"), 1, flat, UNTIED)
  for source in (flat, new_params, str(tmp_path / "policy")):
    got = flat_state(load_weights(engine.params, source, UNTIED))
    assert jax.tree.structure(got) == jax.tree.structure(flat_state(engine.params))
    for k in flat:
      for a, b in zip(jax.tree.leaves(got[k]), jax.tree.leaves(expected[k])):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b, err_msg=f"{k} from {type(source).__name__}")
  with pytest.raises(CheckpointError, match="embed is already int8; load the float weights"):
    load_weights(engine.params, flat_state(engine.params), UNTIED)
  p = RNG.randint(0, 128, 7).tolist()
  with Driver(engine, version=0, update_mode="keep_kv") as d:
    d.update_weights(1, load_weights(engine.params, flat, UNTIED))
    r = d.generate(p, SamplingParams(temperature=0.0, max_new_tokens=6))
  twin = nnx.merge(graphdef, dequantized(state_like(new_params, expected)), rest)
  assert r.versions == [1] * 6
  _assert_greedy_of(twin, p, r.output_ids)


def test_a_sharded_int8_engine_matches_one_device():
  """On a (fsdp 2, tensor 4) mesh the int8 values keep their weight's sharding and the scales
  that of the axes they keep; the outputs equal one device's."""
  from asearcher_jax.sharding import make_mesh
  cfg = tiny_config("qwen2", vocab_size=128, num_heads=8, num_kv_heads=4, head_dim=8)
  mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  sampling = SamplingParams(temperature=0.9, seed=2, max_new_tokens=6)
  prompts = [RNG.randint(0, 128, 5 + i).tolist() for i in range(4)]
  outs = []
  for m in (MESH, mesh):
    model = create_model(cfg, m, seed=4, dtype="float32")
    engine = Engine(model, slots=4, max_len=32, mesh=m, quantization="int8")
    with Driver(engine) as d:
      outs.append([r.wait(120) for r in [d.submit(Request(p, sampling)) for p in prompts]])
  floats = flat_state(nnx.state(model, nnx.Param))
  axes = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))  # noqa: E731
  for k, w in flat_state(engine.params).items():
    if quant.is_quant(w):
      assert axes(w.quant) == axes(floats[k]), k
      assert axes(w.scale) == tuple(a for i, a in enumerate(axes(floats[k]))
                                    if i not in QUANTIZED_AXES[k]), k
  for single, sharded in zip(*outs):
    assert single.output_ids == sharded.output_ids
    np.testing.assert_allclose(single.logprobs, sharded.logprobs, atol=1e-4)


def test_serve_quantization_reaches_the_decode_server(tmp_path):
  from asearcher_jax.inference.server import build_server
  cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"), [
      "serve.quantization=int8", "serve.slots=2", "serve.max_len=64", "serve.grpc_port=0",
      "serve.http_port=null", f"run.output_dir={tmp_path}"])
  server = build_server(cfg, progress=False)
  engine = server.driver.engine
  assert engine.quantization == "int8"
  assert {k for k, v in flat_state(engine.params).items() if quant.is_quant(v)} == {
      "embed", "layers/wqkv", "layers/wo", "layers/w_gate_up", "layers/w_down"}
  with server.driver as d:
    assert d.generate([5, 6, 7], SamplingParams(max_new_tokens=3)).finish_reason == "length"
  with pytest.raises(Exception, match="quantization"):
    load_config(os.path.join(ROOT, "configs", "debug.yaml"), ["serve.quantization=int4"])
