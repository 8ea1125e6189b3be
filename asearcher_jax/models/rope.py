"""Rotary position embeddings with the checkpoint's theta and scaling (default, linear, YaRN).

Frequencies follow Hugging Face's `modeling_rope_utils` so that converted
checkpoints reproduce the reference logits, including long-context YaRN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from asearcher_jax.models.config import QwenConfig


def inverse_frequencies(cfg: QwenConfig) -> tuple[np.ndarray, float]:
  """Returns (inv_freq[head_dim // 2], attention_factor) for the config."""
  dim, base = cfg.head_dim, cfg.rope_theta
  inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  s = cfg.rope_scaling
  if s is None:
    return inv_freq, 1.0
  if s.type == "linear":
    return inv_freq / s.factor, 1.0
  # YaRN: interpolate low frequencies, extrapolate high ones, ramp in between.
  factor = s.factor
  original = s.original_max_position_embeddings or cfg.max_position_embeddings

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attn = s.attention_factor
  if attn is None:
    attn = (mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim)
            if s.mscale and s.mscale_all_dim else mscale(factor))

  def correction_dim(rotations):
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolate = 1 - ramp
  inv = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
  return inv.astype(np.float32), float(attn)


def rope_tables(cfg: QwenConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [..., head_dim] in float32 for integer positions [...]."""
  inv_freq, attn_factor = inverse_frequencies(cfg)
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * attn_factor, jnp.sin(emb) * attn_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, T, heads, D] by per-token tables [B, T, D] (HF rotate-half layout)."""
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
