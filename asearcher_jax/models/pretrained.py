"""Building policies: at random, from HF directories, from orbax checkpoints; and exporting them.

Parameters are always created directly in their final sharding (initialisation
under `jax.jit` with out_shardings, loading with per-device callbacks), so a
model larger than one device never has to fit on one.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from asearcher_jax.checkpoint import Checkpointer, abstract_like
from asearcher_jax.errors import CheckpointError
from asearcher_jax.models.config import ModelSection, QwenConfig
from asearcher_jax.models.hf_checkpoint import load_hf_params, save_hf_checkpoint
from asearcher_jax.models.params import flat_params, param_shardings, with_params
from asearcher_jax.models.qwen import Qwen
from asearcher_jax.models.tokenizer import (
  TOKENIZER_SUBDIR,
  Tokenizer,
  build_tokenizer,
  copy_tokenizer_files,
  is_hf_dir,
  tokenizer_dir,
)
from asearcher_jax.outdir import replace_dir
from asearcher_jax.sharding import make_mesh, state_shardings


def default_mesh() -> Mesh:
  """All devices on the fsdp axis."""
  return make_mesh({"data": 1, "fsdp": -1, "tensor": 1})


def _builder(cfg: QwenConfig, seed: int, param_dtype, dtype, attention_impl, remat, mesh):
  return lambda: Qwen(cfg, rngs=nnx.Rngs(seed), param_dtype=jnp.dtype(param_dtype),
                      dtype=jnp.dtype(dtype), attention_impl=attention_impl, remat=remat,
                      mesh=mesh)


def abstract_model(cfg: QwenConfig, *, seed: int = 0, param_dtype="float32", dtype="bfloat16",
                   attention_impl="auto", remat="none", mesh: Mesh | None = None) -> Qwen:
  """The model with ShapeDtypeStruct leaves: shapes, dtypes and logical axes, no memory."""
  return nnx.eval_shape(_builder(cfg, seed, param_dtype, dtype, attention_impl, remat, mesh))


def create_model(cfg: QwenConfig, mesh: Mesh | None = None, *, seed: int = 0,
                 param_dtype="float32", dtype="bfloat16", attention_impl="auto",
                 remat="none") -> Qwen:
  """A randomly initialised model whose parameters are born sharded over `mesh`."""
  mesh = mesh or default_mesh()
  build = _builder(cfg, seed, param_dtype, dtype, attention_impl, remat, mesh)
  abstract = nnx.eval_shape(build)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh)
  state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def load_policy(model: ModelSection, mesh: Mesh | None = None, *, progress: bool = True
                ) -> tuple[Qwen, Tokenizer, QwenConfig]:
  """The policy a `model:` section names, as every process that holds one loads it: model.path's
  weights and tokenizer, or a random `model.arch` (seeded by model.seed) with the byte-level
  default tokenizer."""
  if model.remat == "auto":
    raise ValueError("model.remat auto: resolve it for the devices first "
                     "(memory_plan.resolve_remat); a policy that only serves takes none")
  mesh = mesh or default_mesh()
  kw = dict(param_dtype=model.param_dtype, dtype=model.dtype, attention_impl=model.attention,
            remat=model.remat)
  if model.path:
    return from_pretrained(model.path, mesh, progress=progress, **kw)
  return create_model(model.arch, mesh, seed=model.seed, **kw), build_tokenizer(), model.arch


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
                           attention_impl=attention_impl, remat=remat, mesh=mesh)
    params = load_hf_params(path, cfg, param_shardings(model, mesh), param_dtype, progress)
  else:
    cfg, _ = read_policy_meta(path, step)
    model = abstract_model(cfg, param_dtype=param_dtype, dtype=dtype,
                           attention_impl=attention_impl, remat=remat, mesh=mesh)
    target = abstract_like(flat_params(model), param_shardings(model, mesh))
    with Checkpointer(path, async_save=False, read_only=True) as ckpt:
      params = ckpt.restore(step, params_target=target)["params"]
  model = with_params(model, params)
  tok = None
  if tokenizer:
    tok_dir = tokenizer if isinstance(tokenizer, str) else tokenizer_dir(path)
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


def save_policy(directory: str, step: int, params: dict[str, jax.Array], cfg: QwenConfig, *,
                tokenizer_dir: str | None = None, version: int = 0,
                metadata: dict[str, Any] | None = None, async_save: bool = False,
                manifest: dict[str, Any] | None = None) -> None:
  """Saves params as a policy checkpoint: model config and tokenizer travel with the weights
  (and, when given, the weights' content manifest). Every process of a multi-process run
  calls it."""
  meta = dict(metadata or {}, model_config=cfg.to_hf_dict())
  if tokenizer_dir and jax.process_index() == 0:  # first, so a complete step implies a tokenizer
    dst = os.path.join(os.path.abspath(directory), TOKENIZER_SUBDIR)
    staging = dst + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    copy_tokenizer_files(tokenizer_dir, staging)
    replace_dir(staging, dst)
  with Checkpointer(directory, async_save=async_save) as ckpt:
    ckpt.save(step, params=params, version=version, metadata=meta, manifest=manifest)


def read_policy_meta(directory: str, step: int | None = None) -> tuple[QwenConfig, str | None]:
  """(model config, tokenizer dir or None) of a policy checkpoint."""
  with Checkpointer(directory, async_save=False, read_only=True) as ckpt:
    if not ckpt.all_steps():
      raise CheckpointError(f"{directory}: neither an HF directory (no config.json) nor an "
                            "orbax checkpoint with a complete step")
    meta = ckpt.read_meta(step)
  model_config = meta.get("metadata", {}).get("model_config")
  if model_config is None:
    raise CheckpointError(f"{directory}: checkpoint has no model_config; it is a training "
                          "checkpoint, not a policy checkpoint")
  cfg = QwenConfig.from_hf_dict(model_config, source=f"{directory} (model_config)")
  return cfg, tokenizer_dir(directory)
