"""A JetStream-protocol decode engine for the policy: prefill / insert / generate over KV slots.

The protocol is JetStream's (`init_decode_state`, `prefill`, `insert`,
`generate`, `load_params`); what RL adds is here too: every sampled token comes
with its sampling-time log-probability, prefill can continue an existing
prefix (multi-turn KV reuse), and a slot's cache can be extracted again so a
session keeps its context between turns.

Params are an explicit argument of every jitted function, so swapping weights
is passing another pytree with the same shapes and shardings: no recompile.
Prefill lengths are bucketed (powers of two), so compilation happens once per
bucket.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from asearcher_jax.models.qwen import CACHE_AXES, KVCache, Qwen
from asearcher_jax.inference.sampling import sample
from asearcher_jax.sharding import LOGICAL_RULES, logical_to_spec, make_mesh


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """Everything a generate step needs, for every slot at once."""

  cache: KVCache  # [layers, slots, max_len, kv_heads, head_dim]
  positions: jax.Array  # [slots] int32: tokens held in the cache = where the next one goes
  tokens: jax.Array  # [slots] int32: last sampled token, fed at the next step
  temperature: jax.Array  # [slots] f32
  top_k: jax.Array  # [slots] int32
  top_p: jax.Array  # [slots] f32
  keys: jax.Array  # [slots, 2] uint32 PRNG state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefix:
  """A prefilled request (batch 1), ready to be inserted into a slot."""

  cache: KVCache  # [layers, 1, max_len, kv_heads, head_dim]
  length: jax.Array  # int32: tokens in the cache
  token: jax.Array  # int32: first sampled token (not yet in the cache)
  logprob: jax.Array  # f32: its log-probability
  key: jax.Array  # [2] uint32: PRNG state after the first draw
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ResultTokens:
  """One generate step: the token sampled in every slot and its log-probability."""

  tokens: jax.Array  # [slots] int32
  logprobs: jax.Array  # [slots] f32


def prefill_buckets(min_bucket: int, max_len: int) -> tuple[int, ...]:
  buckets, b = [], min_bucket
  while b < max_len:
    buckets.append(b)
    b *= 2
  return tuple(buckets) + (max_len,)


class Engine:
  """Decode engine over a fixed number of slots, optionally sharded over a mesh."""

  def __init__(self, model: Qwen, *, slots: int, max_len: int, mesh: Mesh | None = None,
               min_prefill_bucket: int = 16, cache_dtype=None):
    if slots < 1 or max_len < 2:
      raise ValueError(f"need slots >= 1 and max_len >= 2, got {slots}, {max_len}")
    self.cfg = model.cfg
    self.mesh = mesh or make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                  devices=jax.devices()[:1])
    self.graphdef, params, self._rest = nnx.split(model, nnx.Param, ...)
    self.params = params
    self.slots = slots
    self.max_len = max_len
    self.buckets = prefill_buckets(min(min_prefill_bucket, max_len), max_len)
    self.cache_dtype = jnp.dtype(cache_dtype or model.dtype)
    spec = logical_to_spec(CACHE_AXES, _divisible_rules(self.mesh, slots, self.cfg.num_kv_heads))
    self._cache_sharding = NamedSharding(self.mesh, spec)
    self._replicated = NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  # -- protocol ------------------------------------------------------------------

  def load_params(self, params) -> None:
    """Installs new weights (an nnx State of Params with the current shapes)."""
    self.params = params

  def init_decode_state(self) -> DecodeState:
    shape = (self.cfg.num_layers, self.slots, self.max_len, self.cfg.num_kv_heads,
             self.cfg.head_dim)

    @functools.partial(jax.jit, out_shardings=DecodeState(
        KVCache(self._cache_sharding, self._cache_sharding), *(self._replicated,) * 6))
    def init():
      z = jnp.zeros(shape, self.cache_dtype)
      n = self.slots
      return DecodeState(KVCache(z, z), jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32),
                         jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.int32),
                         jnp.ones((n,), jnp.float32), jnp.zeros((n, 2), jnp.uint32))

    return init()

  def bucket(self, n: int) -> int:
    for b in self.buckets:
      if b >= n:
        return b
    raise ValueError(f"{n} tokens exceed the maximum length {self.max_len}")

  def prefill(self, params, tokens: np.ndarray, *, existing_prefix: Prefix | None = None,
              temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
              key: np.ndarray | jax.Array | None = None) -> Prefix:
    """Prefills `tokens` (1-D, unpadded) after `existing_prefix` if given; samples the first token.

    The existing prefix's cache is consumed (donated).
    """
    n = len(tokens)
    start = 0 if existing_prefix is None else int(existing_prefix.length)
    if n < 1:
      raise ValueError("prefill needs at least one token")
    if start + n >= self.max_len:
      raise ValueError(f"{start + n} tokens leave no room to generate within max_len "
                       f"{self.max_len}")
    padded = np.zeros((1, self.bucket(n)), np.int32)
    padded[0, :n] = tokens
    key = jax.random.PRNGKey(0) if key is None else key
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                jnp.asarray(key, jnp.uint32))
    if existing_prefix is None:
      return self._prefill_fresh(params, jnp.asarray(padded), jnp.int32(n), *sampling)
    return self._prefill_continue(params, jnp.asarray(padded), jnp.int32(n), existing_prefix.cache,
                                  jnp.int32(start), *sampling)

  def insert(self, prefix: Prefix, state: DecodeState, slot: int) -> DecodeState:
    return self._insert(prefix, state, jnp.int32(slot))

  def generate(self, params, state: DecodeState) -> tuple[DecodeState, ResultTokens]:
    return self._generate(params, state)

  # -- RL additions ----------------------------------------------------------------

  def extract(self, state: DecodeState, slot: int, length: int) -> Prefix:
    """The slot's cache as a batch-1 prefix holding `length` tokens (for session reuse)."""
    return self._extract(state, jnp.int32(slot), jnp.int32(length))

  def empty_prefix(self, length: int, k: np.ndarray, v: np.ndarray) -> Prefix:
    """A prefix from host arrays k/v [layers, length, kv_heads, head_dim] (host-offloaded sessions)."""
    shape = (self.cfg.num_layers, 1, self.max_len, self.cfg.num_kv_heads, self.cfg.head_dim)
    kk = np.zeros(shape, k.dtype)
    vv = np.zeros(shape, v.dtype)
    kk[:, 0, :length] = k
    vv[:, 0, :length] = v
    zero = jnp.zeros((), jnp.float32)
    return Prefix(KVCache(jnp.asarray(kk), jnp.asarray(vv)), jnp.int32(length), jnp.int32(0), zero,
                  jnp.zeros((2,), jnp.uint32), zero, jnp.int32(0), zero)

  # -- jitted bodies ----------------------------------------------------------------

  def _model(self, params) -> Qwen:
    return nnx.merge(self.graphdef, params, self._rest)

  def _first_token(self, params, hidden, n, temperature, top_k, top_p, key):
    last = jax.lax.dynamic_slice_in_dim(hidden, n - 1, 1, axis=1)
    logits = self._model(params).logits(last)[:, 0]
    tok, logp, keys = sample(logits, key[None], temperature[None], top_k[None], top_p[None])
    return tok[0], logp[0], keys[0]

  @functools.partial(jax.jit, static_argnums=0)
  def _prefill_fresh(self, params, tokens, n, temperature, top_k, top_p, key):
    cache = KVCache.zeros(self.cfg, 1, self.max_len, self.cache_dtype)
    return self._prefill_body(params, tokens, n, cache, jnp.int32(0), temperature, top_k, top_p,
                              key)

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
  def _prefill_continue(self, params, tokens, n, cache, start, temperature, top_k, top_p, key):
    return self._prefill_body(params, tokens, n, cache, start, temperature, top_k, top_p, key)

  def _prefill_body(self, params, tokens, n, cache, start, temperature, top_k, top_p, key):
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    hidden, cache = self._model(params).hidden_states(tokens, positions, cache=cache)
    tok, logp, key = self._first_token(params, hidden, n, temperature, top_k, top_p, key)
    return Prefix(cache, start + n, tok, logp, key, temperature, top_k, top_p)

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
  def _insert(self, prefix: Prefix, state: DecodeState, slot) -> DecodeState:
    k = jax.lax.dynamic_update_slice_in_dim(state.cache.k, prefix.cache.k.astype(
        self.cache_dtype), slot, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(state.cache.v, prefix.cache.v.astype(
        self.cache_dtype), slot, axis=1)
    return DecodeState(
        KVCache(k, v), state.positions.at[slot].set(prefix.length),
        state.tokens.at[slot].set(prefix.token),
        state.temperature.at[slot].set(prefix.temperature), state.top_k.at[slot].set(prefix.top_k),
        state.top_p.at[slot].set(prefix.top_p), state.keys.at[slot].set(prefix.key))

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
  def _generate(self, params, state: DecodeState) -> tuple[DecodeState, ResultTokens]:
    logits, cache = self._model(params)(state.tokens[:, None], state.positions[:, None],
                                        cache=state.cache)
    tokens, logprobs, keys = sample(logits[:, 0], state.keys, state.temperature, state.top_k,
                                    state.top_p)
    positions = jnp.minimum(state.positions + 1, self.max_len)
    new = dataclasses.replace(state, cache=cache, positions=positions, tokens=tokens, keys=keys)
    return new, ResultTokens(tokens, logprobs)

  @functools.partial(jax.jit, static_argnums=0)
  def _extract(self, state: DecodeState, slot, length) -> Prefix:
    k = jax.lax.dynamic_slice_in_dim(state.cache.k, slot, 1, axis=1)
    v = jax.lax.dynamic_slice_in_dim(state.cache.v, slot, 1, axis=1)
    zero = jnp.zeros((), jnp.float32)
    return Prefix(KVCache(k, v), length, jnp.int32(0), zero, state.keys[slot], zero,
                  jnp.int32(0), zero)

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


def _divisible_rules(mesh: Mesh, slots: int, kv_heads: int) -> dict:
  """The policy's rules, replicating cache axes that the mesh cannot split evenly."""
  rules = dict(LOGICAL_RULES)
  for axis, size in (("batch", slots), ("act_kv_heads", kv_heads)):
    target = rules[axis]
    names = () if target is None else ((target,) if isinstance(target, str) else target)
    if size % int(np.prod([mesh.shape[n] for n in names] or [1])):
      rules[axis] = None
  return rules
