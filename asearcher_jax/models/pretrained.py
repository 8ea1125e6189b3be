"""Building policies: at random, from HF directories, from orbax checkpoints; and exporting them.

Parameters are always created directly in their final sharding (initialisation
under `jax.jit` with out_shardings, loading with per-device callbacks), so a
model larger than one device never has to fit on one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from jax.sharding import Mesh

from asearcher_jax.errors import CheckpointError
from asearcher_jax.models.config import QwenConfig
from asearcher_jax.models.hf_checkpoint import (
  copy_tokenizer_files,
  load_hf_params,
  save_hf_checkpoint,
)
from asearcher_jax.models.qwen import Qwen
from asearcher_jax.models.tokenizer import Tokenizer
from asearcher_jax.sharding import make_mesh, state_shardings


def default_mesh() -> Mesh:
  """All devices on the fsdp axis."""
  return make_mesh({"data": 1, "fsdp": -1, "tensor": 1})


def _builder(cfg: QwenConfig, seed: int, param_dtype, dtype, attention_impl, remat):
  return lambda: Qwen(cfg, rngs=nnx.Rngs(seed), param_dtype=jnp.dtype(param_dtype),
                      dtype=jnp.dtype(dtype), attention_impl=attention_impl, remat=remat)


def abstract_model(cfg: QwenConfig, *, seed: int = 0, param_dtype="float32", dtype="bfloat16",
                   attention_impl="auto", remat="none") -> Qwen:
  """The model with ShapeDtypeStruct leaves: shapes, dtypes and logical axes, no memory."""
  return nnx.eval_shape(_builder(cfg, seed, param_dtype, dtype, attention_impl, remat))


def param_shardings(model: Qwen, mesh: Mesh) -> dict[str, jax.sharding.NamedSharding]:
  """Flat {"a/b": NamedSharding} for every parameter; raises if the mesh does not divide one."""
  return flat_state(state_shardings(nnx.state(model, nnx.Param), mesh))


def flatten(tree: dict) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def flat_state(state) -> dict[str, Any]:
  """{"layers/wq": leaf, ...}: an nnx State's leaves by path."""
  return flatten(nnx.to_pure_dict(state))


def flat_params(model: Qwen) -> dict[str, jax.Array]:
  """{"layers/wq": array, ...}: the model's parameters by path."""
  return flat_state(nnx.state(model, nnx.Param))


def with_params(model: Qwen, params: dict[str, Any]) -> Qwen:
  """Returns the model (abstract or concrete) with its parameters replaced by `params` (flat)."""
  state = nnx.state(model, nnx.Param)
  expected = set(flat_state(state))
  if set(params) != expected:
    missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
    raise CheckpointError(f"parameters do not match the model: missing {missing}, "
                          f"unexpected {extra}")
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(params, sep="/"))
  nnx.update(model, state)
  return model


def create_model(cfg: QwenConfig, mesh: Mesh | None = None, *, seed: int = 0,
                 param_dtype="float32", dtype="bfloat16", attention_impl="auto",
                 remat="none") -> Qwen:
  """A randomly initialised model whose parameters are born sharded over `mesh`."""
  mesh = mesh or default_mesh()
  build = _builder(cfg, seed, param_dtype, dtype, attention_impl, remat)
  abstract = nnx.eval_shape(build)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh)
  state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def tokenizer_dir(path: str, step: int | None = None) -> str | None:
  """Where the tokenizer files of an HF directory or a policy checkpoint are."""
  if is_hf_dir(path):
    return path
  from asearcher_jax.checkpoint import read_policy_meta
  return read_policy_meta(path, step)[1]


def from_pretrained(path: str, mesh: Mesh | None = None, *, dtype="bfloat16",
                    param_dtype="float32", attention_impl="auto", remat="none",
                    tokenizer: bool | str = True, step: int | None = None,
                    progress: bool = True) -> tuple[Qwen, Tokenizer | None, QwenConfig]:
  """Loads (model, tokenizer, config) from an HF directory or an orbax policy checkpoint.

  `tokenizer` may be False (skip), True (from `path`) or another directory.
  For orbax checkpoints `step` picks a step (default: the latest).
  """
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such directory")
  mesh = mesh or default_mesh()
  if is_hf_dir(path):
    cfg = QwenConfig.from_hf_dir(path)
    model = abstract_model(cfg, param_dtype=param_dtype, dtype=dtype,
                           attention_impl=attention_impl, remat=remat)
    params = load_hf_params(path, cfg, param_shardings(model, mesh), param_dtype, progress)
  else:
    from asearcher_jax.checkpoint import Checkpointer, read_policy_meta
    cfg, _ = read_policy_meta(path, step)
    model = abstract_model(cfg, param_dtype=param_dtype, dtype=dtype,
                           attention_impl=attention_impl, remat=remat)
    with Checkpointer(path, async_save=False, read_only=True) as ckpt:
      params = ckpt.restore_params(model, mesh, step=step)
  model = with_params(model, params)
  tok = None
  if tokenizer:
    tok_dir = tokenizer if isinstance(tokenizer, str) else tokenizer_dir(path, step)
    if tok_dir is None:
      raise CheckpointError(f"{path}: checkpoint has no tokenizer; pass tokenizer=False or "
                            "the directory of one")
    tok = Tokenizer.from_dir(tok_dir)
  return model, tok, cfg


def save_pretrained(model: Qwen, out_dir: str, *, tokenizer: Tokenizer | str | None = None,
                    dtype=None, overwrite: bool = False, max_shard_bytes: int = 5 * 2**30,
                    progress: bool = True) -> str:
  """Exports as an HF directory (config.json, safetensors, tokenizer) that transformers loads."""
  if isinstance(tokenizer, str):
    write_extra = lambda d: copy_tokenizer_files(tokenizer, d)
  else:
    write_extra = tokenizer.save if tokenizer is not None else None
  return save_hf_checkpoint(flat_params(model), model.cfg, out_dir, dtype=dtype,
                            write_extra=write_extra, max_shard_bytes=max_shard_bytes,
                            overwrite=overwrite, progress=progress)
