"""The decode path: prefill a prompt into a KV cache, then one token per step.

These are the jitted building blocks that the decode engine composes (slots,
buckets, sampling); `greedy_generate` strings them together for the CLI and
for tests that check cached decoding against the full forward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from asearcher_jax.models.qwen import KVCache, Qwen


@functools.partial(jax.jit, donate_argnames=("cache",))
def prefill(model: Qwen, tokens: jax.Array, lengths: jax.Array, cache: KVCache,
            start: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
  """Writes tokens [B, T] (right-padded; `lengths` real tokens per row) at positions start..;

  returns the float32 logits at each row's last real token [B, V] and the cache.
  `start` [B] continues an existing prefix (multi-turn reuse); default 0.
  """
  b, t = tokens.shape
  start = jnp.zeros((b,), jnp.int32) if start is None else start
  positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  # Padding writes past the prompt; those slots are overwritten before any query can see them.
  hidden, cache = model.hidden_states(tokens, positions, cache=cache)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
  return model.logits(last)[:, 0], cache


@functools.partial(jax.jit, donate_argnames=("cache",))
def decode_step(model: Qwen, tokens: jax.Array, positions: jax.Array,
                cache: KVCache) -> tuple[jax.Array, KVCache]:
  """One token per row: tokens/positions [B] -> float32 logits [B, V] and the cache."""
  logits, cache = model(tokens[:, None], positions[:, None], cache=cache)
  return logits[:, 0], cache


def greedy_generate(model: Qwen, prompts: list[list[int]], max_new_tokens: int,
                    eos_id: int | None = None, max_len: int | None = None) -> list[list[int]]:
  """Greedy continuation of each prompt (stops at eos or max_new_tokens)."""
  b = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one token")
  width = int(lengths.max())
  max_len = max_len or width + max_new_tokens
  tokens = np.zeros((b, width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  cache = model.init_cache(b, max_len)
  logits, cache = prefill(model, jnp.asarray(tokens), jnp.asarray(lengths), cache)
  out: list[list[int]] = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  positions = lengths.copy()
  for _ in range(max_new_tokens):
    nxt = np.asarray(jnp.argmax(logits, axis=-1)).astype(np.int32)
    for i in range(b):
      if not done[i]:
        out[i].append(int(nxt[i]))
        done[i] = (eos_id is not None and nxt[i] == eos_id) or positions[i] + 1 >= max_len
    if done.all():
      break
    logits, cache = decode_step(model, jnp.asarray(nxt), jnp.asarray(positions), cache)
    positions += 1
  return out
