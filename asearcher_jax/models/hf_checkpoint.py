"""Hugging Face safetensors checkpoints <-> our stacked, sharded parameters.

Loading builds each parameter with `jax.make_array_from_callback`: every
device reads only its own shard from the memory-mapped files, one layer tensor
at a time, so a model never sits on the host twice (nor on one device).
Export writes into a hidden staging directory and renames it into place at the
end, so an interrupted export never leaves a directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import uuid
from typing import Callable

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from asearcher_jax.errors import CheckpointError
from asearcher_jax.models.config import QwenConfig, read_json
from asearcher_jax.models.qwen import fuse_qkv, split_qkv
from asearcher_jax.outdir import HF_MARKERS, check_out_dir, replace_dir
from asearcher_jax.procs import pid_alive

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors that HF checkpoints may carry but that the architecture recomputes or ties.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_IGNORED_WHEN_TIED = ("lm_head.weight",)

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One of our parameters and the HF tensors it is made of (one set per layer if stacked).

  Fused projections are made of several HF tensors (q, k and v; gate and up); `to_ours`
  takes them in `hf` order and `to_hf` gives them back in that order.
  """

  ours: str  # path in our parameter tree, e.g. "layers/wqkv"
  hf: tuple[str, ...]  # HF names; "{i}" is the layer index for stacked parameters
  hf_shapes: tuple[tuple[int, ...], ...]  # per layer for stacked parameters
  to_ours: Callable[..., np.ndarray]
  to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf[0]

  def names(self, layer: int | None = None) -> list[str]:
    return [n.format(i=layer) for n in self.hf]

  def read(self, get: Callable[[str], np.ndarray], layer: int | None = None) -> np.ndarray:
    return self.to_ours(*(get(n) for n in self.names(layer)))

  def our_shape(self) -> tuple[int, ...]:
    return self.to_ours(*(np.empty(s, np.int8) for s in self.hf_shapes)).shape


def _single(ours: str, hf: str, hf_shape: tuple[int, ...], to_ours: Transform,
            to_hf: Transform) -> TensorMap:
  return TensorMap(ours, (hf,), (hf_shape,), to_ours, lambda x: (to_hf(x),))


def tensor_maps(cfg: QwenConfig) -> list[TensorMap]:
  """The complete HF <-> ours name and layout mapping for a config."""
  E, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  N, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  same = lambda x: x
  transpose = lambda x: x.T
  in_proj = lambda x: x.reshape(-1, D, E).transpose(2, 0, 1)  # HF [heads*D, E] -> [E, heads, D]
  out_of_proj = lambda x: x.transpose(1, 2, 0).reshape(-1, E)
  head_bias = lambda x: x.reshape(-1, D)  # [heads*D] -> [heads, D]
  flat = lambda x: x.reshape(-1)
  out_proj = (lambda x: x.reshape(E, N, D).transpose(1, 2, 0),
              lambda x: x.transpose(2, 0, 1).reshape(E, N * D))
  L = "model.layers.{i}."
  qkv_names = tuple(L + f"self_attn.{p}_proj" for p in "qkv")
  qkv_shapes = (N * D, K * D, K * D)
  maps = [_single("embed", "model.embed_tokens.weight", (V, E), same, same)]
  maps += [
      _single("layers/attn_norm", L + "input_layernorm.weight", (E,), same, same),
      TensorMap("layers/wqkv", tuple(n + ".weight" for n in qkv_names),
                tuple((rows, E) for rows in qkv_shapes),
                lambda q, k, v: fuse_qkv(in_proj(q), in_proj(k), in_proj(v)),
                lambda x: tuple(out_of_proj(t) for t in split_qkv(x))),
      _single("layers/wo", L + "self_attn.o_proj.weight", (E, N * D), *out_proj),
  ]
  if cfg.qkv_bias:
    maps.append(TensorMap("layers/bqkv", tuple(n + ".bias" for n in qkv_names),
                          tuple((rows,) for rows in qkv_shapes),
                          lambda q, k, v: fuse_qkv(head_bias(q), head_bias(k), head_bias(v)),
                          lambda x: tuple(flat(t) for t in split_qkv(x))))
  if cfg.o_bias:
    maps.append(_single("layers/bo", L + "self_attn.o_proj.bias", (E,), same, same))
  if cfg.qk_norm:
    maps += [
        _single("layers/q_norm", L + "self_attn.q_norm.weight", (D,), same, same),
        _single("layers/k_norm", L + "self_attn.k_norm.weight", (D,), same, same),
    ]
  maps += [
      _single("layers/mlp_norm", L + "post_attention_layernorm.weight", (E,), same, same),
      TensorMap("layers/w_gate_up", (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
                ((F, E), (F, E)), lambda gate, up: np.stack([gate.T, up.T], axis=1),
                lambda x: (x[:, 0].T, x[:, 1].T)),
      _single("layers/w_down", L + "mlp.down_proj.weight", (E, F), transpose, transpose),
      _single("final_norm", "model.norm.weight", (E,), same, same),
  ]
  if not cfg.tie_embeddings:
    maps.append(_single("lm_head", "lm_head.weight", (V, E), transpose, transpose))
  return maps


def _hf_tensors(tm: TensorMap, cfg: QwenConfig) -> list[tuple[str, tuple[int, ...]]]:
  """Every HF tensor of `tm` with its shape, layer by layer."""
  layers = range(cfg.num_layers) if tm.stacked else [None]
  return [(n, s) for i in layers for n, s in zip(tm.names(i), tm.hf_shapes)]


class SafetensorsReader:
  """Name -> tensor over one or many memory-mapped .safetensors files."""

  def __init__(self, path: str):
    self.path = path
    self._handles: dict[str, object] = {}
    index = os.path.join(path, INDEX_FILE)
    self.indexed = os.path.exists(index)
    if self.indexed:
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' object")
      self.files = {name: os.path.join(path, f) for name, f in weight_map.items()}
      for f in sorted(set(self.files.values())):
        if not os.path.isfile(f):
          raise CheckpointError(f"{index} lists {os.path.basename(f)}, which does not exist")
    else:
      shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
      if not shards:
        raise CheckpointError(f"{path}: no *.safetensors files (and no {INDEX_FILE})")
      self.files = {}
      for f in shards:
        for name in self._open(f).keys():
          self.files[name] = f

  def _open(self, f: str):
    if f not in self._handles:
      try:
        self._handles[f] = safe_open(f, framework="numpy")
      except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    return self._handles[f]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._read(name, lambda h: h.get_slice(name).get_shape()))

  def get(self, name: str) -> np.ndarray:
    return self._read(name, lambda h: h.get_tensor(name))

  def _read(self, name: str, read):
    f = self.files[name]
    try:
      return read(self._open(f))
    except CheckpointError:
      raise
    except Exception as e:  # safetensors' own errors name neither the file nor the index
      why = f" ({INDEX_FILE} says so)" if self.indexed else ""
      raise CheckpointError(f"{self.path}: {name} should be in {os.path.basename(f)}{why}, "
                            f"which cannot give it: {e}") from None

  def validate(self, cfg: QwenConfig) -> None:
    """Checks every tensor the config needs is present with the shape it implies, and no other."""
    expected = set()
    for tm in tensor_maps(cfg):
      for name, hf_shape in _hf_tensors(tm, cfg):
        expected.add(name)
        if name not in self.files:
          raise CheckpointError(
              f"{self.path}: missing tensor {name} (expected shape {list(hf_shape)})")
        shape = self.shape(name)
        if shape != hf_shape:
          raise CheckpointError(
              f"{self.files[name]}: tensor {name} has shape {list(shape)}, but config.json "
              f"implies {list(hf_shape)}")
    ignored = _IGNORED_WHEN_TIED if cfg.tie_embeddings else ()
    extra = sorted(n for n in self.files if n not in expected and n not in ignored
                   and not n.endswith(_IGNORED_SUFFIXES))
    if extra:
      raise CheckpointError(
          f"{self.path}: {len(extra)} tensor(s) that config.json does not account for, e.g. "
          f"{extra[:3]}; is config.json for this checkpoint?")


def load_hf_params(path: str, cfg: QwenConfig, shardings: dict[str, jax.sharding.Sharding],
                   param_dtype, progress: bool = True) -> dict[str, jax.Array]:
  """Reads an HF checkpoint into arrays laid out as `shardings` (flat "a/b" paths) says."""
  reader = SafetensorsReader(path)
  reader.validate(cfg)
  dtype = np.dtype(param_dtype)
  out = {}
  maps = tensor_maps(cfg)
  for tm in tqdm(maps, desc=f"loading {os.path.basename(os.path.normpath(path))}",
                 disable=not progress, unit="tensor"):
    if tm.stacked:
      shape = (cfg.num_layers,) + tm.our_shape()

      def read(index, tm=tm):
        layers = range(cfg.num_layers)[index[0]]
        return np.stack([tm.read(reader.get, i)[index[1:]].astype(dtype) for i in layers])
    else:
      shape = tm.our_shape()

      def read(index, tm=tm):
        return tm.read(reader.get)[index].astype(dtype)

    out[tm.ours] = jax.make_array_from_callback(shape, shardings[tm.ours], read)
  return out


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def remove_stale_staging(out_dir: str) -> list[str]:
  """Removes the staging folders that killed exports to `out_dir` left behind (a writer whose
  process is gone, or an unnamed one from before writers were named); returns them."""
  parent, name = os.path.split(os.path.abspath(out_dir))
  prefix = f".{name}.partial-"
  gone = []
  for entry in os.listdir(parent) if os.path.isdir(parent) else ():
    if not entry.startswith(prefix):
      continue
    pid = entry[len(prefix):].split("-", 1)[0]
    if pid.isdigit() and "-" in entry[len(prefix):] and pid_alive(int(pid)):
      continue  # an export still running
    shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    gone.append(entry)
  return gone


def save_hf_checkpoint(params: dict[str, jax.Array], cfg: QwenConfig, out_dir: str, *,
                       dtype=None, write_extra: Callable[[str], None] | None = None,
                       max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
                       progress: bool = True) -> str:
  """Writes `params` (flat "a/b" paths) as an HF directory that transformers loads.

  Tensors stream to disk shard by shard; `write_extra(dir)` adds files (the
  tokenizer) to the staging directory, which appears under its final name only
  once every file is written.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise CheckpointError(f"{out_dir} already exists (pass overwrite=True / --overwrite)")
  check_out_dir(out_dir, overwrite=overwrite, markers=HF_MARKERS, what="HF checkpoint",
                flag="out_dir")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  writer = jax.process_index() == 0
  if writer:
    remove_stale_staging(out_dir)
  stage = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{os.getpid()}-"
                               f"{uuid.uuid4().hex[:8]}")
  np_dtype = None if dtype is None else np.dtype(dtype)
  try:
    if writer:
      os.makedirs(stage)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    staged: list[tuple[str, list[str]]] = []

    def flush():
      nonlocal size
      if shards[-1] and writer:
        name = f"shard-{len(staged):05d}.safetensors"
        save_file(shards[-1], os.path.join(stage, name), metadata={"format": "pt"})
        staged.append((name, list(shards[-1])))
      shards[-1], size = {}, 0

    for tm in tqdm(tensor_maps(cfg), desc=f"exporting {os.path.basename(out_dir)}",
                   disable=not progress or not writer, unit="tensor"):
      if tm.ours not in params:
        raise CheckpointError(f"parameter {tm.ours} is missing from the model being exported")
      host = _to_host(params[tm.ours])
      layers = [host[i] for i in range(cfg.num_layers)] if tm.stacked else [host]
      tensors = [t for x in layers for t in tm.to_hf(x)]
      for (name, _), x in zip(_hf_tensors(tm, cfg), tensors):
        t = np.ascontiguousarray(x.astype(np_dtype or x.dtype))
        if size and size + t.nbytes > max_shard_bytes:
          flush()
        shards[-1][name] = t
        size += t.nbytes
    flush()
    if writer:
      _finish_stage(stage, staged, cfg, np_dtype, params)
      if write_extra:
        write_extra(stage)
      replace_dir(stage, out_dir)
  finally:
    if writer and os.path.exists(stage):
      shutil.rmtree(stage, ignore_errors=True)
  return out_dir


def _finish_stage(stage, staged, cfg, np_dtype, params):
  total = len(staged)
  weight_map = {}
  for k, (tmp_name, names) in enumerate(staged):
    final = SINGLE_FILE if total == 1 else f"model-{k + 1:05d}-of-{total:05d}.safetensors"
    os.rename(os.path.join(stage, tmp_name), os.path.join(stage, final))
    weight_map.update({n: final for n in names})
  if total > 1:
    total_size = sum(os.path.getsize(os.path.join(stage, f)) for f in set(weight_map.values()))
    _write_json(os.path.join(stage, INDEX_FILE),
                {"metadata": {"total_size": total_size}, "weight_map": weight_map})
  saved_dtype = np_dtype or np.dtype(params["embed"].dtype)
  _write_json(os.path.join(stage, "config.json"), cfg.to_hf_dict(torch_dtype=saved_dtype.name))


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
