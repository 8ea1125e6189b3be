"""Accelerator-only checks: fused attention kernels, bf16 decoding and a training step on a GPU/TPU.

Skipped on CPU (CI). Run on an accelerator host with
`JAX_PLATFORMS=cuda python -m pytest tests/test_accelerator.py` (or `tpu`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import single_device_mesh, tiny_config

from asearcher_jax.inference import Driver, Engine, Request, SamplingParams
from asearcher_jax.models import create_model
from asearcher_jax.models.paged_kv import platform_kernel
from asearcher_jax.train.config import OptimizerSection
from asearcher_jax.train.lm import PackedBatch, make_sft_step
from asearcher_jax.train.optimizer import make_optimizer

pytestmark = pytest.mark.skipif(jax.default_backend() == "cpu", reason="needs an accelerator")

RNG = np.random.RandomState(0)
# Kernel-friendly shapes: head_dim 64/128 in bf16, as real Qwen models have.
CFG = tiny_config("qwen3", vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=2,
                  num_heads=8, num_kv_heads=2, head_dim=64)


def forward(model, tokens, positions=None, segments=None):
  fn = jax.jit(lambda m, t, p, s: m(t, p, s)[0])
  return np.asarray(fn(model, tokens, positions, segments))


def packed_rows(length=256):
  """Two rows, each packing three sequences and trailing padding (segment 0)."""
  tokens = RNG.randint(0, CFG.vocab_size, (2, length)).astype(np.int32)
  cuts = [(0, 100, 180, 240), (0, 37, 200, 256)]
  segments = np.zeros((2, length), np.int32)
  positions = np.zeros((2, length), np.int32)
  for r, c in enumerate(cuts):
    for s, (a, b) in enumerate(zip(c[:-1], c[1:])):
      segments[r, a:b] = s + 1
      positions[r, a:b] = np.arange(b - a)
  return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)


@pytest.mark.parametrize("impl", ["auto", "xla", "cudnn", "pallas"])
def test_fused_attention_matches_reference_on_packed_rows(impl):
  if impl in ("cudnn", "pallas") and jax.default_backend() != "gpu":
    pytest.skip(f"{impl} is a GPU kernel")
  tokens, positions, segments = packed_rows()
  mesh = single_device_mesh()
  ref = forward(create_model(CFG, mesh, seed=0, dtype="float32", attention_impl="reference"),
                tokens, positions, segments)
  out = forward(create_model(CFG, mesh, seed=0, dtype="bfloat16", attention_impl=impl),
                tokens, positions, segments)
  real = np.asarray(segments) > 0
  err = np.abs(out - ref)[real]
  assert np.isfinite(out[real]).all()
  # bf16 compute against an fp32 reference: logits of a random model are O(1).
  assert err.max() < 0.15 and err.mean() < 0.02, (impl, err.max(), err.mean())


@pytest.mark.parametrize("choice", ["xla", "pallas"])
def test_bf16_greedy_decode_follows_the_full_forward(choice):
  """The engine's cached bf16 decode picks the tokens the full bf16 forward ranks first, with
  either paged decode attention (pallas: this platform's kernel)."""
  kernel = platform_kernel(choice, jax.default_backend())
  mesh = single_device_mesh()
  model = create_model(CFG, mesh, seed=1, dtype="bfloat16", attention_impl="auto")
  prompts = [RNG.randint(0, CFG.vocab_size, n).tolist() for n in (5, 33, 70)]
  with Driver(Engine(model, slots=4, max_len=160, mesh=mesh, paged_kernel=kernel)) as d:
    reqs = [d.submit(Request(p, SamplingParams(temperature=0.0, max_new_tokens=24)))
            for p in prompts]
    outs = [r.wait() for r in reqs]
  for p, r in zip(prompts, outs):
    seq = p + r.output_ids
    logits = forward(model, jnp.asarray([seq]))[0]
    for i, tok in enumerate(r.output_ids):
      row = logits[len(p) - 1 + i]
      # Accept near-ties: bf16 rounding may swap two candidates whose logits almost agree.
      assert row[tok] >= row.max() - 0.1, (i, tok, int(row.argmax()))
      np.testing.assert_allclose(r.logprobs[i], jax.nn.log_softmax(row)[tok], atol=0.1)


def test_sft_step_lowers_the_loss_on_the_device():
  mesh = single_device_mesh()
  model = create_model(CFG, mesh, seed=2, dtype="bfloat16", remat="dots")
  tokens, positions, segments = packed_rows()
  batch = PackedBatch(tokens=tokens, positions=positions, segment_ids=segments,
                      loss_mask=segments > 0)
  params, opt_state, step = make_sft_step(model, make_optimizer(
      OptimizerSection(learning_rate=3e-3, weight_decay=0.0)))
  losses = []
  for _ in range(8):
    params, opt_state, metrics = step(params, opt_state, batch)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] * 0.8, losses
