"""New weights for a serving engine, from any source, laid out exactly like the current ones.

Sources: an in-process params pytree (flat {"a/b": array}, nested dict or nnx
State), an orbax policy/training checkpoint, or an HF directory. Everything is
checked against the serving params (names, shapes, dtypes) before the driver
commits it, so a bad update is refused and the old version keeps serving. An orbax
step published with a content manifest (asearcher_jax.manifest) is also checked chunk by
chunk against its writer's hashes, in the dtype it was written in.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from asearcher_jax import manifest as weight_manifest
from asearcher_jax.checkpoint import Checkpointer, abstract_like
from asearcher_jax.errors import CheckpointError
from asearcher_jax.models import quant
from asearcher_jax.models.config import QwenConfig
from asearcher_jax.models.hf_checkpoint import load_hf_params
from asearcher_jax.models.params import flat_state, state_like
from asearcher_jax.models.qwen import QUANTIZED_AXES
from asearcher_jax.models.tokenizer import is_hf_dir


def load_weights(template, source: Any, cfg: QwenConfig, *, step: int | None = None,
                 verify: bool = True):
  """Returns an nnx State like `template` (same shapes, dtypes, shardings) holding `source`.

  Where the template holds int8 weights (`serve.quantization`), `source` gives them in float
  (as every checkpoint and publication does): they are read in the served float dtype (the
  norms'), then quantized one by one. A checkpoint is read whole first, so a load holds the
  float model and the new int8 one beside the served weights for a moment (`asearcher plan`
  counts both)."""
  target = flat_state(template)
  quantized = {k: v for k, v in target.items() if quant.is_quant(v)}
  if quantized:
    dtype = next(v.dtype for v in target.values() if not quant.is_quant(v))
    target = {k: jax.ShapeDtypeStruct(v.shape, dtype, sharding=v.quant.sharding)
              if k in quantized else v for k, v in target.items()}
  if isinstance(source, str):
    if not os.path.isdir(source):
      raise CheckpointError(f"{source}: no such directory")
    shardings = {k: v.sharding for k, v in target.items()}
    if is_hf_dir(source):
      _check_same_architecture(source, QwenConfig.from_hf_dir(source), cfg)
      dtype = next(iter(target.values())).dtype
      flat = load_hf_params(source, cfg, shardings, dtype, progress=False)
    else:
      with Checkpointer(source, read_only=True) as ckpt:
        model_config = ckpt.read_meta(step).get("metadata", {}).get("model_config")
        if model_config is not None:  # a policy checkpoint says what it holds
          _check_same_architecture(source, QwenConfig.from_hf_dict(model_config), cfg)
        manifest = ckpt.read_manifest(step) if verify else None
        stored = target
        if manifest is not None:  # restore as written, so the hashes apply; cast below
          kinds = weight_manifest.dtypes(manifest)
          stored = {k: jax.ShapeDtypeStruct(v.shape, kinds.get(k, v.dtype))
                    for k, v in target.items()}
        flat = ckpt.restore(step, params_target=abstract_like(stored, shardings))["params"]
        if manifest is not None:
          at = ckpt.latest_step() if step is None else step
          weight_manifest.verify(flat, manifest, f"{source} step {at}")
  elif isinstance(source, nnx.State):
    flat = flat_state(source)
  else:  # a flat {"a/b": array} or a nested dict
    flat = source if all(isinstance(k, str) and not isinstance(v, dict)
                         for k, v in source.items()) \
        else traverse_util.flatten_dict(source, sep="/")
  missing, extra = sorted(set(target) - set(flat)), sorted(set(flat) - set(target))
  if missing or extra:
    raise CheckpointError(f"weights do not match the served model: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}")
  for k, t in target.items():
    if quant.is_quant(flat[k]):
      raise CheckpointError(f"weights: {k} is already int8; load the float weights it came from")
    if tuple(np.shape(flat[k])) != t.shape:
      raise CheckpointError(f"weights: {k} has shape {list(np.shape(flat[k]))}, the served model "
                            f"has {list(t.shape)}")
  placed, flat = {}, dict(flat)  # entries leave `flat` as they are placed, so ours free
  for k, t in target.items():
    x = flat.pop(k)
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    placed[k] = jax.device_put(x, t.sharding).astype(t.dtype)
    if k in quantized:
      placed[k] = quant.quantize_placed(placed[k], QUANTIZED_AXES[k], quantized[k])
  return state_like(template, placed)


def _check_same_architecture(source: str, got: QwenConfig, served: QwenConfig) -> None:
  a, b = got.to_hf_dict(), served.to_hf_dict()
  if a != b:
    diff = {k: (v, b.get(k)) for k, v in a.items() if b.get(k) != v}
    raise CheckpointError(f"{source}: holds a different architecture than the one being served "
                          f"(checkpoint vs served: {diff})")
