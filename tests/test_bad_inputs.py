"""Bad checkpoints and configs stop with errors that name the file, tensor or field at fault."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from asearcher_jax.errors import CheckpointError, ConfigError
from asearcher_jax.models import from_pretrained, hf_checkpoint, save_pretrained


@pytest.fixture
def ckpt(hf_dirs, tmp_path):
  """A writable copy of a tiny Qwen2 checkpoint."""
  dst = tmp_path / "ckpt"
  shutil.copytree(hf_dirs["qwen2"][0], dst)
  return dst


def load(path):
  return from_pretrained(str(path), tokenizer=False, progress=False)


def edit_config(path, **changes):
  cfg = json.loads((path / "config.json").read_text())
  cfg.update(changes)
  (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, fn):
  tensors = load_file(str(path / "model.safetensors"))
  fn(tensors)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_config_json(ckpt):
  (ckpt / "config.json").unlink()
  with pytest.raises(CheckpointError, match="neither an HF directory .no config.json."):
    load(ckpt)


def test_malformed_config_json(ckpt):
  (ckpt / "config.json").write_text('{"vocab_size": 97,')
  with pytest.raises(ConfigError, match=r"config.json: malformed JSON"):
    load(ckpt)


def test_config_json_missing_fields(ckpt):
  cfg = json.loads((ckpt / "config.json").read_text())
  del cfg["hidden_size"]
  (ckpt / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError,
                     match=r"config.json: missing required field\(s\) \['hidden_size'\]"):
    load(ckpt)


@pytest.mark.parametrize("changes,message", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
     r"unsupported architecture \['LlamaForCausalLM'\]"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}},
     "rope scaling type 'longrope' is not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     r"rope_parameters \(default\) and rope_scaling \(linear\) disagree"),
])
def test_unsupported_architectures(ckpt, changes, message):
  edit_config(ckpt, **changes)
  with pytest.raises(ConfigError, match=message):
    load(ckpt)


def test_missing_tensor_is_named(ckpt):
  edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError,
                     match=r"missing tensor model.layers.1.mlp.up_proj.weight "
                           r"\(expected shape \[96, 64\]\)"):
    load(ckpt)


def test_wrong_shape_names_file_tensor_and_shapes(ckpt):
  def shrink(t):
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
  edit_tensors(ckpt, shrink)
  with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.0.self_attn."
                     r"k_proj.weight has shape \[16, 64\], but config.json implies \[32, 64\]"):
    load(ckpt)


def test_tensors_the_config_does_not_explain(ckpt):
  edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64)}))
  with pytest.raises(CheckpointError, match="tensor.s. that config.json does not account for"):
    load(ckpt)


def test_index_pointing_at_a_missing_shard(ckpt):
  names = list(load_file(str(ckpt / "model.safetensors")))
  (ckpt / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}))
  with pytest.raises(CheckpointError,
                     match="lists model-00002-of-00002.safetensors, which does not exist"):
    load(ckpt)


def test_corrupt_safetensors_file(ckpt):
  (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
  with pytest.raises(CheckpointError, match="cannot read safetensors file"):
    load(ckpt)


def test_interrupted_export_leaves_nothing_that_looks_complete(ckpt, tmp_path, monkeypatch):
  model, _, _ = load(ckpt)
  calls = []

  def failing_save(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 2:
      raise OSError("disk full")
    save_file(tensors, path, metadata=metadata)

  monkeypatch.setattr(hf_checkpoint, "save_file", failing_save)
  out = tmp_path / "export"
  with pytest.raises(OSError, match="disk full"):
    save_pretrained(model, str(out), max_shard_bytes=20_000, progress=False)
  assert not out.exists()
  assert os.listdir(tmp_path) == ["ckpt"]  # the staging directory is gone too
  # A staging directory left by a killed process is hidden and has a different name.
  assert os.path.basename(calls[0]).startswith("shard-")
  assert os.path.basename(os.path.dirname(calls[0])).startswith(".export.partial-")


def test_staging_left_by_a_killed_export_is_removed_by_the_next(ckpt, tmp_path):
  """A SIGKILLed export cannot clean up after itself: the next export to the same place removes
  what dead writers staged (up to a whole model each), and leaves a live writer's alone."""
  model, _, _ = load(ckpt)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = [tmp_path / f".export.partial-{dead.pid}-0123abcd", tmp_path / ".export.partial-9f8e7d6c"]
  live = tmp_path / f".export.partial-{os.getpid()}-feedbeef"
  for d in stale + [live]:
    d.mkdir()
    (d / "shard-00000.safetensors").write_bytes(b"x" * 1000)
  save_pretrained(model, str(tmp_path / "export"), progress=False)
  assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", "export", live.name])


def test_export_refuses_to_overwrite_unless_asked(ckpt, tmp_path):
  model, _, _ = load(ckpt)
  out = tmp_path / "export"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(CheckpointError, match="already exists"):
    save_pretrained(model, str(out), progress=False)
  assert (out / "keep.txt").read_text() == "mine"
  # overwrite replaces an HF checkpoint, never a directory of something else
  with pytest.raises(ConfigError, match="holds files but no HF checkpoint"):
    save_pretrained(model, str(out), overwrite=True, progress=False)
  assert (out / "keep.txt").read_text() == "mine"
  (out / "keep.txt").unlink()
  save_pretrained(model, str(out), overwrite=True, progress=False)  # an empty directory
  (out / "stale.txt").write_text("from the last export")
  save_pretrained(model, str(out), overwrite=True, progress=False)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(ConfigError, match="is a file"):  # it failed after a whole export
    save_pretrained(model, str(a_file), overwrite=True, progress=False)
