"""Dense retrieval: an E5/BGE-style BERT encoder in Flax NNX, passage embeddings, exact search.

Search-R1 and ASearcher retrieve with E5-base-v2 (BERT-base, "query: "/"passage: "
prefixes, mean pooling, L2 normalisation) over a flat inner-product index; BGE uses the
[CLS] state instead. This module loads such an encoder from a local Hugging Face directory
(config.json, model.safetensors, tokenizer.json; no hub), embeds passages in length-sorted
batches into a memory-mapped `.npy`, and searches it exactly with chunked matrix products
(numpy BLAS), so no faiss is needed and results are exact.
"""

from __future__ import annotations

import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from asearcher_jax.errors import CheckpointError, ConfigError, RetrievalError
from asearcher_jax.models.config import read_json
from asearcher_jax.models.hf_checkpoint import SafetensorsReader


class EncoderConfig(BaseModel):
  """How texts become vectors; stored in the index manifest so queries match passages."""

  model_config = ConfigDict(extra="forbid", frozen=True)

  pooling: Literal["mean", "cls"] = "mean"  # mean: E5; cls: BGE
  normalize: bool = True
  query_prefix: str = "query: "
  passage_prefix: str = "passage: "
  max_length: int = Field(256, ge=8)
  batch_size: int = Field(64, ge=1)


class BertConfig(BaseModel):
  model_config = ConfigDict(extra="ignore", frozen=True)

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  position_embedding_type: str = "absolute"


def _layer_norm(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


_ACTS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
         "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
         "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
         "relu": jax.nn.relu}


class BertLayer(nnx.Module):
  def __init__(self, cfg: BertConfig, w: dict[str, np.ndarray]):
    p = lambda name: nnx.Param(jnp.asarray(w[name], jnp.float32))
    self.wq, self.bq = p("q.kernel"), p("q.bias")
    self.wk, self.bk = p("k.kernel"), p("k.bias")
    self.wv, self.bv = p("v.kernel"), p("v.bias")
    self.wo, self.bo = p("o.kernel"), p("o.bias")
    self.attn_ln_scale, self.attn_ln_bias = p("attn_ln.scale"), p("attn_ln.bias")
    self.w_in, self.b_in = p("ffn_in.kernel"), p("ffn_in.bias")
    self.w_out, self.b_out = p("ffn_out.kernel"), p("ffn_out.bias")
    self.out_ln_scale, self.out_ln_bias = p("out_ln.scale"), p("out_ln.bias")
    self.heads = cfg.num_attention_heads
    self.eps = cfg.layer_norm_eps
    self.act = cfg.hidden_act

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    B, L, E = x.shape
    H = self.heads
    split = lambda t: t.reshape(B, L, H, E // H)
    q = split(x @ self.wq[...] + self.bq[...])
    k = split(x @ self.wk[...] + self.bk[...])
    v = split(x @ self.wv[...] + self.bv[...])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(E // H) + bias
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, L, E)
    x = _layer_norm(attn @ self.wo[...] + self.bo[...] + x, self.attn_ln_scale[...],
                    self.attn_ln_bias[...], self.eps)
    h = _ACTS[self.act](x @ self.w_in[...] + self.b_in[...])
    return _layer_norm(h @ self.w_out[...] + self.b_out[...] + x, self.out_ln_scale[...],
                       self.out_ln_bias[...], self.eps)


class BertEncoder(nnx.Module):
  """BERT without the pooler: token ids -> last hidden states."""

  def __init__(self, cfg: BertConfig, w: dict[str, np.ndarray]):
    p = lambda name: nnx.Param(jnp.asarray(w[name], jnp.float32))
    self.cfg = cfg
    self.word, self.pos, self.type = p("word"), p("pos"), p("type")
    self.ln_scale, self.ln_bias = p("emb_ln.scale"), p("emb_ln.bias")
    self.layers = nnx.List([
        BertLayer(cfg, {k.split("/", 1)[1]: v for k, v in w.items() if k.startswith(f"{i}/")})
        for i in range(cfg.num_hidden_layers)])

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    L = ids.shape[1]
    x = self.word[...][ids] + self.pos[...][jnp.arange(L)][None] + self.type[...][0][None, None]
    x = _layer_norm(x, self.ln_scale[...], self.ln_bias[...], self.cfg.layer_norm_eps)
    bias = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
    for layer in self.layers:
      x = layer(x, bias)
    return x


def pool(hidden: jax.Array, mask: jax.Array, pooling: str, normalize: bool) -> jax.Array:
  if pooling == "cls":
    out = hidden[:, 0]
  else:
    m = mask[..., None].astype(hidden.dtype)
    out = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
  if normalize:
    out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
  return out


_HF_LAYER = {
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
    "attention.output.dense": "o", "attention.output.LayerNorm": "attn_ln",
    "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "out_ln",
}


def load_hf_bert(path: str) -> BertEncoder:
  """A BertEncoder from an HF directory (config.json + *.safetensors)."""
  cfg_path = os.path.join(path, "config.json")
  try:  # the policy's readers: malformed JSON, index files and shards are handled once
    cfg = BertConfig(**read_json(cfg_path))
    reader = SafetensorsReader(path)
  except (ConfigError, CheckpointError) as e:
    raise RetrievalError(f"dense encoder {path}: {e}") from None
  if cfg.position_embedding_type != "absolute":
    raise RetrievalError(f"{cfg_path}: position_embedding_type "
                         f"{cfg.position_embedding_type!r} is not supported (absolute only)")
  if cfg.hidden_act not in _ACTS:
    raise RetrievalError(f"{cfg_path}: hidden_act {cfg.hidden_act!r} is not supported")
  files = sorted({os.path.basename(f) for f in reader.files.values()})
  raw: dict[str, np.ndarray] = {}
  for key in reader.files:
    k = key.removeprefix("bert.")
    raw[k.replace(".gamma", ".weight").replace(".beta", ".bias")] = reader.get(key)
  w: dict[str, np.ndarray] = {}
  try:
    w["word"] = raw["embeddings.word_embeddings.weight"]
    w["pos"] = raw["embeddings.position_embeddings.weight"]
    w["type"] = raw["embeddings.token_type_embeddings.weight"]
    w["emb_ln.scale"] = raw["embeddings.LayerNorm.weight"]
    w["emb_ln.bias"] = raw["embeddings.LayerNorm.bias"]
    for i in range(cfg.num_hidden_layers):
      for hf, ours in _HF_LAYER.items():
        base = f"encoder.layer.{i}.{hf}"
        if ours.endswith("_ln"):
          w[f"{i}/{ours}.scale"] = raw[f"{base}.weight"]
        else:
          w[f"{i}/{ours}.kernel"] = raw[f"{base}.weight"].T
        w[f"{i}/{ours}.bias"] = raw[f"{base}.bias"]
  except KeyError as e:
    raise RetrievalError(f"dense encoder {path}: tensor {e.args[0]} missing from "
                         f"{', '.join(files)}") from None
  return BertEncoder(cfg, w)


def _bucket(n: int, max_length: int, lo: int = 16) -> int:
  size = lo
  while size < n:
    size *= 2
  return min(size, max_length)


class DenseEncoder:
  """Texts -> L2-normalised vectors, with the E5/BGE prefixes and pooling of `EncoderConfig`."""

  def __init__(self, path: str, config: EncoderConfig | None = None):
    from tokenizers import Tokenizer
    self.path = os.path.abspath(path)
    self.config = config or EncoderConfig()
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_path):
      raise RetrievalError(f"dense encoder {path}: no tokenizer.json")
    self.tokenizer = Tokenizer.from_file(tok_path)
    self.model = load_hf_bert(path)
    limit = min(self.config.max_length, self.model.cfg.max_position_embeddings)
    self.max_length = limit
    self.tokenizer.enable_truncation(limit)
    self.tokenizer.no_padding()
    pad = self.tokenizer.token_to_id("[PAD]")
    self.pad_id = 0 if pad is None else pad
    graphdef, state = nnx.split(self.model)
    cfg = self.config

    @jax.jit
    def forward(state, ids, mask):
      model = nnx.merge(graphdef, state)
      return pool(model(ids, mask), mask, cfg.pooling, cfg.normalize)

    self._state, self._forward = state, forward

  @property
  def dim(self) -> int:
    return self.model.cfg.hidden_size

  def _batch(self, texts: list[str]) -> np.ndarray:
    encs = self.tokenizer.encode_batch(texts)
    L = _bucket(max(len(e.ids) for e in encs), self.max_length)
    # Rows padded to a power of two (at most batch_size): query batches come in every size,
    # and each new shape would be a new XLA compile. Padding rows are all-mask-false and
    # dropped below.
    B = _bucket(len(texts), max(self.config.batch_size, len(texts)), lo=1)
    ids = np.full((B, L), self.pad_id, np.int32)
    mask = np.zeros((B, L), bool)
    for i, e in enumerate(encs):
      ids[i, :len(e.ids)] = e.ids
      mask[i, :len(e.ids)] = True
    return np.asarray(self._forward(self._state, ids, mask), np.float32)[:len(texts)]

  def encode(self, texts: list[str], is_query: bool, show_progress: bool = False,
             out: np.ndarray | None = None) -> np.ndarray:
    """Vectors [len(texts), dim] in input order; batches are sorted by length to pad less."""
    prefix = self.config.query_prefix if is_query else self.config.passage_prefix
    texts = [prefix + t for t in texts]
    out = np.zeros((len(texts), self.dim), np.float32) if out is None else out
    order = np.argsort([len(t) for t in texts], kind="stable")
    bs = self.config.batch_size
    for start in tqdm(range(0, len(texts), bs), desc="embedding", unit="batch",
                      disable=not show_progress):
      idx = order[start:start + bs]
      out[idx] = self._batch([texts[i] for i in idx])
    return out


def build_embeddings(encoder: DenseEncoder, texts: list[str], out_path: str) -> np.ndarray:
  """Passage vectors written straight into a memory-mapped `.npy` (with a progress bar)."""
  arr = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32,
                                  shape=(len(texts), encoder.dim))
  encoder.encode(texts, is_query=False, show_progress=True, out=arr)
  arr.flush()
  return arr


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int,
                 chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
  """Exact inner-product top-k over all rows, chunk by chunk (rows may be memory-mapped)."""
  n = len(vectors)
  k = min(k, n)
  best_i = np.zeros((len(queries), 0), np.int64)
  best_s = np.zeros((len(queries), 0), np.float32)
  for start in range(0, n, chunk):
    s = queries @ np.asarray(vectors[start:start + chunk]).T
    kk = min(k, s.shape[1])
    top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
    best_i = np.concatenate([best_i, top + start], axis=1)
    best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
    if best_i.shape[1] > k:
      keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
      best_i = np.take_along_axis(best_i, keep, 1)
      best_s = np.take_along_axis(best_s, keep, 1)
  order = np.argsort(-best_s, axis=1, kind="stable")
  return np.take_along_axis(best_i, order, 1), np.take_along_axis(best_s, order, 1)


class DenseIndex:
  """Memory-mapped passage vectors plus the encoder that made them."""

  def __init__(self, vectors: np.ndarray, encoder: DenseEncoder):
    if vectors.ndim != 2 or vectors.shape[1] != encoder.dim:
      raise RetrievalError(f"dense vectors have shape {vectors.shape}, encoder dim is "
                           f"{encoder.dim}")
    self.vectors, self.encoder = vectors, encoder

  @classmethod
  def load(cls, path: str, encoder: DenseEncoder) -> DenseIndex:
    f = os.path.join(path, "embeddings.npy")
    if not os.path.exists(f):
      raise RetrievalError(f"{f}: file not found (rebuild the index with --dense-encoder)")
    try:
      vectors = np.load(f, mmap_mode="r")
    except (ValueError, OSError) as e:
      raise RetrievalError(f"{f}: corrupt embeddings file ({e})") from None
    return cls(vectors, encoder)

  def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    return exact_search(self.vectors, self.encoder.encode(queries, is_query=True), k)
