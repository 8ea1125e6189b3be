"""Rows walked in pieces: what the fused LM head and blockwise attention share.

Both loop (`lax.scan` / `lax.map`) over equal pieces of the sequence axis with every row at
once, so the batch axis keeps its sharding, and both keep scores and sums in float32 whatever
the compute dtype (float64 for float64 inputs, which the tests compare against).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def accumulation_dtype(dtype) -> jnp.dtype:
  """float32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def split_seq(x: jax.Array, size: int) -> jax.Array:
  """[B, T, ...] → [T / size, B, size, ...]: pieces of the sequence, leading for a loop."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape((b, t // size, size) + x.shape[2:]), 1, 0)


def merge_seq(x: jax.Array) -> jax.Array:
  """The inverse of `split_seq`: [n, B, size, ...] → [B, n * size, ...]."""
  n, b, size = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape((b, n * size) + x.shape[3:])
