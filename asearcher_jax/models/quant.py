"""Weight-only int8 for serving: each matmul weight held as int8 with one float32 scale per
output channel, the scale applied to the matmul's output.

A decode step at serving batch sizes reads every weight once and does little arithmetic on it,
so its time is the bytes it reads: int8 weights are half of bfloat16 ones. Activations, norms,
biases, the KV cache and the softmax stay in the compute dtype. The learner keeps float32
master weights and publishes floats; a server quantizes them at load and at every swap
(`inference.weights.load_weights`), so a version's int8 weights come from its float ones alone.

Symmetric and per output channel, as AQT's and jax-llm-examples' int8 serving: scale =
max|w| / 127 over the axes the matmul contracts, q = round(w / scale). Scaling the output
rather than the weight leaves the dot a plain convert of its int8 operand, which XLA's GPU
GEMM fusions can read as int8, and costs one multiply per output element. (On CPU the
convert is a copy: int8 serving there is 10-20% slower than float32, and exists to test.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from asearcher_jax.models.chunking import accumulation_dtype

Quantization = Literal["none", "int8"]
_QMAX = 127.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantArray:
  """An int8 weight and its scales: `quant` has the float weight's shape, `scale` that shape
  without the contracted axes (so it broadcasts against the trailing axes of a matmul's output:
  every weight of the model is laid out contracted-axes-first)."""

  quant: jax.Array
  scale: jax.Array

  shape = property(lambda self: self.quant.shape)

  @property
  def T(self) -> QuantArray:  # noqa: N802 -- as jax.Array.T: the tied LM head is embed.T
    """[V, E] per-row scales -> [E, V] per-column: the same scales, now trailing."""
    if self.quant.ndim != 2 or self.scale.shape != self.quant.shape[:1]:
      raise ValueError("only a per-row [rows, cols] QuantArray transposes")
    return QuantArray(self.quant.T, self.scale)


def quantize(w: jax.Array, contracted: Sequence[int]) -> QuantArray:
  """Symmetric int8 over `contracted`, one scale per remaining index. A channel of zeros gets
  scale 1 (its int8 values are zeros either way), never a division by zero."""
  w32 = w.astype(jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=tuple(contracted), keepdims=True)
  scale = jnp.where(amax > 0, amax / _QMAX, 1.0)
  quant = jnp.clip(jnp.round(w32 / scale), -_QMAX, _QMAX).astype(jnp.int8)
  return QuantArray(quant, jnp.squeeze(scale, axis=tuple(contracted)))


def dequantize(w: QuantArray, contracted: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """The float weight `w` stands for."""
  acc = accumulation_dtype(dtype)
  scale = jnp.expand_dims(w.scale, tuple(contracted)).astype(acc)
  return (w.quant.astype(acc) * scale).astype(dtype)


def einsum(spec: str, x: jax.Array, w: jax.Array | QuantArray, *,
           preferred_element_type=None) -> jax.Array:
  """`jnp.einsum(spec, x, w)` for a float weight or a QuantArray: the int8 dot accumulates in
  float32 (float64 for float64 x) and its output, scaled per channel, is cast to x's dtype (or
  `preferred_element_type`)."""
  if not isinstance(w, QuantArray):
    return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)
  acc = accumulation_dtype(x.dtype)
  out = jnp.einsum(spec, x, w.quant.astype(x.dtype), preferred_element_type=acc)
  return (out * w.scale.astype(acc)).astype(preferred_element_type or x.dtype)


def take_rows(w: jax.Array | QuantArray, ids: jax.Array, dtype) -> jax.Array:
  """Rows `ids` of a [rows, cols] table (the embedding), in `dtype`."""
  if not isinstance(w, QuantArray):
    return jnp.take(w, ids, axis=0).astype(dtype)
  acc = accumulation_dtype(dtype)
  rows = jnp.take(w.quant, ids, axis=0).astype(acc)
  return (rows * jnp.take(w.scale, ids, axis=0).astype(acc)[..., None]).astype(dtype)


def is_quant(x) -> bool:
  return isinstance(x, QuantArray)


def quantize_placed(w: jax.Array, contracted: Sequence[int],
                    like: QuantArray | None = None) -> QuantArray:
  """`quantize` on the device(s) `w` lives on: int8 values sharded as `w`, scales as `w` less
  its contracted axes; or exactly as `like`, so a weight swap matches the served layout."""
  contracted = tuple(contracted)
  if like is not None:
    out = QuantArray(like.quant.sharding, like.scale.sharding)
  elif isinstance(w.sharding, NamedSharding):
    spec = tuple(w.sharding.spec) + (None,) * (w.ndim - len(w.sharding.spec))
    kept = P(*(a for i, a in enumerate(spec) if i not in contracted))
    out = QuantArray(w.sharding, NamedSharding(w.sharding.mesh, kept))
  else:
    out = None
  return jax.jit(quantize, static_argnums=1, out_shardings=out)(w, contracted)


def quantize_flat(flat: dict, axes: dict[str, tuple[int, ...]]) -> dict:
  """{"a/b": weight} with the weights `axes` names quantized over their contracted axes (the
  rest as they are)."""
  return {k: quantize_placed(v, axes[k]) if k in axes else v for k, v in flat.items()}
