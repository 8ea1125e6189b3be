"""The Qwen2 / Qwen2.5 / Qwen3 decoder as a Flax NNX module.

Layer weights are stacked along a leading "layers" axis and applied with
`jax.lax.scan`, so compile time does not grow with depth and remat wraps one
layer. Every parameter carries logical axis names (`logical_axes` metadata);
`asearcher_jax.sharding.LOGICAL_RULES` maps them onto the mesh.

The same forward serves training (packed rows: segment ids + positions) and
decoding (a KV cache that the call writes at the given positions and reads
back), so the RL learner and the decode engine score tokens identically.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from asearcher_jax.models import paged_kv, quant
from asearcher_jax.models.attention import RESIDUALS, Segments, attention, make_mask
from asearcher_jax.models.chunking import accumulation_dtype
from asearcher_jax.models.config import AttentionImpl, QwenConfig, RematPolicy
from asearcher_jax.models.paged_kv import KVPages, PagedKernel
from asearcher_jax.models.rope import apply_rope, rope_tables
from asearcher_jax.sharding import constrain

_POLICIES = jax.checkpoint_policies
_KEEP_ATTENTION = _POLICIES.save_only_these_names(RESIDUALS)
# Every policy but `full` keeps what a flash kernel's backward reads (attention.RESIDUALS).
_REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer
    "attention": _KEEP_ATTENTION,
    "dots": _POLICIES.save_from_both_policies(_POLICIES.checkpoint_dots, _KEEP_ATTENTION),
    "dots_no_batch": _POLICIES.save_from_both_policies(
        _POLICIES.dots_with_no_batch_dims_saveable, _KEEP_ATTENTION),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values per layer: [layers, batch, max_len, kv_heads, head_dim]; slot j = pos. j."""

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, cfg: QwenConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> "KVCache":
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


# The axes each matmul weight contracts, which int8 serving quantizes over (models/quant.py):
# one scale per output channel. Stacked layer weights count their leading layer axis.
QUANTIZED_AXES = {
    "embed": (1,),  # [V, E]: a scale per token row serves the lookup and the tied head alike
    "lm_head": (0,),  # [E, V]
    "layers/wqkv": (1,),  # [L, E, K, G + 2, D]
    "layers/wo": (1, 2),  # [L, N, D, E]
    "layers/w_gate_up": (1,),  # [L, E, 2, F]
    "layers/w_down": (1,),  # [L, F, E]
}


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """HF-exact RMSNorm: normalise in float32 (float64 for float64 x, which tests compare in),
  cast back, then scale."""
  x32 = x.astype(accumulation_dtype(x.dtype))
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * y.astype(x.dtype)


class DecoderLayers(nnx.Module):
  """All decoder layers' weights, stacked on a leading layer axis."""

  def __init__(self, cfg: QwenConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    L, E, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    N, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    normal = jax.nn.initializers.normal(0.02)
    ones, zeros = jax.nn.initializers.ones, jax.nn.initializers.zeros
    # Every tensor draws its own key in the order of the unfused layout (q, k, v; gate, up), so
    # a seed initialises the same model as before the projections were fused.
    draw = lambda shape, init=normal: init(rngs.params(), shape, param_dtype)
    param = lambda value, axes: nnx.Param(value, logical_axes=axes)

    self.attn_norm = param(draw((L, E), ones), ("layers", "norm"))
    self.wqkv = param(fuse_qkv(draw((L, E, N, D)), draw((L, E, K, D)), draw((L, E, K, D))),
                      ("layers", "embed", "kv_heads", "qkv", "head_dim"))
    self.wo = param(draw((L, N, D, E)), ("layers", "q_heads", "head_dim", "embed"))
    if cfg.qkv_bias:
      self.bqkv = param(fuse_qkv(draw((L, N, D), zeros), draw((L, K, D), zeros),
                                 draw((L, K, D), zeros)), ("layers", "kv_heads", "qkv", "head_dim"))
    if cfg.o_bias:
      self.bo = param(draw((L, E), zeros), ("layers", "norm"))
    if cfg.qk_norm:
      self.q_norm = param(draw((L, D), ones), ("layers", "head_dim"))
      self.k_norm = param(draw((L, D), ones), ("layers", "head_dim"))
    self.mlp_norm = param(draw((L, E), ones), ("layers", "norm"))
    self.w_gate_up = param(jnp.stack([draw((L, E, F)), draw((L, E, F))], axis=2),
                           ("layers", "embed", "gate_up", "mlp"))
    self.w_down = param(draw((L, F, E)), ("layers", "mlp", "embed"))


def fuse_qkv(q, k, v):
  """Query [..., N, D], key and value [..., K, D] -> one [..., K, N/K + 2, D] projection.

  Each kv head sits beside its N/K query heads (query head n uses kv head n // (N/K), as in HF
  GQA), so one matmul makes q, k and v, and splitting kv heads over devices keeps every group
  whole. Works on numpy and jax arrays (checkpoint conversion and the forward share it).
  """
  xp = np if isinstance(q, np.ndarray) else jnp
  *lead, n, d = q.shape
  kh = k.shape[-2]
  q = q.reshape(*lead, kh, n // kh, d)
  return xp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)


def split_qkv(qkv):
  """The inverse of `fuse_qkv`: [..., K, G + 2, D] -> q [..., K·G, D], k, v [..., K, D]."""
  *lead, kh, parts, d = qkv.shape
  g = parts - 2
  return qkv[..., :g, :].reshape(*lead, kh * g, d), qkv[..., g, :], qkv[..., g + 1, :]


def decoder_layer(p: dict[str, jax.Array], x: jax.Array, cos: jax.Array, sin: jax.Array,
                  mask: jax.Array | Segments, positions: jax.Array,
                  cache: tuple | None, cfg: QwenConfig, impl: AttentionImpl,
                  mesh: Mesh | None = None):
  """One pre-norm decoder layer on x [B, T, E] with one layer's weights `p` (in x's dtype).

  `cache` is (k, v, layer, window, table, kernel). With table None, k/v are the whole
  [layers, B, S, K, D] cache: this layer's new keys/values are scattered into it in place (it
  is a loop carry, so nothing is copied) and attention reads back the layer's first `window`
  slots. With a page table [B, pages], k/v are a page pool (models/paged_kv.py), written and
  read through the table; `kernel` "xla" gathers the first `window` positions, a Pallas
  kernel reads each row's live pages alone (decode, T = 1).
  """
  dt = x.dtype
  h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
  qkv = quant.einsum("bte,ekgd->btkgd", h, p["wqkv"])
  if cfg.qkv_bias:
    qkv = qkv + p["bqkv"]
  q, k, v = split_qkv(qkv)
  if cfg.qk_norm:
    q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
  q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "act_heads", "head_dim"))
  k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "act_kv_heads", "head_dim"))
  # The scope files attention's ops, KV cache reads and writes included, apart in a profile
  # (benchmarks/device_profile.py); it changes nothing computed.
  with jax.named_scope("attention"):
    new_cache, o = None, None
    if cache is not None and cache[4] is not None:  # paged: write through the page table
      k_all, v_all, layer, window, table, kernel = cache
      k_all = paged_kv.write(k_all, layer, table, positions, k)
      v_all = paged_kv.write(v_all, layer, table, positions, v)
      new_cache = (k_all, v_all)
      if q.shape[1] == 1:  # decoding: straight over the pages
        o = paged_kv.decode_attention(q, k_all, v_all, layer, table, positions[:, 0] + 1, window,
                                      kernel, mesh)
      else:
        k = paged_kv.gather(k_all, layer, table, window).astype(dt)
        v = paged_kv.gather(v_all, layer, table, window).astype(dt)
    elif cache is not None:  # write this call's keys/values at their positions, attend to all
      k_all, v_all, layer, window = cache[:4]
      rows = jnp.arange(x.shape[0])[:, None]
      k_all = k_all.at[layer, rows, positions].set(k.astype(k_all.dtype), mode="drop")
      v_all = v_all.at[layer, rows, positions].set(v.astype(v_all.dtype), mode="drop")
      new_cache = (k_all, v_all)
      k, v = k_all[layer, :, :window].astype(dt), v_all[layer, :, :window].astype(dt)
    if o is None:
      o = attention(q, k, v, mask, impl, mesh)
  attn_out = quant.einsum("bthd,hde->bte", o, p["wo"])
  if cfg.o_bias:
    attn_out = attn_out + p["bo"]
  x = constrain(x + attn_out, ("batch", "seq", "act_embed"))
  h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
  gate_up = quant.einsum("bte,ecf->btcf", h, p["w_gate_up"])
  act = constrain(jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], ("batch", "seq", "act_mlp"))
  x = constrain(x + quant.einsum("btf,fe->bte", act, p["w_down"]), ("batch", "seq", "act_embed"))
  return x, new_cache


class Qwen(nnx.Module):
  """Qwen-family causal LM. Weights in `param_dtype` (fp32 master), compute in `dtype`."""

  def __init__(self, cfg: QwenConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               dtype=jnp.bfloat16, attention_impl: AttentionImpl = "auto",
               remat: RematPolicy = "none", mesh: Mesh | None = None):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.attention_impl = attention_impl
    self.remat = remat
    self.mesh = mesh  # the one the parameters live on, which per-device kernels run over
    normal = jax.nn.initializers.normal(0.02)
    self.embed = nnx.Param(normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype),
                           logical_axes=("vocab", "embed"))
    self.layers = DecoderLayers(cfg, rngs=rngs, param_dtype=param_dtype)
    self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), param_dtype), logical_axes=("norm",))
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(
          normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size), param_dtype),
          logical_axes=("embed", "vocab"))

  def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None,
                    cache: KVCache | KVPages | None = None, kv_window: int | None = None,
                    page_table: jax.Array | None = None, paged_kernel: PagedKernel = "xla"
                    ) -> tuple[jax.Array, KVCache | KVPages | None]:
    """Final-normed hidden states [B, T, E] (and the updated cache when one is given).

    tokens/positions/segment_ids are [B, T]. Without a cache, attention is
    within segments (pass segment_ids for packed rows; 0 is fine for padding).
    With a cache, keys/values are written at `positions` and the query attends
    to every cache slot at or before its own position. A static `kv_window`
    limits attention to the first slots of the cache (every query position must
    be below it): decoding short sequences in a long cache reads only what it needs.
    A `KVPages` cache is read and written through `page_table` [B, pages] instead.
    """
    cfg = self.cfg
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is None:
      if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
      mask = (positions, segment_ids)  # `attention` builds a dense mask if its path needs one
    else:
      paged = isinstance(cache, KVPages)
      if paged != (page_table is not None):
        raise ValueError("a page table goes with a paged cache (KVPages), and only with one")
      kv_window = kv_window or (page_table.shape[1] * cache.page_size if paged
                                else cache.max_len)
      slots = jnp.broadcast_to(jnp.arange(kv_window, dtype=jnp.int32), (b, kv_window))
      mask = make_mask(positions, slots)
    x = quant.take_rows(self.embed.get_value(), tokens, self.dtype)
    x = constrain(x, ("batch", "seq", "act_embed"))
    cos, sin = rope_tables(cfg, positions)
    # cast to the compute dtype once, outside the layer loop: under remat the backward pass
    # would otherwise cast every layer's weights again (a no-op when they are served in it).
    # int8 weights stay int8 until their matmul (models/quant.py).
    layer_params = jax.tree.map(
        lambda a: a if quant.is_quant(a) else a.astype(self.dtype),
        nnx.to_pure_dict(nnx.state(self.layers, nnx.Param)), is_leaf=quant.is_quant)

    if cache is None:
      def body(x, p):
        return decoder_layer(p, x, cos, sin, mask, positions, None, cfg,
                             self.attention_impl, self.mesh)[0], None

      if self.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
      x, _ = jax.lax.scan(body, x, layer_params)
    else:  # the cache rides in the carry so that each step updates it in place
      def body(carry, xs):
        x, k, v = carry
        p, layer = xs
        x, (k, v) = decoder_layer(p, x, cos, sin, mask, positions,
                                  (k, v, layer, kv_window, page_table, paged_kernel),
                                  cfg, self.attention_impl, self.mesh)
        return (x, k, v), None

      layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
      (x, k, v), _ = jax.lax.scan(body, (x, cache.k, cache.v), (layer_params, layers))
      cache = type(cache)(k, v)
    x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
    return x, cache

  def head(self) -> jax.Array | quant.QuantArray:
    """The LM head [E, V] (the embedding's transpose when tied), in the parameter dtype."""
    return self.embed.get_value().T if self.cfg.tie_embeddings else self.lm_head.get_value()

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32 logits [B, T, V] (decoding); the head accumulates in float32 for exact
    log-probs. Training reads target log-probs through `models.lm_head.token_scores` instead,
    which never holds all of them."""
    head = self.head()
    head = head if quant.is_quant(head) else head.astype(hidden.dtype)
    out = quant.einsum("bte,ev->btv", hidden, head, preferred_element_type=jnp.float32)
    return constrain(out, ("batch", "seq", "act_vocab"))

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None):
    hidden, cache = self.hidden_states(tokens, positions, segment_ids, cache)
    return self.logits(hidden), cache
