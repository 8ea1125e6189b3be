"""The Pallas flash-attention kernels over packed rows, the GPU's (model.attention=pallas) and
the TPU's splash attention (splash), run here in Pallas interpret mode: the reference's outputs
and gradients, no [T, T] mask, remat that keeps their residuals, and a mesh of devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import single_device_mesh, tiny_config
from flax import nnx
from test_blockwise_attention import LENGTHS, _largest, _packed

from asearcher_jax.models.attention import KERNELS, make_mask, reference_attention
from asearcher_jax.models.config import ModelSection
from asearcher_jax.models.pretrained import create_model, load_policy
from asearcher_jax.sharding import make_mesh
from asearcher_jax.train.lm import PackedBatch, make_sft_step


@pytest.mark.parametrize("impl", ["pallas", "splash"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_outputs_and_gradients_are_as_close_to_exact_as_xla_attention(dtype, impl):
  """Rows of many segments (some of length 1) and trailing padding, T = 37 (padded to whole
  tiles inside), grouped kv heads: against float64 on the same rounded inputs, the kernel's
  outputs and gradients are within a small multiple of XLA attention's error in the same
  dtype. The cotangent is zero on padding, whose outputs no loss reads."""
  t, n, k, d = 37, 4, 2, 8
  pos, seg = _packed(LENGTHS, t)
  rng = np.random.default_rng(1)
  q, kk, v, g = (jnp.asarray(rng.normal(size=(len(LENGTHS), t, h, d)), dtype)
                 for h in (n, k, k, n))
  g = jnp.where((seg > 0)[:, :, None, None], g, 0)
  mask = make_mask(pos, pos, seg, seg)
  with jax.enable_x64(True):
    exact_out, exact_vjp = jax.vjp(lambda *a: reference_attention(*a, mask),
                                   *(x.astype(jnp.float64) for x in (q, kk, v)))
    exact_grads = exact_vjp(g.astype(jnp.float64))
  out, vjp = jax.vjp(lambda *a: KERNELS[impl](*a, seg, interpret=True), q, kk, v)
  ref, ref_vjp = jax.vjp(lambda *a: jax.nn.dot_product_attention(
      *a, mask=mask, implementation="xla"), q, kk, v)
  valid = np.asarray(seg > 0)[:, :, None, None]

  def err(x, y, where=True):
    return float(np.max(np.abs(np.where(where, np.asarray(x, np.float64) - np.asarray(y), 0))))

  eps = float(jnp.finfo(dtype).eps)
  floor = 4 if dtype == jnp.bfloat16 else 64
  # padding's outputs differ (each implementation lets it attend to something); no loss reads them
  assert err(out, exact_out, valid) <= max(4 * err(ref, exact_out, valid), floor * eps)
  for a, b, x in zip(vjp(g), ref_vjp(g), exact_grads):
    scale = float(np.max(np.abs(np.asarray(x))))
    assert err(a, x) <= max(4 * err(b, x), floor * eps * scale)


@pytest.mark.parametrize("kernel", ["pallas", "splash"])
def test_the_models_packed_forward_and_gradients_equal_xla_attention(kernel):
  """The model's packed-row forward and the gradient of a loss over its real tokens are the
  same with the kernel as with XLA's attention (float32: the same sums in another order)."""
  mesh = single_device_mesh()
  pos, seg = _packed(LENGTHS, 37)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, size=pos.shape), jnp.int32)
  weight = (seg > 0).astype(jnp.float32)[:, :, None]
  out, grads = {}, {}
  with jax.set_mesh(mesh):
    for impl in (kernel, "xla"):
      model = create_model(tiny_config(), mesh, seed=3, dtype="float32", attention_impl=impl)
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)

      def loss(p):
        m = nnx.merge(graphdef, p, rest)
        h = m.hidden_states(tokens, pos, seg)[0]
        return jnp.sum(jnp.sin(h) * weight), h

      (_, h), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
      out[impl], grads[impl] = np.asarray(h), jax.tree.leaves(g)
  eps = np.finfo(np.float32).eps
  valid = np.asarray(seg > 0)
  scale = float(np.max(np.abs(out["xla"])))
  np.testing.assert_allclose(out[kernel][valid], out["xla"][valid], rtol=0,
                             atol=64 * eps * scale)
  for a, b in zip(grads[kernel], grads["xla"]):
    np.testing.assert_allclose(a, b, rtol=0, atol=256 * eps * float(np.max(np.abs(b))))


# Splash attention keeps the causal masks of its diagonal tiles (two 512 x 512 arrays here)
# whatever the rows hold: with 2 x 1024-token rows, B x T x T is four times as large.
@pytest.mark.parametrize("kernel,t", [("pallas", 512), ("splash", 1024)])
def test_a_compiled_training_step_holds_no_mask_or_scores(kernel, t):
  """SFT on 2 packed rows of a 2-layer model: no array of the optimized HLO is as large as
  B x T x T (test_blockwise_attention shows the check fails with XLA's attention)."""
  b = 2
  tok = jax.ShapeDtypeStruct((b, t), jnp.int32)
  batch = PackedBatch(tok, tok, tok, jax.ShapeDtypeStruct((b, t), jnp.bool_))
  mesh = single_device_mesh()
  with jax.set_mesh(mesh):
    model = create_model(tiny_config(max_position_embeddings=t), mesh, seed=0,
                         dtype="float32", attention_impl=kernel)
    params, opt_state, step = make_sft_step(model, optax.adam(1e-3))
    hlo = step.lower(params, opt_state, batch).compile().as_text()
  assert _largest(hlo) < b * t * t


def _shard_map_inputs(jaxpr) -> list[tuple[int, ...]]:
  """The per-device shape of the first input of every shard_map in a jaxpr, nested ones too."""
  from jax._src.core import jaxprs_in_params  # noqa: PLC0415
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "shard_map":
      out.append(tuple(eqn.params["jaxpr"].invars[0].aval.shape))
    for sub in jaxprs_in_params(eqn.params):
      out += _shard_map_inputs(sub)
  return out


@pytest.mark.parametrize("kernel", ["pallas", "splash"])
def test_a_step_sharded_over_eight_devices_equals_one_devices(kernel):
  """SFT on packed rows over a (data 2, fsdp 2, tensor 2) mesh of forced CPU devices: each
  device runs the kernel on its own rows and its own block of kv heads with their query heads
  (attention.per_device), and one SGD step moves the weights as XLA's attention does on one
  device; the compiled step runs the kernel on a quarter of the rows and half the heads."""
  pos, seg = _packed(LENGTHS, 37)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, size=pos.shape), jnp.int32)
  batch = PackedBatch(tokens, pos, seg, seg > 0)
  stepped = {}
  for impl, mesh in ((kernel, make_mesh({"data": 2, "fsdp": 2, "tensor": 2},
                                        devices=jax.devices()[:8])),
                     ("xla", single_device_mesh())):
    section = ModelSection(arch=tiny_config(vocab_size=128), attention=impl, remat="full",
                           dtype="float32")
    model = load_policy(section, mesh)[0]
    params, opt_state, step = make_sft_step(model, optax.sgd(1.0))
    stepped[impl] = jax.tree.leaves(step(params, opt_state, batch)[0])
    if impl == kernel:  # what each device's kernel reads: q [rows, T, heads, D]
      local = [shape for shape in _shard_map_inputs(jax.make_jaxpr(step)(
          params, opt_state, batch).jaxpr) if len(shape) == 4]
      assert local and all(q == (len(LENGTHS) // 4, 37, 2, 16) for q in local), local
  eps = np.finfo(np.float32).eps
  for a, b in zip(stepped[kernel], stepped["xla"]):
    np.testing.assert_allclose(a, b, rtol=0, atol=256 * eps * float(np.max(np.abs(b))))


@pytest.mark.parametrize("kernel", ["pallas", "splash"])
def test_an_sft_step_under_remat_equals_xla_attention(kernel):
  """The kernel's own backward pass under full rematerialisation: one SGD step of SFT on packed rows
  moves the weights as XLA's attention without remat does."""
  mesh = single_device_mesh()
  pos, seg = _packed(LENGTHS, 37)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, size=pos.shape), jnp.int32)
  batch = PackedBatch(tokens, pos, seg, seg > 0)
  stepped = {}
  with jax.set_mesh(mesh):
    for impl, remat in ((kernel, "full"), ("xla", "none")):
      model = create_model(tiny_config(), mesh, seed=0, dtype="float32", attention_impl=impl,
                           remat=remat)
      params, opt_state, step = make_sft_step(model, optax.sgd(1.0))
      stepped[impl] = jax.tree.leaves(step(params, opt_state, batch)[0])
  eps = np.finfo(np.float32).eps
  for a, b in zip(stepped[kernel], stepped["xla"]):
    np.testing.assert_allclose(a, b, rtol=0, atol=256 * eps * float(np.max(np.abs(b))))


def _count(jaxpr, primitive: str) -> int:
  """Equations of `primitive` in a jaxpr and every jaxpr nested in it."""
  from jax._src.core import jaxprs_in_params  # noqa: PLC0415
  return sum((eqn.primitive.name == primitive)
             + sum(_count(sub, primitive) for sub in jaxprs_in_params(eqn.params))
             for eqn in jaxpr.eqns)


@pytest.mark.parametrize("kernel", ["pallas", "splash"])
def test_remat_keeps_the_kernels_residuals_instead_of_running_its_forward_again(kernel):
  """The gradient of a packed-row loss runs the kernel's forward once under every remat policy
  but `full`, which saves nothing and runs it again in the backward pass."""
  mesh = single_device_mesh()
  pos, seg = _packed(LENGTHS, 37)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, size=pos.shape), jnp.int32)
  calls = {}
  with jax.set_mesh(mesh):
    for remat in ("none", "full", "attention", "dots", "dots_no_batch"):
      model = create_model(tiny_config(), mesh, seed=0, dtype="float32", attention_impl=kernel,
                           remat=remat)
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest).hidden_states(tokens, pos, seg)[0])
      calls[remat] = _count(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, "pallas_call")
  assert calls["full"] == calls["none"] + 1
  assert calls["attention"] == calls["dots"] == calls["dots_no_batch"] == calls["none"]
