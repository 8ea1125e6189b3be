"""Test session setup: 8 virtual CPU devices (for mesh tests) before JAX initialises."""

import os
import subprocess
import sys


def _known_to_xla(flag: str) -> bool:
  """XLA aborts a process whose XLA_FLAGS name a flag it does not know, and the CPU backend's
  flags come and go between jaxlib releases: ask a throwaway process."""
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                         env={**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"})
  return probe.returncode == 0


# Most files are bound by XLA's compiles, so tests compile for compile time:
# - LLVM at -O1 compiles test_model's programs 13% sooner than at the default -O2 and runs them
#   as fast (the HLO that tests inspect is the same; only machine code generation changes).
#   -O0 compiles a third sooner but ran the end-to-end tests' training 3.5x slower.
# - Without the CPU backend's fusion emitters (jaxlib 0.10), compiling takes about a quarter
#   less time and a debug-model training step 22% more: the suite ran 704 s against 860 s.
# The processes that tests start get them too (`child_env`), without the 8 forced devices: a
# command runs as a user runs it, on one device. Probed once; pytest-xdist's workers inherit it.
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false"
if "ASEARCHER_TEST_XLA_FLAGS" not in os.environ:
  os.environ["ASEARCHER_TEST_XLA_FLAGS"] = " ".join(
      ["--xla_backend_optimization_level=1"] + [FAST_COMPILE] * _known_to_xla(FAST_COMPILE))
CHILD_XLA_FLAGS = os.environ["ASEARCHER_TEST_XLA_FLAGS"]
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), CHILD_XLA_FLAGS,
                                               "--xla_force_host_platform_device_count=8"]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# No persistent XLA compilation cache: with one, a CI run died of a segmentation fault inside
# JAX's cache write (`executable.serialize()` of a CPU executable that an engine's driver
# thread had compiled), and pytest-xdist's replacement worker
# then hung the run until CI's limit. Each process compiles what it runs.

import jax  # noqa: E402
import pytest  # noqa: E402

from asearcher_jax.models import QwenConfig  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(items):
  """End-to-end files first: the test workers take whole files in collection order, and a
  minutes-long file started last left the other worker idle at the end of the run."""
  items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


def child_env(xla_flags: str = "", **extra: str) -> dict[str, str]:
  """The environment of an `asearcher` process that a test starts: this checkout importable,
  CPU only, output unbuffered, one device unless `xla_flags` asks for more."""
  return {**os.environ, "XLA_FLAGS": " ".join(filter(None, [CHILD_XLA_FLAGS, xla_flags])),
          "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
          "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **extra}


def fail_prefills_of(engine, monkeypatch, first_token: int = 127) -> None:
  """The engine's fresh prefill raises (a device fault) for any batch holding a prompt that
  starts with `first_token`."""
  real = engine.prefill_batch

  def poisoned(params, token_lists, *args, **kwargs):
    if any(t[0] == first_token for t in token_lists):
      raise RuntimeError("device fault")
    return real(params, token_lists, *args, **kwargs)

  monkeypatch.setattr(engine, "prefill_batch", poisoned)


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
