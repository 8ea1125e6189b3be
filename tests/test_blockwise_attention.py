"""Blockwise, segment-aware attention: the reference's outputs and gradients, no [T, T] array."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import single_device_mesh, tiny_config

from asearcher_jax.models.attention import make_mask, reference_attention
from asearcher_jax.models.blockwise_attention import blockwise_attention
from asearcher_jax.models.pretrained import create_model
from asearcher_jax.train.lm import PackedBatch, make_sft_step


def _packed(lengths: list[list[int]], t: int):
  """positions and segment ids [B, t] of rows packed with episodes of the given lengths, the
  rest padding (segment 0, positions 0, as rl/batch packs them)."""
  pos = np.zeros((len(lengths), t), np.int32)
  seg = np.zeros((len(lengths), t), np.int32)
  for r, row in enumerate(lengths):
    at = 0
    for i, n in enumerate(row):
      pos[r, at:at + n] = np.arange(n)
      seg[r, at:at + n] = i + 1
      at += n
    assert at <= t
  return jnp.asarray(pos), jnp.asarray(seg)


# Rows of many segments, among them segments of length 1, and trailing padding; T = 37 is not a
# multiple of the blocks, so the last block is partly padding the function adds itself.
LENGTHS = [[1, 5, 1, 9, 3, 1, 12], [37], [20, 1, 1, 1, 4], [8, 8, 8, 8, 5]]


@pytest.mark.parametrize("block", [4, 8, 64])
def test_outputs_and_gradients_equal_the_reference_in_float64(block):
  t, n, k, d = 37, 4, 2, 8
  pos, seg = _packed(LENGTHS, t)
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    q, kk, v, g = (jnp.asarray(rng.normal(size=(len(LENGTHS), t, h, d)))
                   for h in (n, k, k, n))

    def blockwise(q, kk, v):
      return blockwise_attention(q, kk, v, pos, seg, block=block)

    def reference(q, kk, v):
      return reference_attention(q, kk, v, make_mask(pos, pos, seg, seg))

    out, vjp = jax.vjp(blockwise, q, kk, v)
    ref, ref_vjp = jax.vjp(reference, q, kk, v)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(vjp(g), ref_vjp(g)):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_is_as_close_to_exact_as_xla_attention(dtype):
  """float32, and bf16 (the GPU training dtype): against float64 on the same rounded inputs,
  blockwise attention's outputs and gradients are within a small multiple of the error of
  XLA's attention (the path it replaces) in the same dtype."""
  t, n, k, d = 37, 4, 2, 8
  pos, seg = _packed(LENGTHS, t)
  rng = np.random.default_rng(1)
  q, kk, v, g = (jnp.asarray(rng.normal(size=(len(LENGTHS), t, h, d)), dtype)
                 for h in (n, k, k, n))
  with jax.enable_x64(True):
    exact_out, exact_vjp = jax.vjp(
        lambda *a: reference_attention(*a, make_mask(pos, pos, seg, seg)),
        *(x.astype(jnp.float64) for x in (q, kk, v)))
    exact_grads = exact_vjp(g.astype(jnp.float64))
  out, vjp = jax.vjp(lambda *a: blockwise_attention(*a, pos, seg, block=8), q, kk, v)
  mask = make_mask(pos, pos, seg, seg)
  ref, ref_vjp = jax.vjp(lambda *a: jax.nn.dot_product_attention(
      *a, mask=mask, implementation="xla"), q, kk, v)
  err = lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y))))  # noqa
  eps = float(jnp.finfo(dtype).eps)
  # no worse than a small multiple of XLA's distance from exact, or a few ulps of the values
  floor = 4 if dtype == jnp.bfloat16 else 64
  assert err(out, exact_out) <= max(4 * err(ref, exact_out), floor * eps)
  for a, b, x in zip(vjp(g), ref_vjp(g), exact_grads):
    scale = float(np.max(np.abs(np.asarray(x))))
    assert err(a, x) <= max(4 * err(b, x), floor * eps * scale)


def _largest(hlo: str) -> int:
  """Elements of the largest array in an HLO module."""
  return max(math.prod(int(d) for d in m.split(","))
             for m in re.findall(r"\w+\[([\d,]+)\]", hlo))


@pytest.mark.parametrize("remat", ["none", "dots", "dots_no_batch", "attention"])
def test_a_compiled_training_step_holds_no_mask_or_scores(remat):
  """SFT on 2 x 512-token packed rows of a 2-layer model: with blockwise attention no array of
  the optimized HLO is as large as B x T x T (a mask, a bias, scores, or every block's masks
  hoisted out of the layer loop); with XLA's attention the mask is (so the check can fail).
  Under remat that keeps matmul outputs (`dots`), every block's scores were kept for the
  backward pass until the kernel named its residuals (attention.keeping_residuals)."""
  b, t = 2, 512
  tok = jax.ShapeDtypeStruct((b, t), jnp.int32)
  batch = PackedBatch(tok, tok, tok, jax.ShapeDtypeStruct((b, t), jnp.bool_))
  mesh = single_device_mesh()
  hlo = {}
  with jax.set_mesh(mesh):
    for impl in ("blockwise", "xla") if remat == "none" else ("blockwise",):
      model = create_model(tiny_config(max_position_embeddings=t), mesh, seed=0,
                           dtype="float32", attention_impl=impl, remat=remat)
      params, opt_state, step = make_sft_step(model, optax.adam(1e-3))
      hlo[impl] = step.lower(params, opt_state, batch).compile().as_text()
  assert _largest(hlo["blockwise"]) < b * t * t
  if "xla" in hlo:  # compiled once, without remat: the check can fail
    assert _largest(hlo["xla"]) >= b * t * t


def test_training_forward_with_blockwise_attention_equals_xla():
  """The model's packed-row forward is the same with either implementation."""
  mesh = single_device_mesh()
  pos, seg = _packed(LENGTHS, 37)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, size=pos.shape), jnp.int32)
  out = {}
  with jax.set_mesh(mesh):
    for impl in ("blockwise", "xla"):
      model = create_model(tiny_config(), mesh, seed=3, dtype="float32", attention_impl=impl)
      out[impl] = np.asarray(jax.jit(lambda m: m.hidden_states(tokens, pos, seg)[0])(model))
  # the same float32 sums in another order: a few dozen ulps of the states' magnitude
  scale = float(np.max(np.abs(out["xla"])))
  np.testing.assert_allclose(out["blockwise"], out["xla"], rtol=0,
                             atol=64 * np.finfo(np.float32).eps * scale)
