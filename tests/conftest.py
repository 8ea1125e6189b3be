"""Test session setup: 8 virtual CPU devices (for mesh tests) before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from asearcher_jax.models import QwenConfig  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def single_device_mesh():
  """Tests that are not about sharding run on one device: faster on two cores."""
  from asearcher_jax.sharding import make_mesh
  return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def tiny_config(family="qwen3", tied=False, **kw) -> QwenConfig:
  base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
              num_kv_heads=2, family=family, tie_embeddings=tied, rope_theta=10000.0)
  base.update(kw)
  return QwenConfig(**base)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
  """Tiny random HF checkpoints written by transformers itself: {name: (dir, torch model)}."""
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

  specs = {
      "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
      "qwen2_tied": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
      "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 24}),
      "qwen3_tied": (Qwen3Config, Qwen3ForCausalLM, {"tie_word_embeddings": True}),
      "qwen3_bias": (Qwen3Config, Qwen3ForCausalLM, {"attention_bias": True}),
      "qwen2_yarn": (Qwen2Config, Qwen2ForCausalLM, {
          "max_position_embeddings": 64,
          "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                           "original_max_position_embeddings": 16}}),
  }
  out = {}
  torch.manual_seed(0)
  for name, (cfg_cls, model_cls, extra) in specs.items():
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
              rope_theta=10000.0)
    kw.update(extra)
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():  # HF zero-inits biases and ones norms; randomise all of them
      for p in model.parameters():
        p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    out[name] = (str(path), model)
  return out
