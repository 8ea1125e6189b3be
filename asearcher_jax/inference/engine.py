"""A JetStream-protocol decode engine for the policy: prefill / insert / generate over KV slots.

The protocol is JetStream's (`init_decode_state`, `prefill`, `insert`,
`generate`, `load_params`); what RL adds is here too: every sampled token comes
with its sampling-time log-probability, and `prefill_into` continues a sequence
whose earlier tokens' keys and values already lie in the pool (a session's next
turn), with `read_pages` / `write_pages` to move a session to host memory and back.

Params are an explicit argument of every jitted function, so swapping weights
is passing another pytree with the same shapes and shardings: no recompile.
Prefill lengths are bucketed (powers of two), so compilation happens once per
bucket.

The slots' keys and values live in one page pool (models/paged_kv.py): each slot's row of
the page table names the pages it holds, and `insert` takes the pages to write a prefix
into. Who gets which page is the caller's (the driver's allocator); without pages, `insert`
gives slot s the s-th run of max_len / page_size pages, the fixed layout of an unpaged cache.
A fresh prefill's output (a `Prefix`) is contiguous until `insert` pages it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from asearcher_jax.inference.protocol import MAX_TOP_LOGPROBS
from asearcher_jax.inference.sampling import sample
from asearcher_jax.models import paged_kv, quant
from asearcher_jax.models.config import QwenConfig
from asearcher_jax.models.paged_kv import POOL_AXES, SINK, KVPages, PagedKernel, pages_for
from asearcher_jax.models.params import flat_state, state_like
from asearcher_jax.models.qwen import QUANTIZED_AXES, KVCache, Qwen
from asearcher_jax.sharding import LOGICAL_RULES, activation_target, logical_to_spec, make_mesh


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """Everything a generate step needs, for every slot at once."""

  cache: KVPages  # [layers, kv_heads, pages, page_size, head_dim], page 0 the sink
  pages: jax.Array  # [slots, max_len / page_size] int32: each slot's pages, in order
  positions: jax.Array  # [slots] int32: tokens held in the cache = where the next one goes
  tokens: jax.Array  # [slots] int32: last sampled token, fed at the next step
  temperature: jax.Array  # [slots] f32
  top_k: jax.Array  # [slots] int32
  top_p: jax.Array  # [slots] f32
  keys: jax.Array  # [slots, 2] uint32 PRNG state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefix:
  """Prefilled requests (a batch of n), ready to be inserted into n slots.

  The cache holds the first `cache.k.shape[2]` positions (a prefill bucket); insert pages
  exactly that.
  """

  cache: KVCache  # [layers, n, length bucket, kv_heads, head_dim]
  length: jax.Array  # [n] int32: tokens in the cache
  token: jax.Array  # [n] int32: first sampled token (not yet in the cache)
  logprob: jax.Array  # [n] f32: its log-probability
  key: jax.Array  # [n, 2] uint32: PRNG state after the first draw
  temperature: jax.Array  # [n]
  top_k: jax.Array  # [n]
  top_p: jax.Array  # [n]
  top_ids: jax.Array  # [n, top_n] int32: the first draw's most likely tokens (top_n may be 0)
  top_logprobs: jax.Array  # [n, top_n] f32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ResultTokens:
  """One generate step: the token sampled in every slot and its log-probability (and, when the
  step was asked for them, the most likely tokens' log-probabilities)."""

  tokens: jax.Array  # [slots] int32
  logprobs: jax.Array  # [slots] f32
  top_ids: jax.Array  # [slots, top_n] int32 (top_n 0 or MAX_TOP_LOGPROBS)
  top_logprobs: jax.Array  # [slots, top_n] f32


def prefill_buckets(min_bucket: int, max_len: int) -> tuple[int, ...]:
  buckets, b = [], min_bucket
  while b < max_len:
    buckets.append(b)
    b *= 2
  return tuple(buckets) + (max_len,)


def first_bucket(buckets: tuple[int, ...], n: int) -> int:
  """The smallest of `buckets` (ascending, the last the maximum length) that holds n tokens."""
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"{n} tokens exceed the maximum length {buckets[-1]}")


class Engine:
  """Decode engine over a fixed number of slots, optionally sharded over a mesh."""

  def __init__(self, model: Qwen, *, slots: int, max_len: int, mesh: Mesh | None = None,
               min_prefill_bucket: int = 16, cache_dtype=None, decode_steps: int = 1,
               page_size: int = 16, num_pages: int | None = None,
               paged_kernel: PagedKernel = "xla", quantization: quant.Quantization = "none"):
    if slots < 1 or max_len < 2:
      raise ValueError(f"need slots >= 1 and max_len >= 2, got {slots}, {max_len}")
    if decode_steps < 1:
      raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
    if page_size < 1:
      raise ValueError(f"page_size must be >= 1, got {page_size}")
    if quantization not in ("none", "int8"):
      raise ValueError(f"quantization must be 'none' or 'int8', got {quantization!r}")
    self.page_size = page_size
    self.max_pages = pages_for(max_len, page_size)  # a page-table row: one whole sequence
    self.num_pages = slots * self.max_pages if num_pages is None else num_pages
    if self.num_pages < self.max_pages:
      raise ValueError(f"{self.num_pages} KV pages cannot hold one sequence of max_len "
                       f"{max_len} ({self.max_pages} pages of {page_size} tokens)")
    self.paged_kernel = paged_kernel
    self.decode_steps = decode_steps  # the block `generate_block` runs in steady decode
    self.cfg = model.cfg
    self.mesh = mesh or make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                  devices=jax.devices()[:1])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if quantization == "int8":  # weight swaps quantize in `inference.weights.load_weights`
      params = state_like(params, quant.quantize_flat(flat_state(params), QUANTIZED_AXES))
    self.quantization = quantization
    self.params = params
    self.slots = slots
    self.max_len = max_len
    self.buckets = prefill_buckets(min(min_prefill_bucket, max_len), max_len)
    self.cache_dtype = jnp.dtype(cache_dtype or model.dtype)
    rules = _divisible_rules(self.mesh, slots, self.cfg.num_kv_heads)
    # The pool is split over kv heads; pages are shared by every slot, so not over the batch.
    self._programs = _Programs(
        graphdef, rest, self.cfg, slots, max_len, page_size, self.max_pages, self.num_pages,
        self.cache_dtype, paged_kernel,
        NamedSharding(self.mesh, logical_to_spec(POOL_AXES, rules)),
        NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

  # -- protocol ------------------------------------------------------------------

  def load_params(self, params) -> None:
    """Installs new weights (an nnx State of Params with the current shapes)."""
    self.params = params

  def init_decode_state(self) -> DecodeState:
    """Every slot empty: its page-table row all sink."""
    return self._programs.init_state()

  def page_rows(self, pages: list[list[int]]) -> np.ndarray:
    """Page-table rows [len(pages), max_pages] for the given page lists (the rest sink)."""
    rows = np.full((len(pages), self.max_pages), SINK, np.int32)
    for i, ids in enumerate(pages):
      if len(ids) > self.max_pages or any(not 0 < p <= self.num_pages for p in ids):
        raise ValueError(f"pages {list(ids)[:8]}: at most {self.max_pages} ids in "
                         f"[1, {self.num_pages}]")
      rows[i, :len(ids)] = ids
    return rows

  def set_pages(self, state: DecodeState, slots: list[int], pages: list[list[int]]
                ) -> DecodeState:
    """Rewrites the page-table rows of `slots` (an empty list: the slot holds no page)."""
    rows = np.full((padded_rows(len(slots)), self.max_pages), SINK, np.int32)
    rows[:len(slots)] = self.page_rows(pages)
    index = np.full((rows.shape[0],), self.slots, np.int32)
    index[:len(slots)] = slots
    return self._programs.set_pages(state, jnp.asarray(index), jnp.asarray(rows))

  def bucket(self, n: int) -> int:
    return first_bucket(self.buckets, n)

  def prefill_size(self, rows: int, longest: int) -> int:
    """Tokens a batched prefill of `rows` rows computes, the longest `longest` tokens: rows
    padded to a power of two, tokens to the longest row's bucket."""
    return padded_rows(rows) * self.bucket(min(longest, self.max_len))

  def prefill_fits(self, rows: int, longest: int, bound: int | None) -> bool:
    """Whether such a prefill stays within `bound` tokens (None: no bound). A row alone always
    fits: a bound never starves a request."""
    return rows == 1 or bound is None or self.prefill_size(rows, longest) <= bound

  def prefill(self, params, tokens: np.ndarray, *, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, key: np.ndarray | jax.Array | None = None,
              top_logprobs: bool = False) -> Prefix:
    """Prefills one request (1-D tokens, unpadded). `top_logprobs`: the prefix also holds the
    first draw's MAX_TOP_LOGPROBS most likely tokens. (A continuation goes `prefill_into`.)"""
    key = np.asarray(jax.random.PRNGKey(0) if key is None else key, np.uint32)
    return self.prefill_batch(params, [tokens], [temperature], [top_k], [top_p], [key],
                              top_logprobs=top_logprobs)

  def prefill_into(self, params, state: DecodeState, slot: int, tokens: np.ndarray, start: int,
                   pages: list[int], *, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, key: np.ndarray | None = None, top_logprobs: bool = False
                   ) -> tuple[DecodeState, ResultTokens]:
    """Prefills `tokens` (1-D, unpadded) after the `start` positions that `pages` already hold,
    straight into the pool, and makes `slot` decode from there: a session's next turn reads
    its earlier turns' keys and values where they lie. The result holds the first draw ([1])."""
    key = np.asarray(jax.random.PRNGKey(0) if key is None else key, np.uint32)
    state, result = self.prefill_into_batch(params, state, [slot], [tokens], [start], [pages],
                                            [temperature], [top_k], [top_p], [key],
                                            top_logprobs=top_logprobs)
    return state, jax.tree.map(lambda x: x[:1], result)

  def prefill_into_batch(self, params, state: DecodeState, slots: list[int], token_lists: list,
                         starts: list[int], page_lists: list[list[int]], temperature: list,
                         top_k: list, top_p: list, keys: list, top_logprobs: bool = False
                         ) -> tuple[DecodeState, ResultTokens]:
    """`prefill_into` for several slots in one call (rows padded to a power of two, tokens to
    one bucket): several sessions continuing at once cost one dispatch. The result's row i is
    slots[i]'s first draw (padding rows follow)."""
    tokens, lengths = self._token_rows(token_lists)
    for t, start, pages in zip(token_lists, starts, page_lists):
      self._check_room(start + len(t))
      if len(pages) * self.page_size < start + len(t):
        raise ValueError(f"{len(pages)} pages cannot hold {start + len(t)} tokens")
    rows = len(lengths)
    table = np.full((rows, self.max_pages), SINK, np.int32)  # padding rows write to the sink
    table[:len(slots)] = self.page_rows(page_lists)
    return self._programs.prefill_into(
        params, state, _pad(slots, rows, np.int32, self.slots), tokens, lengths,
        _pad(starts, rows, np.int32, 0), jnp.asarray(table),
        _pad(temperature, rows, np.float32, 0.0), _pad(top_k, rows, np.int32, 0),
        _pad(top_p, rows, np.float32, 1.0), _pad(keys, rows, np.uint32, 0),
        top_n=MAX_TOP_LOGPROBS if top_logprobs else 0)

  def read_pages(self, state: DecodeState, pages: list[int], tokens: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The first `tokens` positions that `pages` hold, on the host: k, v [layers, tokens, K, D]
    (a session offloaded from device memory)."""
    k, v = self._programs.read_pages(state, jnp.asarray(self.page_rows([pages])[0]))
    # Copy whole, slice on the host: a device slice would compile once per length.
    return np.asarray(k)[:, :tokens], np.asarray(v)[:, :tokens]

  def write_pages(self, state: DecodeState, pages: list[int], k: np.ndarray, v: np.ndarray
                  ) -> DecodeState:
    """Writes host k, v [layers, n, K, D] into positions 0..n-1 of `pages` (a session brought
    back from host memory)."""
    n = k.shape[1]
    if len(pages) * self.page_size < n:
      raise ValueError(f"{len(pages)} pages cannot hold {n} tokens")
    shape = (k.shape[0], self.max_pages * self.page_size) + k.shape[2:]
    kk, vv = np.zeros(shape, self.cache_dtype), np.zeros(shape, self.cache_dtype)
    kk[:, :n], vv[:, :n] = k, v
    return self._programs.write_pages(state, jnp.asarray(self.page_rows([pages])[0]), kk, vv)

  def prefill_batch(self, params, token_lists: list, temperature: list, top_k: list, top_p: list,
                    keys: list, top_logprobs: bool = False) -> Prefix:
    """Prefills several fresh requests in one call (rows padded to a power of two)."""
    for t in token_lists:
      self._check_room(len(t))
    tokens, lengths = self._token_rows(token_lists)
    rows = len(lengths)
    prefix = self._programs.prefill_fresh(
        params, tokens, lengths, _pad(temperature, rows, np.float32, 0.0),
        _pad(top_k, rows, np.int32, 0), _pad(top_p, rows, np.float32, 1.0),
        _pad(keys, rows, np.uint32, 0), top_n=MAX_TOP_LOGPROBS if top_logprobs else 0)
    # The lengths as given (the program returns them unchanged): `insert` reads them on the
    # host, and reading the program's copy would wait for the whole prefill.
    return dataclasses.replace(prefix, length=lengths)

  def _token_rows(self, token_lists: list) -> tuple[jax.Array, jax.Array]:
    """Tokens [rows, bucket] and lengths [rows] of a batch, rows padded to a power of two
    (padding rows hold one token)."""
    if any(len(t) < 1 for t in token_lists):
      raise ValueError("prefill needs at least one token")
    lengths = [len(t) for t in token_lists]
    tokens = np.zeros((padded_rows(len(lengths)), self.bucket(max(lengths))), np.int32)
    for i, t in enumerate(token_lists):
      tokens[i, :len(t)] = t
    return jnp.asarray(tokens), _pad(lengths, len(tokens), np.int32, 1)

  def insert(self, prefix: Prefix, state: DecodeState, slot: int | list[int],
             pages: list[list[int]] | None = None) -> DecodeState:
    """Writes prefix row i into slot[i], its keys and values into pages[i] (extra padding
    rows of a batch are dropped). The pages must hold the prefix's tokens; what the prefix's
    bucket holds beyond them goes to the sink. Without pages, slot s takes the s-th run of
    max_pages pages (needs a pool of slots x max_pages)."""
    wanted = np.atleast_1d(np.asarray(slot, np.int32))
    if pages is None:
      if self.num_pages < self.slots * self.max_pages:
        raise ValueError("insert needs pages: the pool is smaller than slots x max_len")
      pages = [list(range(1 + s * self.max_pages, 1 + (s + 1) * self.max_pages))
               for s in wanted.tolist()]
    if len(pages) != len(wanted):
      raise ValueError(f"{len(wanted)} slots but {len(pages)} page lists")
    lengths = np.asarray(prefix.length)[:len(wanted)]
    short = [i for i, n in enumerate(lengths) if len(pages[i]) * self.page_size < n]
    if short:
      i = short[0]
      raise ValueError(f"{len(pages[i])} pages cannot hold the prefix's {lengths[i]} tokens")
    n = prefix.length.shape[0]
    slots = np.full((n,), self.slots, np.int32)
    slots[:len(wanted)] = wanted
    rows = np.full((n, self.max_pages), SINK, np.int32)
    rows[:len(wanted)] = self.page_rows(pages)
    return self._programs.insert(prefix, state, jnp.asarray(slots), jnp.asarray(rows))

  def generate(self, params, state: DecodeState, window: int | None = None,
               top_logprobs: bool = False) -> tuple[DecodeState, ResultTokens]:
    """One step for every slot; with `window`, attention reads only the first `window` slots.
    `top_logprobs`: also the MAX_TOP_LOGPROBS most likely tokens of every slot (a second
    compiled variant, used only while a request asks)."""
    return self._programs.generate(params, state, window, MAX_TOP_LOGPROBS if top_logprobs else 0)

  def generate_block(self, params, state: DecodeState, window: int | None = None,
                     steps: int = 1, top_logprobs: bool = False
                     ) -> tuple[DecodeState, ResultTokens]:
    """`steps` generate steps in one dispatch (a device loop), each exactly `generate`'s: the
    result's arrays gain a leading [steps] axis. The host syncs once per block instead of once
    per token; `window` must cover every position the block reaches."""
    return self._programs.generate_block(params, state, window,
                                         MAX_TOP_LOGPROBS if top_logprobs else 0, steps)

  def warmup(self, prefill_chunk: int | None = None, prefill_tokens: int | None = None,
             top_logprobs: bool = False) -> int:
    """Compiles every shape serving can meet, so no request ever waits for XLA (with
    `top_logprobs`, one that asks for the most likely tokens included: their programs are
    others, and twice the compiles; the engine thread compiles, so every slot would wait).

    That is: page-table rewrites, and fresh prefill and insert and session prefill into the
    pool for each batch of rows (powers of two up to the slot count) and length bucket, a
    session's trip to host memory and back, and generate for each attention window. A
    driver's `prefill_chunk` and `prefill_tokens` bound the prefills it runs: buckets up to
    the chunk's, and several rows only within the token bound (a row alone always runs), so
    warmup runs no prefill larger than serving would, which `asearcher plan` counts.
    Returns how many shapes it ran. Worth it for a server; tests and short runs skip it.
    """
    shapes = 0
    rows, r = [], 1
    while r < 2 * self.slots:
      rows.append(r)
      r *= 2
    state = self.init_decode_state()
    zeros_key = np.zeros((2,), np.uint32)
    for n in rows:  # page-table rewrites of 1, 2, 4, ... slots
      state = self.set_pages(state, list(range(min(n, self.slots))), [[]] * min(n, self.slots))
      shapes += 1
    longest = self.bucket(min(prefill_chunk or self.max_len, self.max_len))
    for top in (False, True) if top_logprobs else (False,):
      for bucket in (b for b in self.buckets if b <= longest):
        pages = list(range(1, pages_for(bucket, self.page_size) + 1))  # rows may share them
        for n in rows:
          if not self.prefill_fits(n, bucket, prefill_tokens):
            break
          prefix = self.prefill_batch(self.params, [np.zeros(bucket, np.int32)] * n,
                                      [0.0] * n, [0] * n, [1.0] * n, [zeros_key] * n,
                                      top_logprobs=top)
          m = min(n, self.slots)
          state = self.insert(prefix, state, list(range(m)), [pages] * m)
          # m sessions continuing after one held token each, with new tokens in this bucket
          state, _ = self.prefill_into_batch(
              self.params, state, list(range(m)), [np.zeros(max(bucket - 1, 1), np.int32)] * m,
              [1] * m, [pages] * m, [0.0] * m, [0] * m, [1.0] * m, [zeros_key] * m,
              top_logprobs=top)
          shapes += 2
      for window in self.buckets:
        state, _ = self.generate(self.params, state, window, top_logprobs=top)
        shapes += 1
        if self.decode_steps > 1:
          state, _ = self.generate_block(self.params, state, window, self.decode_steps,
                                         top_logprobs=top)
          shapes += 1
    # A session leaving the pool for host memory, and coming back.
    k, v = self.read_pages(state, [1], 1)
    jax.block_until_ready(self.write_pages(state, [1], k, v))
    return shapes + 2

  def _check_room(self, n: int) -> None:
    # n == max_len fills the cache exactly; the token sampled from it needs no slot of its own.
    if n > self.max_len:
      raise ValueError(f"{n} tokens do not fit max_len {self.max_len}")


@dataclasses.dataclass(frozen=True, eq=False)
class _Programs:
  """An engine's jitted programs and all they depend on, none of it the weights or the state.

  jax.jit keys its compile cache on static arguments by equality, and these compare equal
  when their model architecture, shapes, kernel and shardings do: a second engine of the same
  configuration in a process (a rebuilt server, a test's next engine) compiles nothing again.
  """

  graphdef: nnx.GraphDef
  rest: nnx.State  # the model's non-Param state (none in Qwen); compared by identity if any
  cfg: QwenConfig
  slots: int
  max_len: int
  page_size: int
  max_pages: int
  num_pages: int
  cache_dtype: np.dtype
  paged_kernel: PagedKernel
  pool_sharding: NamedSharding
  replicated: NamedSharding

  # jax.jit hashes its static arguments on every call: hashing the model graph took 175 us
  # of host time per dispatch (a sixteenth of a CPU decode step), so key and hash are kept.
  @functools.cached_property
  def _key(self) -> tuple:
    rest = id(self.rest) if jax.tree.leaves(self.rest) else jax.tree.structure(self.rest)
    return (self.graphdef, rest, self.cfg, self.slots, self.max_len, self.page_size,
            self.max_pages, self.num_pages, self.cache_dtype, self.paged_kernel,
            self.pool_sharding, self.replicated)

  @functools.cached_property
  def _hash(self) -> int:
    return hash(self._key)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return isinstance(other, _Programs) and self._key == other._key

  @functools.partial(jax.jit, static_argnums=0)
  def init_state(self) -> DecodeState:
    shape = (self.cfg.num_layers, self.cfg.num_kv_heads, self.num_pages + 1, self.page_size,
             self.cfg.head_dim)
    z = jnp.zeros(shape, self.cache_dtype)
    n = self.slots
    return self._pin(DecodeState(KVPages(z, z), jnp.full((n, self.max_pages), SINK, jnp.int32),
                                 jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32),
                                 jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.int32),
                                 jnp.ones((n,), jnp.float32), jnp.zeros((n, 2), jnp.uint32)))

  def _pin(self, state: DecodeState) -> DecodeState:
    """Every program that returns a decode state pins it to one layout, so each of them
    compiles once per shape no matter which program produced its input."""
    return jax.lax.with_sharding_constraint(state, DecodeState(
        KVPages(self.pool_sharding, self.pool_sharding), *(self.replicated,) * 7))

  def _model(self, params) -> Qwen:
    return nnx.merge(self.graphdef, params, self.rest)

  @functools.partial(jax.jit, static_argnums=0, static_argnames="top_n")
  def prefill_fresh(self, params, tokens, lengths, temperature, top_k, top_p, keys, top_n=0):
    # The cache only needs the bucket's positions; insert pages them into the pool.
    cache = KVCache.zeros(self.cfg, tokens.shape[0], tokens.shape[1], self.cache_dtype)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    model = self._model(params)
    hidden, cache = model.hidden_states(tokens, positions, cache=cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
    d = sample(model.logits(last)[:, 0], keys, temperature, top_k, top_p, top_n)
    return Prefix(cache, lengths, d.tokens, d.logprobs, d.keys, temperature, top_k, top_p,
                  d.top_ids, d.top_logprobs)

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
  def insert(self, prefix: Prefix, state: DecodeState, slots, rows) -> DecodeState:
    # Prefix row i goes page by page to the pages rows[i] names.
    cache = KVPages(paged_kv.scatter(state.cache.k, rows, prefix.cache.k),
                    paged_kv.scatter(state.cache.v, rows, prefix.cache.v))
    put = lambda a, b: a.at[slots].set(b, mode="drop")
    return self._pin(DecodeState(
        cache, put(state.pages, rows), put(state.positions, prefix.length),
        put(state.tokens, prefix.token), put(state.temperature, prefix.temperature),
        put(state.top_k, prefix.top_k), put(state.top_p, prefix.top_p),
        put(state.keys, prefix.key)))

  @functools.partial(jax.jit, static_argnums=0, static_argnames="top_n", donate_argnums=2)
  def prefill_into(self, params, state: DecodeState, slots, tokens, lengths, starts, rows,
                   temperature, top_k, top_p, keys, top_n=0
                   ) -> tuple[DecodeState, ResultTokens]:
    model = self._model(params)
    positions = starts[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    # Padding positions past a row's length write into its own pages (overwritten as it
    # decodes) or, past them, into the sink.
    hidden, cache = model.hidden_states(tokens, positions, cache=state.cache, page_table=rows,
                                        paged_kernel=self.paged_kernel)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
    d = sample(model.logits(last)[:, 0], keys, temperature, top_k, top_p, top_n)
    put = lambda a, b: a.at[slots].set(b, mode="drop")
    return self._pin(DecodeState(
        cache, put(state.pages, rows), put(state.positions, starts + lengths),
        put(state.tokens, d.tokens), put(state.temperature, temperature),
        put(state.top_k, top_k), put(state.top_p, top_p), put(state.keys, d.keys))), \
        ResultTokens(d.tokens, d.logprobs, d.top_ids, d.top_logprobs)

  @functools.partial(jax.jit, static_argnums=0)
  def read_pages(self, state: DecodeState, row) -> tuple[jax.Array, jax.Array]:
    return paged_kv.read(state.cache.k, row), paged_kv.read(state.cache.v, row)

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
  def write_pages(self, state: DecodeState, row, k, v) -> DecodeState:
    cache = KVPages(paged_kv.scatter(state.cache.k, row[None], k[:, None]),
                    paged_kv.scatter(state.cache.v, row[None], v[:, None]))
    return self._pin(dataclasses.replace(state, cache=cache))

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
  def set_pages(self, state: DecodeState, slots, rows) -> DecodeState:
    return self._pin(dataclasses.replace(state, pages=state.pages.at[slots].set(rows, mode="drop")))

  def _step(self, model: Qwen, state: DecodeState, window, top_n
            ) -> tuple[DecodeState, ResultTokens]:
    hidden, cache = model.hidden_states(state.tokens[:, None], state.positions[:, None],
                                        cache=state.cache, kv_window=window,
                                        page_table=state.pages, paged_kernel=self.paged_kernel)
    logits = model.logits(hidden)
    d = sample(logits[:, 0], state.keys, state.temperature, state.top_k, state.top_p, top_n)
    # A slot past max_len stays there: its writes fall outside the cache and are dropped.
    positions = jnp.minimum(state.positions + 1, self.max_len)
    new = dataclasses.replace(state, cache=cache, positions=positions, tokens=d.tokens,
                              keys=d.keys)
    return new, ResultTokens(d.tokens, d.logprobs, d.top_ids, d.top_logprobs)

  @functools.partial(jax.jit, static_argnums=(0, 3, 4), donate_argnums=2)
  def generate(self, params, state: DecodeState, window, top_n
               ) -> tuple[DecodeState, ResultTokens]:
    new, result = self._step(self._model(params), state, window, top_n)
    return self._pin(new), result

  @functools.partial(jax.jit, static_argnums=(0, 3, 4, 5), donate_argnums=2)
  def generate_block(self, params, state: DecodeState, window, top_n, steps
                     ) -> tuple[DecodeState, ResultTokens]:
    model = self._model(params)
    new, results = jax.lax.scan(lambda s, _: self._step(model, s, window, top_n), state, None,
                                length=steps)
    return self._pin(new), results


def _divisible_rules(mesh: Mesh, slots: int, kv_heads: int) -> dict:
  """The policy's rules, replicating cache axes that the mesh cannot split evenly."""
  rules = dict(LOGICAL_RULES)
  for axis, size in (("batch", slots), ("act_kv_heads", kv_heads)):
    rules[axis] = activation_target(mesh, axis, size)
  return rules


def _pad(values: list, rows: int, dtype, fill) -> jax.Array:
  """values (one per request) padded with `fill` to `rows` entries."""
  out = np.full((rows,) + np.shape(values[0]), fill, dtype)
  out[:len(values)] = values
  return jnp.asarray(out)


def padded_rows(n: int) -> int:
  """Rows a batch of n is padded to (a power of two), so shapes compile once per size."""
  return 1 << (n - 1).bit_length()
