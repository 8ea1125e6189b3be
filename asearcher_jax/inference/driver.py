"""Continuous batching over the engine, with sessions, versions and hot weight swaps.

One thread owns the engine and the device state. Requests are admitted into
free slots as soon as they are prefilled; every loop runs one generate step
for all live slots; a finished request leaves its slot at once. Control
(weight commits, pause/resume, cancellation) is applied between steps, so no
step ever mixes two weight versions and the versions within a request never
go down.

Sessions: when a request that names a session finishes, the KV pages its slot filled stay
with the session for its next request (inference/sessions.py), which prefills only what is
new, into those pages.

KV pages: a slot holds the pages of the engine's pool its tokens fill (inference/page_pool.py
hands them out): enough for its context when admitted, more before each block that needs
them, all back when it finishes. A request is admitted only while pages remain for it and
one more page for each running slot (sessions give theirs up first, to host memory); when
running slots still outgrow the pool, the newest request is preempted: its pages go back and
it waits at the head of the queue, to be re-prefilled (prompt + what it generated, exactly as
after a weight swap in "abort" mode).

Long prompts are prefilled in chunks of `prefill_chunk` tokens, one chunk per loop between
decode dispatches, so a long context never stalls the slots that are decoding: its slot is
reserved (and holds its pages) from admission and starts decoding after its last chunk.

Weight updates have two modes. "abort": in-flight requests are interrupted
and resumed by re-prefilling prompt + generated tokens under the new weights,
so every post-swap log-probability is exactly the new policy's. "keep_kv":
the swap happens between steps and cached keys/values are kept.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import jax
import numpy as np

from asearcher_jax.inference.engine import Engine
from asearcher_jax.inference.page_pool import PagePool
from asearcher_jax.inference.protocol import (
  UPDATE_MODES,
  QueueFullError,
  SamplingParams,
  Stats,
  check_version,
)
from asearcher_jax.inference.sampling import NEG_INF
from asearcher_jax.inference.sessions import SessionCache
from asearcher_jax.models.paged_kv import pages_for

log = logging.getLogger(__name__)

@dataclasses.dataclass
class Request:
  """One generation request and, as it runs, its result."""

  prompt: list[int]
  sampling: SamplingParams
  session_id: str | None = None
  request_id: str = ""
  # Called from the engine thread: on_tokens(request, new_ids) and on_finish(request).
  on_tokens: Callable[["Request", list[int]], None] | None = None
  on_finish: Callable[["Request"], None] | None = None
  # results
  output_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  versions: list[int] = dataclasses.field(default_factory=list)
  # With sampling.top_logprobs = n: per output token, its n most likely (id, logprob) pairs.
  top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  error: str | None = None
  cached_tokens: int = 0  # prompt tokens whose KV came from the session cache
  prefilled_tokens: int = 0  # tokens actually run through prefill (all attempts)
  interruptions: int = 0
  submitted_at: float = 0.0
  first_token_at: float | None = None
  finished_at: float | None = None
  _key: np.ndarray | None = None  # PRNG state carried across interruptions
  _cancelled: bool = False
  _done: threading.Event = dataclasses.field(default_factory=threading.Event)

  @property
  def done(self) -> bool:
    return self._done.is_set()

  def wait(self, timeout: float | None = None) -> "Request":
    if not self._done.wait(timeout):
      raise TimeoutError(f"request {self.request_id} not finished after {timeout}s")
    return self


class Driver:
  """Owns an Engine on a background thread; thread-safe submit/cancel/update/pause."""

  def __init__(self, engine: Engine, *, version: int = 0, tokenizer=None, max_pending: int = 1024,
               device_sessions: int = 16, host_sessions: int = 256, update_mode: str = "abort",
               metrics=None, prefill_chunk: int | None = 512,
               prefill_tokens: int | None = 8192):
    if update_mode not in UPDATE_MODES:
      raise ValueError(f"update_mode must be one of {UPDATE_MODES}, got {update_mode!r}")
    self.engine = engine
    self.tokenizer = tokenizer
    self.version = version
    self.max_pending = max_pending
    self.update_mode = update_mode
    self.metrics = metrics
    self._state = engine.init_decode_state()
    self._pending: collections.deque[Request] = collections.deque()
    self._control: queue.Queue = queue.Queue()
    self._wake = threading.Condition()
    self._slots: list[Request | None] = [None] * engine.slots
    self._pool = PagePool(engine.num_pages)
    self._held: list[list[int]] = [[] for _ in range(engine.slots)]  # each slot's pages
    if prefill_chunk is not None and prefill_chunk < 1:
      raise ValueError(f"prefill_chunk must be >= 1 (or None: no chunking), got {prefill_chunk}")
    self.prefill_chunk = prefill_chunk
    if prefill_tokens is not None and prefill_tokens < 1:
      raise ValueError(f"prefill_tokens must be >= 1 (or None: no bound), got {prefill_tokens}")
    self.prefill_tokens = prefill_tokens
    # Reserved slots whose request is still being prefilled: slot -> (request, tokens in pages)
    self._prefilling: dict[int, tuple[Request, int]] = {}
    self._sessions = SessionCache(
        device=device_sessions, host=host_sessions, page_size=engine.page_size,
        read=lambda pages, n: engine.read_pages(self._state, pages, n),
        free=lambda pages: self._pool.give(pages))
    self._paused = False
    self._running = False
    self._thread: threading.Thread | None = None
    self._ids = itertools.count()
    self._counters = collections.Counter()
    self._step_s: collections.deque[float] = collections.deque(maxlen=64)  # recent steps' s
    self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
    # (result, [(slot, request)], version, steps, start): the block not recorded, and when the
    # device began it (perf_counter)
    self._inflight = None
    # Prefills' first draws, not yet read: ([(slot, request)], (tokens, logprobs, top ids,
    # top logprobs) on device), read once the next block is dispatched.
    self._firsts: list[tuple[list[tuple[int, Request]], tuple]] = []
    # An output of the last prefill dispatched since the last block: the next block starts on
    # the device once it is done, so prefill time is not step time.
    self._prefilled = None
    self._published: dict[str, Any] = {}  # engine-thread counts that stats() reads
    self._publish()

  # -- lifecycle -------------------------------------------------------------------

  def start(self) -> "Driver":
    """Starts the engine thread. A driver runs once: a stopped one has cancelled its requests
    and dropped their KV pages' bookkeeping, so serving again takes a new Driver."""
    if self._thread is not None:
      raise RuntimeError("a decode driver runs once; build a new Driver to serve again")
    self._running = True
    self._thread = threading.Thread(target=self._loop, name="decode-driver", daemon=True)
    self._thread.start()
    return self

  def stop(self, timeout: float = 30.0) -> None:
    """Stops the engine thread; every request not finished is cancelled and every pending
    control call fails, by the engine thread as it leaves its loop (so a step or compile that
    outlasts `timeout` still finishes them), or here once it is gone."""
    with self._wake:  # submit and _call enqueue under this lock only while running
      self._running = False
      self._wake.notify()
    if self._thread is not None:
      self._thread.join(timeout=timeout)
    if self._thread is None or not self._thread.is_alive():
      self._shut_down()

  def _shut_down(self) -> None:
    while True:  # callers blocked in _call would otherwise wait forever
      try:
        _, fut = self._control.get_nowait()
      except queue.Empty:
        break
      fut.set_exception(RuntimeError("the decode driver stopped"))
    with self._wake:
      left = list(self._pending) + [r for r in self._slots if r] + [
          r for r, _ in self._prefilling.values()]
      self._pending.clear()
      self._slots = [None] * self.engine.slots
      self._prefilling.clear()
    for r in left:
      self._finish(r, "cancelled")

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  @property
  def live(self) -> bool:
    return self._running and self._thread is not None and self._thread.is_alive()

  # -- client API (any thread) -------------------------------------------------------

  def validate(self, prompt: list[int], sampling: SamplingParams,
               session_id: str | None = None) -> None:
    """Raises ValueError with a message a client can act on.

    Sessions are created implicitly: an unknown (or evicted) session id is a
    cache miss and the prompt is prefilled in full; only malformed ids are refused.
    """
    if session_id is not None and not (0 < len(session_id) <= 256 and session_id.isprintable()):
      raise ValueError("session_id must be 1 to 256 printable characters")
    if not prompt:
      raise ValueError("the prompt is empty")
    if len(prompt) >= self.engine.max_len:
      raise ValueError(f"the prompt has {len(prompt)} tokens; the maximum is "
                       f"{self.engine.max_len - 1} (max_len {self.engine.max_len})")
    vocab = self.engine.cfg.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"token ids out of the vocabulary [0, {vocab}): {bad[:5]}")
    sampling.validate(self.engine.max_len)
    if sampling.top_k > vocab:
      raise ValueError(f"top_k must be at most the vocabulary size {vocab}, got {sampling.top_k}")
    bad = [t for t in sampling.stop_token_ids if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"stop_token_ids out of the vocabulary [0, {vocab}): {bad[:5]}")
    if sampling.stop and self.tokenizer is None:
      raise ValueError("stop strings need a server with a tokenizer")

  def submit(self, request: Request) -> Request:
    self.validate(request.prompt, request.sampling, request.session_id)
    if not self.live:
      raise RuntimeError("the decode driver is not running")
    request.request_id = request.request_id or f"req-{next(self._ids)}"
    request.submitted_at = time.monotonic()
    with self._wake:
      if not self._running:  # stop() began after the check above: nobody would serve it
        raise RuntimeError("the decode driver is not running")
      if len(self._pending) >= self.max_pending:
        raise QueueFullError(f"{len(self._pending)} requests are waiting (limit "
                             f"{self.max_pending}); retry later")
      self._pending.append(request)
      self._wake.notify()
    return request

  def generate(self, prompt: list[int], sampling: SamplingParams | None = None,
               session_id: str | None = None, timeout: float | None = None) -> Request:
    """Blocking convenience: submit and wait."""
    return self.submit(Request(list(prompt), sampling or SamplingParams(),
                               session_id)).wait(timeout)

  def cancel(self, request: Request) -> None:
    request._cancelled = True
    self._notify()

  def end_session(self, session_id: str) -> bool:
    """Frees a session's KV, and keeps a turn of it still queued or running from saving it
    again when it ends: an episode's timeout cancels its turn and ends its session at once,
    and the cancelled turn, dropped a moment later, brought the session back for good."""
    def end() -> bool:
      ended = self._sessions.end(session_id)
      running = [r for r in self._slots if r is not None] + [
          r for r, _ in self._prefilling.values()] + list(self._pending)
      for r in running:
        if r.session_id == session_id:
          r.session_id, ended = None, True
      return ended
    return self._call(end)

  def pause(self) -> None:
    self._call(lambda: setattr(self, "_paused", True))

  def resume(self) -> None:
    self._call(lambda: setattr(self, "_paused", False))

  def update_weights(self, version: int, params, mode: str | None = None) -> dict[str, Any]:
    """Commits already-loaded params (same shapes/shardings) as `version` between two steps.

    Not from inside a request callback: callbacks run on the engine thread, mid-step.
    """
    mode = mode or self.update_mode
    if mode not in UPDATE_MODES:
      raise ValueError(f"mode must be one of {UPDATE_MODES}, got {mode!r}")
    check_version(version)
    if threading.current_thread() is self._thread:
      raise RuntimeError("update_weights cannot be called from a request callback")
    _check_like(params, self.engine.params)  # a bad update never reaches the engine thread
    return self._call(lambda: self._commit(version, params, mode))

  def stats(self) -> Stats:
    """A consistent snapshot, safe from any thread (the engine thread publishes its counts)."""
    p = self._published
    steps = list(self._step_s)  # one C-level copy under the GIL: the engine thread appends
    return Stats(
        version=self.version, slots_total=self.engine.slots, slots_in_use=p["slots_in_use"],
        queue_depth=len(self._pending), paused=self._paused,
        sessions_device=p["sessions_device"], sessions_host=p["sessions_host"],
        generated_tokens=self._counters["generated"], prefill_tokens=self._counters["prefill"],
        reused_tokens=self._counters["reused"], requests_finished=self._counters["finished"],
        decode_steps=self._counters["steps"],
        decode_step_s=float(np.median(steps)) if steps else 0.0, tokens_per_s=p["tokens_per_s"])

  # -- engine thread --------------------------------------------------------------

  def _notify(self) -> None:
    with self._wake:
      self._wake.notify()

  def _call(self, fn: Callable[[], Any]) -> Any:
    """Runs fn on the engine thread between steps and returns its result."""
    if threading.current_thread() is self._thread:
      return fn()
    fut: Future = Future()
    with self._wake:
      alive = self._thread is not None and self._thread.is_alive()
      queued = self._running and alive
      if queued:
        self._control.put((fn, fut))
        self._wake.notify()
      elif alive:
        raise RuntimeError("the decode driver is stopping")
    # Not started, or gone: nothing else touches the state.
    return fut.result() if queued else fn()

  def _loop(self) -> None:
    try:
      self._serve()
    finally:
      self._shut_down()

  def _serve(self) -> None:
    while self._running:
      try:
        if not self._control.empty():
          self._drain()
        self._run_control()
        self._drop_cancelled()
        if not self._paused:
          self._admit()
          if self._prefilling:
            self._prefill_next_chunk()
        active = [s for s, r in enumerate(self._slots) if r is not None]
        if active and not self._paused:
          self._step(active)
          if time.monotonic() - self._published["at"] > 0.25:  # off the per-step hot path
            self._publish()
          continue
        self._drain()
        if (any(r is not None for r in self._slots) or self._prefilling) and not self._paused:
          continue  # the drained step left requests running (or admitted, or prefilling)
        self._publish()
        with self._wake:
          if self._control.empty() and (self._paused or not self._pending) and self._running:
            self._wake.wait(timeout=0.5)
      except Exception:  # never let one bad step kill the server; fail the live requests
        log.exception("decode loop error; failing in-flight requests")
        self._inflight = self._prefilled = None
        self._firsts.clear()
        failed = [r for r in self._slots if r is not None] + [
            r for r, _ in self._prefilling.values()]
        self._slots = [None] * self.engine.slots
        self._prefilling.clear()
        for r in failed:
          r.error = "internal error in the decode loop"
          self._finish(r, "error")
        try:
          self._free_pages(list(range(self.engine.slots)))
        except Exception:  # the state is beyond repair: start from an empty one
          log.exception("could not free the KV pages; resetting the decode state")
          self._sessions.clear()
          self._pool = PagePool(self.engine.num_pages)
          self._held = [[] for _ in range(self.engine.slots)]
          self._state = self.engine.init_decode_state()

  def _publish(self) -> None:
    now = time.monotonic()
    recent = [(t, n) for t, n in self._recent if now - t < 5.0]
    span = (now - recent[0][0]) if len(recent) > 1 else 0.0
    on_device, on_host = self._sessions.counts()
    self._published = {  # replaced whole: readers never see a half-updated dict
        "at": now,
        "slots_in_use": sum(r is not None for r in self._slots) + len(self._prefilling),
        "sessions_device": on_device, "sessions_host": on_host,
        "tokens_per_s": (sum(n for _, n in recent[1:]) / span) if span > 0 else 0.0}

  def _run_control(self) -> None:
    while True:
      try:
        fn, fut = self._control.get_nowait()
      except queue.Empty:
        return
      try:
        self._drain()  # control acts on recorded slots only (it may have arrived just now)
        result = fn()
        self._publish()  # the caller sees the effect in stats() as soon as it returns
        fut.set_result(result)
      except Exception as e:  # reported to the caller, never fatal to the loop
        fut.set_exception(e)

  def _drop_cancelled(self) -> None:
    if self._firsts and any(r is not None and r._cancelled for r in self._slots):
      self._emit_firsts()  # a cancelled turn keeps its session, first token included
    with self._wake:
      cancelled = [r for r in self._pending if r._cancelled]
      for r in cancelled:
        self._pending.remove(r)
    for r in cancelled:
      self._finish(r, "cancelled")
    for s, r in enumerate(self._slots):
      if r is not None and r._cancelled:
        self._release(s, r, "cancelled")
    for s, (r, _) in list(self._prefilling.items()):
      if r._cancelled:
        del self._prefilling[s]
        try:
          self._free_pages([s], clear=True)
        finally:
          self._finish(r, "cancelled")

  def _admit(self) -> None:
    """Fills free slots: session turns (their pages set up one by one, then prefilled in one
    call) and fresh requests (in one batched prefill; long ones reserve a slot for chunks).
    A request waits while the pool lacks its pages plus one for each running slot, or while
    the batch it would join holds `prefill_tokens` (rows padded to a power of two, times the
    longest row's bucket): a burst of requests cannot take the device's memory in one call."""
    free = [s for s in range(self.engine.slots)
            if self._slots[s] is None and s not in self._prefilling]
    fresh: list[tuple[int, Request]] = []
    continuing: dict[int, tuple[Request, int]] = {}  # slot: (session turn, tokens its pages hold)
    reserved: list[tuple[int, Request]] = []  # slots reserved for chunked prefills
    spare = self.engine.slots - len(free)  # a page each running slot may need next
    batches = {"fresh": (0, 0), "continuing": (0, 0)}  # rows, longest row
    try:
      while free:
        with self._wake:
          if not self._pending:
            break
          r = self._pending[0]  # only this thread takes requests off the queue
        need = self._pages_for(len(r.prompt) + len(r.output_ids))
        # Room for its first block too (which may start a page), or the next dispatch would
        # preempt it again at once.
        room = self._pages_for(len(r.prompt) + len(r.output_ids) + 2 * self.engine.decode_steps)
        # Other sessions' pages go first, then (if it must) the request's own session's.
        while self._pool.free < room + spare and (self._sessions.evict(keep=r.session_id)
                                                  or self._sessions.evict()):
          pass
        if self._pool.free < room + spare:
          break
        # Which batch it joins is read after the evictions, which may have dropped its session.
        joins = self._batch_for(r) if self.prefill_tokens is not None else None
        if joins is not None:
          kind, tokens = joins
          rows, longest = batches[kind][0] + 1, max(batches[kind][1], tokens)
          if not self.engine.prefill_fits(rows, longest, self.prefill_tokens):
            break  # its batch is full: it waits for the next loop
          batches[kind] = (rows, longest)
        with self._wake:
          self._pending.popleft()
        slot = free.pop(0)
        spare += 1
        if r.session_id and r.session_id in self._sessions:
          self._guarded_prefill([(slot, r)], lambda b: self._prefill_session(b, continuing))
        else:
          self._held[slot] = self._pool.take(need)
          if self._chunked(len(r.prompt) + len(r.output_ids)):
            self._prefilling[slot] = (r, 0)  # reserved; its chunks come one a loop from here
            reserved.append((slot, r))
          else:
            fresh.append((slot, r))
    except Exception:
      # Requests this pass took off the queue go back to its head and their pages to the pool:
      # an error here (moving a session out of the pool is device work) loses none of them.
      taken = reserved + fresh + [(slot, r) for slot, (r, _) in continuing.items()]
      for slot, _ in taken:
        self._prefilling.pop(slot, None)
        self._pool.give(self._held[slot])
        self._held[slot] = []
      with self._wake:
        self._pending.extendleft(r for _, r in reversed(taken))
      raise
    if continuing:
      self._guarded_prefill([(slot, r) for slot, (r, _) in continuing.items()],
                            lambda b: self._prefill_continuations(b, continuing))
    if fresh:
      self._guarded_prefill(fresh, self._prefill_fresh)

  def _batch_for(self, r: Request) -> tuple[str, int] | None:
    """The batched prefill `r` joins, "fresh" or "continuing" (a session turn whose pages hold
    a common prefix), and the tokens it prefills there; None where it is prefilled alone (in
    chunks, or a session turn with nothing in common)."""
    context = r.prompt + r.output_ids
    if r.session_id and r.session_id in self._sessions:
      reused = self._sessions.common(r.session_id, context)
      if not reused or self._chunked(len(context) - reused):
        return None
      return "continuing", len(context) - reused
    return None if self._chunked(len(context)) else ("fresh", len(context))

  def _guarded_prefill(self, batch: list[tuple[int, Request]], fn) -> None:
    """Runs a prefill; if a batch fails, retries its rows alone so only the bad one fails."""
    try:
      for _, r in batch:
        r._key = _initial_key(r) if r._key is None else r._key
      fn(batch)
    except Exception as e:  # a failed prefill fails its requests, not the server
      if len(batch) > 1:
        log.warning("batched prefill failed (%s); retrying its %d rows one by one", e, len(batch))
        for item in batch:
          if not item[1].done and self._slots[item[0]] is None:
            self._guarded_prefill([item], fn)
        return
      log.exception("prefill failed")
      slot, r = batch[0]
      if self._slots[slot] is r:
        self._slots[slot] = None
      self._prefilling.pop(slot, None)
      if not r.done:  # first: freeing the pages needs a decode state the failure may have taken
        r.error = f"prefill failed: {e}"
        self._finish(r, "error")
      self._free_pages([slot])

  def _prefill_fresh(self, batch: list[tuple[int, Request]]) -> None:
    t0 = time.perf_counter()
    contexts = [r.prompt + r.output_ids for _, r in batch]  # resumed requests re-prefill outputs
    ss = [r.sampling for _, r in batch]
    prefix = self.engine.prefill_batch(
        self.engine.params, contexts, [s.temperature for s in ss], [s.top_k for s in ss],
        [s.top_p for s in ss], [r._key for _, r in batch],
        top_logprobs=any(s.top_logprobs for s in ss))
    self._state = self.engine.insert(prefix, self._state, [slot for slot, _ in batch],
                                     [self._held[slot] for slot, _ in batch])
    self._count_prefill(batch, [len(c) for c in contexts], t0, prefix.token)
    self._after_prefill(batch, prefix.token, prefix.logprob, (prefix.top_ids, prefix.top_logprobs))

  def _prefill_session(self, batch: list[tuple[int, Request]],
                       continuing: dict[int, tuple[Request, int]]) -> None:
    """A session's next turn: its pages (or its keys and values brought back from the host)
    hold the common prefix; only the rest is prefilled, into the same pages: at once if it
    takes chunks, else with the other turns admitted now (`continuing`, one call for all)."""
    (slot, r), = batch
    t0 = time.perf_counter()
    context = r.prompt + r.output_ids
    need = self._pages_for(len(context))
    held = self._sessions.take(r.session_id, context)
    if held is None:  # nothing in common after all
      self._held[slot] = self._pool.take(need)
      if self._chunked(len(context)):
        return self._prefill_from(slot, r, 0, t0)
      return self._prefill_fresh(batch)
    if held.pages is not None:
      self._held[slot] = held.pages + self._pool.take(need - len(held.pages))
    else:
      self._held[slot] = self._pool.take(need)
      k, v = held.host
      self._state = self.engine.write_pages(self._state, self._held[slot], k[:, :held.reused],
                                            v[:, :held.reused])
    if not r.output_ids:
      r.cached_tokens = held.reused
    self._counters["reused"] += held.reused
    if self._chunked(len(context) - held.reused):
      self._prefill_from(slot, r, held.reused, t0)
    else:
      continuing[slot] = (r, held.reused)

  def _prefill_continuations(self, batch: list[tuple[int, Request]],
                             continuing: dict[int, tuple[Request, int]]) -> None:
    """Session turns whose pages hold their common prefix: the rest of each, in one call."""
    t0 = time.perf_counter()
    starts = [continuing[slot][1] for slot, _ in batch]
    rest = [np.asarray((r.prompt + r.output_ids)[start:], np.int32)
            for (_, r), start in zip(batch, starts)]
    ss = [r.sampling for _, r in batch]
    self._state, first = self.engine.prefill_into_batch(
        self.engine.params, self._state, [slot for slot, _ in batch], rest, starts,
        [self._held[slot] for slot, _ in batch], [s.temperature for s in ss],
        [s.top_k for s in ss], [s.top_p for s in ss], [r._key for _, r in batch],
        top_logprobs=any(s.top_logprobs for s in ss))
    self._count_prefill(batch, [len(x) for x in rest], t0, first.tokens)
    self._after_prefill(batch, first.tokens, first.logprobs, (first.top_ids, first.top_logprobs))

  def _chunked(self, tokens: int) -> bool:
    return self.prefill_chunk is not None and tokens > self.prefill_chunk

  def _prefill_from(self, slot: int, r: Request, start: int, t0: float | None = None) -> None:
    """Prefills `r`'s context after the `start` tokens its pages hold, into them: all of it,
    or (past `prefill_chunk` tokens) the next chunk, leaving the slot reserved for the rest."""
    t0 = time.perf_counter() if t0 is None else t0
    context = r.prompt + r.output_ids
    end = len(context) if not self._chunked(len(context) - start) else start + self.prefill_chunk
    s = r.sampling
    # Every chunk draws with the request's own key; only the last chunk's draw is kept.
    self._state, first = self.engine.prefill_into(
        self.engine.params, self._state, slot, np.asarray(context[start:end], np.int32), start,
        self._held[slot], temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, key=r._key,
        top_logprobs=bool(s.top_logprobs))
    self._count_prefill([(slot, r)], [end - start], t0, first.tokens)
    self._prefilling.pop(slot, None)
    if end < len(context):
      self._prefilling[slot] = (r, end)  # to the back: several long prompts take turns
      self._counters["prefill_chunks"] += 1
      return
    self._after_prefill([(slot, r)], first.tokens, first.logprobs,
                        (first.top_ids, first.top_logprobs))

  def _prefill_next_chunk(self) -> None:
    """One chunk of the longest-waiting chunked prefill (then the loop decodes again)."""
    slot, (r, start) = next(iter(self._prefilling.items()))
    self._guarded_prefill([(slot, r)], lambda b: self._prefill_from(slot, r, start))

  def _count_prefill(self, batch, prefilled: list[int], t0: float, out) -> None:
    """`out`: an array the prefill computes, done when it is."""
    self._prefilled = out
    for (_, r), n in zip(batch, prefilled):
      r.prefilled_tokens += n
      self._counters["prefill"] += n
    if self.metrics:
      self.metrics.observe_prefill(time.perf_counter() - t0, sum(prefilled))

  def _after_prefill(self, batch, tokens, logprobs, top) -> None:
    """Starts each row decoding from its first token ([n] arrays on device; `top`: the most
    likely (ids, logprobs)). The host reads the tokens only after it has dispatched the next
    block (`_emit_firsts`): the device goes from the prefill straight to decoding instead of
    idling while the host waits for the prefill, reads and records."""
    arrays = (tokens, logprobs, *top)
    for a in arrays:
      a.copy_to_host_async()
    for slot, r in batch:
      self._slots[slot] = r
    self._firsts.append((list(batch), arrays))

  def _emit_firsts(self) -> None:
    """Records the first token of every prefill since the last call."""
    firsts, self._firsts = self._firsts, []
    emitted = 0
    for batch, arrays in firsts:
      tokens, logprobs, top_ids, top_logprobs = (np.asarray(a) for a in arrays)
      for i, (slot, r) in enumerate(batch):
        if self._slots[slot] is not r:  # failed or preempted since; never recorded here
          continue
        if r.first_token_at is None:
          r.first_token_at = time.monotonic()
        self._emit(slot, r, int(tokens[i]), float(logprobs[i]),
                   top=(top_ids[i], top_logprobs[i]))
        emitted += 1
    if emitted:
      self._recent.append((time.monotonic(), emitted))

  def _ahead(self) -> int:
    """Tokens each running slot has on the device beyond those recorded: the block in flight,
    or (at least) a prefill's first token."""
    return max(self._inflight[3] if self._inflight is not None else 0, 1 if self._firsts else 0)

  def _block_steps(self) -> int:
    """Steps in the next dispatch: `engine.decode_steps` in steady decode, one while requests
    wait, so a slot that frees is refilled after one step rather than a whole block."""
    return 1 if self._pending or self._prefilling else self.engine.decode_steps

  def _pages_for(self, tokens: int) -> int:
    return pages_for(min(tokens, self.engine.max_len), self.engine.page_size)

  def _free_pages(self, slots: list[int], clear: bool = False) -> None:
    """Gives the slots' pages back and points their page-table rows at the sink, so steps
    that still run them (a block in flight, an idle slot) write nowhere that matters.
    `clear`: the rows even of slots that hold no page now (their pages went to a session)."""
    slots = [s for s in slots if self._held[s] or clear]
    if not slots:
      return
    for s in slots:
      self._pool.give(self._held[s])
      self._held[s] = []
    self._state = self.engine.set_pages(self._state, slots, [[] for _ in slots])

  def _reserve(self) -> tuple[list[int], int]:
    """Gives every running slot the pages the next block writes: (running slots, steps).

    A live slot feeds its newest token at len(prompt) + len(outputs) - 1, plus the steps
    still in flight; the block's last step feeds steps - 1 positions further. If the pool
    cannot cover that, the block in flight is recorded first (finished requests give pages
    back), then the newest requests are preempted until it can.
    """
    while True:
      steps = self._block_steps()
      ahead = self._ahead()
      active = [s for s, r in enumerate(self._slots) if r is not None]
      grow = {}
      for s in active:
        r = self._slots[s]
        need = self._pages_for(len(r.prompt) + len(r.output_ids) + ahead + steps - 1)
        if need > len(self._held[s]):
          grow[s] = need - len(self._held[s])
      if sum(grow.values()) <= self._pool.free:
        for s, n in grow.items():
          self._held[s] = self._held[s] + self._pool.take(n)
        if grow:
          self._state = self.engine.set_pages(self._state, list(grow),
                                              [self._held[s] for s in grow])
        return active, steps
      if self._inflight is not None or self._firsts:
        self._drain()
        continue
      if self._sessions.evict():
        continue
      # One running request always fits (the pool holds a whole sequence), so there is one
      # newer than the oldest to preempt.
      self._preempt(max(active, key=lambda s: self._slots[s].submitted_at))

  def _preempt(self, slot: int) -> None:
    """Sends a running request back to the head of the queue and frees its pages (nothing in
    flight: the slot's PRNG state is its next draw's)."""
    r = self._slots[slot]
    r._key = np.asarray(self._state.keys)[slot]
    r.interruptions += 1
    self._slots[slot] = None
    with self._wake:
      self._pending.appendleft(r)
    self._free_pages([slot])
    self._counters["preempted"] += 1
    log.info("KV pages exhausted: preempted %s after %d tokens (%d preemptions so far)",
             r.request_id, len(r.output_ids), self._counters["preempted"])

  def _step(self, active: list[int]) -> None:
    """Dispatches the next block of generate steps, then does the host work of the one before.

    The device never waits for Python: while block t+1 runs, block t's tokens are
    recorded and checked for stops. A slot that finished in block t still has its
    rows in block t+1 (and in t after its stop), which are discarded because the
    slot no longer holds that request (JetStream makes the same trade).
    """
    active, steps = self._reserve()
    if not active:  # recording the block in flight finished every request
      return
    ahead = self._ahead()
    longest = max(len(self._slots[s].prompt) + len(self._slots[s].output_ids) for s in active)
    window = self.engine.bucket(min(longest + ahead + steps - 1, self.engine.max_len))
    top = any(self._slots[s].sampling.top_logprobs for s in active)
    if steps == 1:
      self._state, result = self.engine.generate(self.engine.params, self._state, window,
                                                 top_logprobs=top)
    else:
      self._state, result = self.engine.generate_block(self.engine.params, self._state, window,
                                                       steps, top_logprobs=top)
    # The device begins this block once what was queued before it is done (the block before,
    # prefills since): its steps are timed from then, or from its dispatch if later, so neither
    # an idle or paused gap nor a prefill between blocks counts as step time.
    start = time.perf_counter()
    previous, done = self._inflight, None
    if previous is not None:
      done = _ready(previous[0].tokens)
      start = max(start, done)
    if self._prefilled is not None:
      start = max(start, _ready(self._prefilled))
      self._prefilled = None
    self._inflight = (result, [(s, self._slots[s]) for s in active], self.version, steps, start)
    self._emit_firsts()  # before the new block's tokens, which follow them
    if previous is not None:
      self._process(previous, done)

  def _drain(self) -> None:
    """Records the first tokens and the block in flight, if any (before control changes what
    the slots hold)."""
    self._emit_firsts()
    if self._inflight is not None:
      previous, self._inflight = self._inflight, None
      self._process(previous)

  def _process(self, inflight, done: float | None = None) -> None:
    """Records a block; `done`: when the host saw it finish (else when its tokens are read)."""
    result, snapshot, version, steps, start = inflight
    slots = self.engine.slots
    tokens = np.asarray(result.tokens).reshape(steps, slots)
    logprobs = np.asarray(result.logprobs).reshape(steps, slots)
    top_ids = np.asarray(result.top_ids).reshape(steps, slots, -1)
    top_logprobs = np.asarray(result.top_logprobs).reshape(steps, slots, -1)
    step_s = ((time.perf_counter() if done is None else done) - start) / steps
    self._step_s.append(step_s)
    self._counters["steps"] += steps
    if self.metrics:
      for _ in range(steps):
        self.metrics.observe_step(step_s)
    emitted = 0
    for slot, r in snapshot:
      for j in range(steps):
        if self._slots[slot] is not r:  # it finished (or was cancelled) since the dispatch
          break
        self._emit(slot, r, int(tokens[j, slot]), float(logprobs[j, slot]), version,
                   top=(top_ids[j, slot], top_logprobs[j, slot]))
        emitted += 1
    self._recent.append((time.monotonic(), emitted))

  def _emit(self, slot: int, r: Request, token: int, logprob: float,
            version: int | None = None, top: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Records one sampled token (sampled by weights `version`) and finishes the request if done.
    `top`: the step's most likely (ids, logprobs) for this slot, empty unless asked for."""
    r.output_ids.append(token)
    r.logprobs.append(logprob)
    if r.sampling.top_logprobs and top is not None and len(top[0]):
      n = r.sampling.top_logprobs
      ids, lps = top[0][:n], top[1][:n]
      live = lps > NEG_INF / 2  # top_k / top_p left the others out: probability 0, no choice
      r.top_logprobs.append(list(zip(ids[live].tolist(), lps[live].tolist())))
    r.versions.append(self.version if version is None else version)
    self._counters["generated"] += 1
    if self.metrics:  # counted before the token can finish its request and wake its client
      self.metrics.observe_tokens(1)
    if r.on_tokens:
      _callback(r.on_tokens, r, [token])
    s = r.sampling
    # Every token but the newest is in the cache; the newest needs one more free position.
    in_cache = len(r.prompt) + len(r.output_ids) - 1
    if token in s.stop_token_ids:
      self._release(slot, r, "stop")
    elif s.stop and self._hit_stop_string(r):
      self._release(slot, r, "stop")
    elif s.max_new_tokens is not None and len(r.output_ids) >= s.max_new_tokens:
      self._release(slot, r, "length")
    elif in_cache >= self.engine.max_len:
      self._release(slot, r, "max_len")

  def _hit_stop_string(self, r: Request) -> bool:
    longest = max(len(x) for x in r.sampling.stop)
    window = r.output_ids[-(4 * longest + 8):]
    text = self.tokenizer.decode(window)
    return any(x in text for x in r.sampling.stop)

  def _release(self, slot: int, r: Request, reason: str) -> None:
    self._slots[slot] = None
    try:
      if r.session_id and r.output_ids:  # a cancelled turn keeps its session too
        held = r.prompt + r.output_ids[:-1]  # the last sampled token never entered the cache
        keep = self._pages_for(len(held))
        pages, self._held[slot] = self._held[slot][:keep], self._held[slot][keep:]
        try:
          self._sessions.save(r.session_id, held, pages, self.version)
        except Exception:
          if r.session_id not in self._sessions:  # the pages are nobody's: back to the pool
            self._pool.give(pages)
          raise
    except Exception:  # losing a cache entry is a miss next turn, never a lost request
      log.exception("could not keep the KV cache of session %s", r.session_id)
    finally:
      try:
        self._free_pages([slot], clear=True)  # the row, and the pages the session did not keep
      finally:
        self._finish(r, reason)

  def _finish(self, r: Request, reason: str) -> None:
    if r.done:
      return
    r.finish_reason = reason
    r.finished_at = time.monotonic()
    self._counters["finished"] += 1
    if self.metrics:
      self.metrics.observe_finish(r)
    self._publish()  # whoever the request wakes sees stats that include it
    r._done.set()
    if r.on_finish:
      _callback(r.on_finish, r)

  def _commit(self, version: int, params, mode: str) -> dict[str, Any]:
    _check_like(params, self.engine.params)
    if version <= self.version:
      raise ValueError(f"weight version {version} is not newer than the serving version "
                       f"{self.version}")
    interrupted = 0
    if mode == "abort":
      keys = np.asarray(self._state.keys)
      resumed = []
      for slot, r in enumerate(self._slots):
        if r is None:
          continue
        self._slots[slot] = None
        r._key = keys[slot]
        r.interruptions += 1
        resumed.append(r)
      for slot, (r, _) in sorted(self._prefilling.items()):  # from scratch, same key
        r.interruptions += 1
        resumed.append(r)
      self._prefilling.clear()
      with self._wake:
        self._pending.extendleft(reversed(resumed))  # they go first, in their order
      self._free_pages(list(range(self.engine.slots)))
      interrupted = len(resumed)
      self._sessions.clear()
    self.engine.load_params(params)
    self.version = version
    return {"version": version, "interrupted": interrupted, "mode": mode}


def _callback(fn, *args) -> None:
  """Runs a request's callback; its failure is logged and never reaches the engine loop."""
  try:
    fn(*args)
  except Exception:
    log.exception("request callback %s failed", getattr(fn, "__name__", fn))


def _ready(x) -> float:
  """Waits for device work `x` to finish; when the host saw it done (perf_counter)."""
  jax.block_until_ready(x)
  return time.perf_counter()


def _initial_key(r: Request) -> np.ndarray:
  """The PRNG key of a request: from its 64-bit seed (both halves count), else a fresh one.

  Computed on the host's CPU device (the same bits as on any backend): on an accelerator the
  two small ops would queue behind the decode block in flight, and reading their result would
  hold every admission until that block finished."""
  seed = r.sampling.seed
  if seed is None:
    seed = hash((r.request_id, time.monotonic_ns())) & 0xFFFFFFFFFFFFFFFF
  with jax.default_device(_host_device()):
    key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
    return np.asarray(jax.random.fold_in(key, seed >> 32))


@functools.cache
def _host_device():
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS names no CPU backend
    return jax.devices()[0]


def _check_like(params, reference) -> None:
  """Raises ValueError unless params has the reference's structure, shapes and dtypes."""
  got, want = jax.tree.structure(params), jax.tree.structure(reference)
  if got != want:
    raise ValueError(f"weights have a different structure than the served model: {got} vs {want}")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(reference)):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(f"weights: {jax.tree_util.keystr(path)} is {a.dtype}{list(a.shape)}, the "
                       f"served model has {b.dtype}{list(b.shape)}")
