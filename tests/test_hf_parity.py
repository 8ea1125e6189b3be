"""Our policy against Hugging Face transformers (PyTorch, CPU) on tiny random checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from asearcher_jax.models import from_pretrained, save_pretrained
from asearcher_jax.models.hf_checkpoint import INDEX_FILE

TOKENS = np.random.RandomState(0).randint(0, 97, (3, 13))


def torch_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def our_logits(model, tokens=TOKENS):
  logits, _ = jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens))
  return np.asarray(logits)


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied", "qwen3", "qwen3_tied", "qwen3_bias",
                                  "qwen2_yarn"])
def test_logits_match_transformers(hf_dirs, name):
  path, ref = hf_dirs[name]
  model, _, cfg = from_pretrained(path, dtype="float32", tokenizer=False, progress=False)
  assert cfg.num_kv_heads < cfg.num_heads  # grouped-query attention is exercised
  np.testing.assert_allclose(our_logits(model), torch_logits(ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["qwen2", "qwen3_tied", "qwen3_bias"])
def test_export_round_trip_loads_in_transformers(hf_dirs, tmp_path, name):
  path, ref = hf_dirs[name]
  model, _, _ = from_pretrained(path, dtype="float32", tokenizer=False, progress=False)
  out = save_pretrained(model, str(tmp_path / "export"), progress=False)
  reloaded = type(ref).from_pretrained(out).eval()
  np.testing.assert_allclose(torch_logits(reloaded), torch_logits(ref), atol=1e-5, rtol=0)


def test_sharded_bf16_export_has_index_and_loads(hf_dirs, tmp_path):
  path, ref = hf_dirs["qwen2"]
  model, _, _ = from_pretrained(path, dtype="float32", tokenizer=False, progress=False)
  out = save_pretrained(model, str(tmp_path / "bf16"), dtype="bfloat16",
                        max_shard_bytes=40_000, progress=False)
  with open(os.path.join(out, INDEX_FILE)) as f:
    index = json.load(f)
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and all(os.path.exists(os.path.join(out, f)) for f in files)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  reloaded = type(ref).from_pretrained(out, dtype=torch.float32).eval()
  # bf16 rounding of weights only: close to the fp32 reference, and our loader agrees with HF.
  np.testing.assert_allclose(torch_logits(reloaded), torch_logits(ref), atol=0.1)
  ours, _, _ = from_pretrained(out, dtype="float32", tokenizer=False, progress=False)
  np.testing.assert_allclose(our_logits(ours), torch_logits(reloaded), atol=1e-4, rtol=0)


def test_an_index_that_names_the_wrong_shard_says_so(hf_dirs, tmp_path):
  """safetensors' own error named neither the index nor the shard."""
  from asearcher_jax.errors import CheckpointError
  path, _ = hf_dirs["qwen2"]
  model, _, _ = from_pretrained(path, dtype="float32", tokenizer=False, progress=False)
  out = save_pretrained(model, str(tmp_path / "x"), max_shard_bytes=40_000, progress=False)
  index_path = os.path.join(out, INDEX_FILE)
  with open(index_path) as f:
    index = json.load(f)
  weight_map = index["weight_map"]
  weight_map["model.norm.weight"] = next(
      f for f in sorted(set(weight_map.values())) if f != weight_map["model.norm.weight"])
  with open(index_path, "w") as f:
    json.dump(index, f)
  with pytest.raises(CheckpointError, match=r"model.norm.weight should be in .*says so"):
    from_pretrained(out, dtype="float32", tokenizer=False, progress=False)


def test_shapes_no_hf_architecture_has_are_refused_at_parse_and_linear_rope_exports_clean():
  from asearcher_jax.errors import ConfigError
  from asearcher_jax.models.config import QwenConfig, RopeScaling
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
              num_kv_heads=2)
  for bad in ({"family": "qwen3", "qkv_bias": True}, {"family": "qwen2", "qkv_bias": False},
              {"family": "qwen3", "o_bias": True}):
    with pytest.raises(ConfigError, match="bias"):  # it failed only at export, after training
      QwenConfig(**base, **bad)
  linear = QwenConfig(**base, rope_scaling=RopeScaling(type="linear", factor=2.0))
  assert linear.to_hf_dict()["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
