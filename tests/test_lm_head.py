"""The fused, chunked LM head: the same scores and gradients as full logits, without them."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import single_device_mesh
from flax import nnx

from asearcher_jax.models.config import QwenConfig
from asearcher_jax.models.lm_head import chunk_length, reference_token_scores, token_scores
from asearcher_jax.models.pretrained import create_model
from asearcher_jax.rl.batch import TrainBatch
from asearcher_jax.rl.config import RLSection
from asearcher_jax.rl.step import make_ppo_step
from asearcher_jax.sharding import make_mesh
from asearcher_jax.train.lm import PackedBatch, make_sft_step


def _inputs(dtype, b=3, t=37, e=16, v=97, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(b, t, e)), dtype)
  head = jnp.asarray(rng.normal(size=(e, v)) * 0.5, dtype)
  targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(b, t)), dtype)  # a cotangent that is not all ones
  return hidden, head, targets, weights


def test_chunk_length_fits_the_budget():
  assert chunk_length(4, 640, 4096) == 640  # the debug model: one chunk covers the row
  assert chunk_length(1, 4096, 151_936) == 256  # 1 x 256 x 151,936 float32 = 155 MB <= 256 MiB
  assert chunk_length(8, 4096, 151_936) == 32
  assert chunk_length(512, 100, 200_000) == 1  # never below one position
  for b, t, v in [(1, 4096, 151_936), (8, 4096, 151_936), (2, 1024, 65_536)]:
    c = chunk_length(b, t, v)
    assert b * c * v <= 1 << 26 and (c == t or b * 2 * c * v > 1 << 26)


@pytest.mark.parametrize("chunk_elements", [3 * 97, 3 * 8 * 97, 1 << 26])  # 37, 5, 1 chunks
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scores_and_gradients_equal_full_logits_in_float64(chunk_elements, temperature):
  with jax.enable_x64(True):
    hidden, head, targets, weights = _inputs(jnp.float64)

    def loss(fn, h, w):
      return jnp.sum(fn(h, w, targets, temperature=temperature).logp * weights)

    fused = token_scores(hidden, head, targets, temperature=temperature,
                         chunk_elements=chunk_elements)
    ref = reference_token_scores(hidden, head, targets, temperature=temperature)
    np.testing.assert_allclose(fused.logp, ref.logp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fused.entropy, ref.entropy, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(fused.greedy, ref.greedy)
    assert fused.greedy.any()  # some targets are the argmax, so the comparison means something

    fused_loss = lambda h, w: loss(  # noqa: E731
        lambda *a, **k: token_scores(*a, **k, chunk_elements=chunk_elements), h, w)
    g_fused = jax.grad(fused_loss, argnums=(0, 1))(hidden, head)
    g_ref = jax.grad(lambda h, w: loss(reference_token_scores, h, w), argnums=(0, 1))(hidden,
                                                                                     head)
    for a, r in zip(g_fused, g_ref):
      np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_agrees_with_the_float64_truth_as_closely_as_full_logits(dtype):
  """In float32 and in bf16 (matmuls in bf16, sums in float32) the fused path is as close to
  exact as the plain one: its error against a float64 computation on the same (rounded)
  inputs stays within a small multiple of the plain path's own error."""
  hidden, head, targets, weights = _inputs(dtype, v=4099)
  with jax.enable_x64(True):
    exact = reference_token_scores(hidden.astype(jnp.float64), head.astype(jnp.float64),
                                   targets)
    exact_grad = jax.grad(lambda h: jnp.sum(reference_token_scores(
        h, head.astype(jnp.float64), targets).logp * weights.astype(jnp.float64)))(
            hidden.astype(jnp.float64))
  fused = token_scores(hidden, head, targets, chunk_elements=3 * 8 * 4099)
  plain = reference_token_scores(hidden, head, targets)
  err = lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y))))  # noqa
  eps = float(jnp.finfo(dtype).eps)
  scale = float(np.max(np.abs(exact.logp)))
  assert err(fused.logp, exact.logp) <= max(4 * err(plain.logp, exact.logp), 64 * eps * scale)
  grad = jax.grad(lambda h: jnp.sum(token_scores(
      h, head, targets, chunk_elements=3 * 8 * 4099).logp * weights))(hidden)
  plain_grad = jax.grad(lambda h: jnp.sum(reference_token_scores(h, head, targets).logp
                                          * weights))(hidden)
  g_scale = float(np.max(np.abs(exact_grad)))
  assert err(grad, exact_grad) <= max(4 * err(plain_grad, exact_grad), 64 * eps * g_scale)


BIG_VOCAB = QwenConfig(vocab_size=65_536, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=16, tie_embeddings=True,
                       max_position_embeddings=2048)


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "tensor": 2},
                                   {"data": 1, "fsdp": 2, "tensor": 4}])
def test_sharded_scores_and_gradients_equal_unsharded(shape):
  """Rows sharded over data x fsdp, the vocabulary over tensor (the logical rules' layout)."""
  hidden, head, targets, weights = _inputs(jnp.float32, b=4, t=24, e=16, v=128)

  def run(mesh):
    with jax.set_mesh(mesh):
      rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
      vocab = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor"))
      h, w = jax.device_put(hidden, rows), jax.device_put(head, vocab)
      t, g = jax.device_put(targets, rows), jax.device_put(weights, rows)

      @jax.jit
      def f(h, w):
        def loss(h, w):
          # chunks of 1 position unsharded, 8 (tensor 2) or 4 (tensor 4) a device sharded
          s = token_scores(h, w, t, temperature=0.7, chunk_elements=512)
          return jnp.sum(s.logp * g), s
        (_, s), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w)
        return s, grads
      return jax.tree.map(np.asarray, f(h, w))

  (s1, g1), (s8, g8) = run(single_device_mesh()), run(make_mesh(shape))
  np.testing.assert_array_equal(s8.greedy, s1.greedy)
  for a, b in [(s8.logp, s1.logp), (s8.entropy, s1.entropy), (g8[0], g1[0]), (g8[1], g1[1])]:
    # the same float32 sums, in another order across devices: a few ulps of their magnitude
    np.testing.assert_allclose(a, b, rtol=0, atol=64 * np.finfo(np.float32).eps
                               * max(1.0, float(np.max(np.abs(b)))))


def _big_vocab_model():
  return create_model(BIG_VOCAB, single_device_mesh(), seed=0, dtype="float32")


def _f32_shapes(hlo: str) -> set[tuple[int, ...]]:
  return {tuple(int(d) for d in m.split(",")) for m in re.findall(r"f32\[([\d,]+)\]", hlo)}


def _holds_full_logits(hlo: str, b: int, t: int, v: int) -> bool:
  """Whether any float32 buffer is as large as the rows' logits (b x (t - 1) x v elements):
  full logits in any layout, or every chunk's logits stacked by a scan."""
  return max(math.prod(s) for s in _f32_shapes(hlo)) >= b * (t - 1) * v


def test_compiled_sft_and_rl_steps_hold_no_full_logits():
  """The optimized HLO of a training step on a 65,536-token vocabulary (2 x 1024 tokens: two
  chunks of 512 positions) has no float32 [B, T, V] buffer, while the plain path's has."""
  b, t, v = 2, 1024, 65_536
  with jax.set_mesh(single_device_mesh()):
    _compile_steps_and_check(b, t, v)


def _compile_steps_and_check(b, t, v):
  model = _big_vocab_model()
  optimizer = optax.adam(1e-3)
  tok = jax.ShapeDtypeStruct((b, t), jnp.int32)
  packed = PackedBatch(tok, tok, tok, jax.ShapeDtypeStruct((b, t), jnp.bool_))
  params, opt_state, sft_step = make_sft_step(model, optimizer)
  sft_hlo = sft_step.lower(params, opt_state, packed).compile().as_text()
  assert (b, t // 2, v) in _f32_shapes(sft_hlo)  # the chunk is there: the check can see shapes
  assert not _holds_full_logits(sft_hlo, b, t, v)

  rl = RLSection(ppo_n_minibatches=2, row_tokens=t, micro_batch_rows=b)
  params, opt_state, ppo_step = make_ppo_step(_big_vocab_model(), optimizer, rl)
  m = 2
  f = lambda dt: jax.ShapeDtypeStruct((m, b, t), dt)  # noqa: E731
  batch = TrainBatch(tokens=f(jnp.int32), positions=f(jnp.int32), segment_ids=f(jnp.int32),
                     loss_mask=f(jnp.bool_), behav_logp=f(jnp.float32),
                     advantages=f(jnp.float32), versions=f(jnp.int32),
                     num_tokens=jax.ShapeDtypeStruct((), jnp.int32),
                     learner_version=jax.ShapeDtypeStruct((), jnp.int32))
  # the whole rows, and the head on loss positions as the learner runs it, at its widest (C = T)
  for batch in (batch, dataclasses.replace(batch, select=f(jnp.int32))):
    rl_hlo = ppo_step.lower(params, opt_state, batch).compile().as_text()
    assert not _holds_full_logits(rl_hlo, b, t, v)

  # The plain path, compiled the same way, does hold them: the check can fail.
  graphdef, p, rest = nnx.split(_big_vocab_model(), nnx.Param, ...)

  def plain(p, tokens):
    m = nnx.merge(graphdef, p, rest)
    hidden, _ = m.hidden_states(tokens)
    return jnp.sum(reference_token_scores(hidden, m.head(), tokens).logp)

  plain_hlo = jax.jit(jax.grad(plain)).lower(p, tok).compile().as_text()
  assert _holds_full_logits(plain_hlo, b, t, v)


def test_loss_positions_lists_each_rows_weighted_targets_and_pads_with_the_last():
  from asearcher_jax.train.lm import loss_positions
  # row 0: segment 1 at 0-4 (loss on 2, 3), segment 2 at 5-7 (loss on 5: a segment start, no
  # weight; 6, 7); row 1: loss on 1 only, padding after 3; row 2: no loss token at all
  seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
  mask = np.array([[0, 0, 1, 1, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0, 0, 0], [0] * 8], bool)
  select = loss_positions(seg, mask, multiple=2)  # targets t+1 = 2, 3, 6, 7 -> t = 1, 2, 5, 6
  np.testing.assert_array_equal(select, [[1, 2, 5, 6], [0, 7, 7, 7], [7, 7, 7, 7]])
  assert loss_positions(seg, mask).shape == (3, 8)  # rounded up to 16, at most T


def test_sft_loss_on_the_loss_positions_alone_equals_the_whole_row():
  """The head run on the selected positions gives the loss and gradient of the head run on the
  whole row (packed rows, loss on part of each segment, padding)."""
  from asearcher_jax.train.lm import loss_positions, next_token_logprobs, nll_loss
  rng = np.random.default_rng(0)
  b, t = 3, 48
  seg = np.array([[1] * 20 + [2] * 22 + [0] * 6, [1] * 48, [1] * 5 + [2] * 30 + [0] * 13])
  starts = np.maximum.accumulate(  # the index where each position's segment began
      np.where(np.diff(seg, prepend=-1, axis=1) != 0, np.arange(t), 0), axis=1)
  pos = np.arange(t) - starts
  mask = (rng.random((b, t)) < 0.4) & (seg > 0)
  tokens = rng.integers(0, 300, (b, t)).astype(np.int32)
  rows = [jnp.asarray(x) for x in (tokens, pos, seg, mask)]
  select = jnp.asarray(loss_positions(seg, mask))
  assert select.shape[1] < t  # the head runs on fewer positions than the row holds
  # float64: the same sums in another order differ by ~1e-16 of their size, where a misread
  # target differs by its whole log-prob
  with jax.enable_x64(True):
    model = create_model(QwenConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                                    tie_embeddings=True), single_device_mesh(), seed=0,
                         dtype="float64", param_dtype="float64", attention_impl="xla")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, select):
      batch = PackedBatch(*rows, select=select)
      return nll_loss(*next_token_logprobs(nnx.merge(graphdef, p, rest), batch))

    whole, g_whole = jax.value_and_grad(loss)(params, None)
    part, g_part = jax.value_and_grad(loss)(params, select)
  assert whole.dtype == np.float64
  np.testing.assert_allclose(part, whole, rtol=1e-12)
  for a, w in zip(jax.tree.leaves(g_part), jax.tree.leaves(g_whole)):
    np.testing.assert_allclose(a, w, rtol=0, atol=1e-10 * float(np.max(np.abs(w))))


def test_the_entropy_of_a_peaked_distribution_is_never_below_zero():
  """Entropy as `lse - Σ p·z` on raw float32 logits subtracts two numbers the size of max|z|:
  at temperature 0.25 (max|z| about 100) it came out at -2e-4, against a float64 truth of
  1e-9. Shifted by the max, each term is small, and the error is a float32 rounding of the
  entropy's own size."""
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(1, 256, 64)).astype(np.float32)
  head = (rng.normal(size=(64, 4096)) * 0.6).astype(np.float32)
  head[:, 7] += hidden[0].mean(0) * 3  # one token far ahead of the rest
  targets = rng.integers(0, 4096, (1, 256))
  s = token_scores(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets),
                   temperature=0.25)
  with jax.enable_x64(True):
    exact = reference_token_scores(jnp.asarray(hidden, jnp.float64),
                                   jnp.asarray(head, jnp.float64), jnp.asarray(targets),
                                   temperature=0.25)
  z = (hidden.astype(np.float64) @ head.astype(np.float64)) / 0.25
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  assert float(np.max(np.abs(z))) > 50  # the case that cancelled
  assert float(jnp.min(s.entropy)) >= 0.0
  # Rounding of the shifted sum: eps of the entropy itself, plus eps of |z| on the share of
  # probability off the top token (the terms p_i·(z_i - max) that are not zero).
  eps, h = float(np.finfo(np.float32).eps), np.asarray(exact.entropy)
  bound = 16 * eps * (1.0 + h + np.abs(z).max(-1) * (1.0 - p.max(-1)))
  assert np.all(np.abs(np.asarray(s.entropy, np.float64) - h) <= bound)
