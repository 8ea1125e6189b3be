"""The asyncio face of a driver, shared by the gRPC and HTTP fronts.

The driver runs on its own thread; this bridges its callbacks into the event
loop, cancels the request when the caller goes away, and runs blocking work
(loading weights) off the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import AsyncIterator

from asearcher_jax.errors import AsearcherError, CheckpointError
from asearcher_jax.inference.driver import Driver, Request
from asearcher_jax.inference.protocol import GenerationFailed, SamplingParams, check_version
from asearcher_jax.inference.weights import load_weights


@dataclasses.dataclass(frozen=True)
class Chunk:
  """New tokens of a request with their log-probs and versions, captured when they were sampled."""

  ids: list[int]
  logprobs: list[float]
  versions: list[int]
  top: list[list[tuple[int, float]]]  # per token, when the request asked for top_logprobs

  @classmethod
  def of(cls, r: Request, ids: list[int]) -> "Chunk":  # runs on the engine thread
    n = len(ids)
    return cls(list(ids), r.logprobs[-n:], r.versions[-n:],
               r.top_logprobs[-n:] if r.top_logprobs else [])


class DecodeService:
  def __init__(self, driver: Driver, tokenizer=None, model_name: str = "policy",
               default_stop_ids: tuple[int, ...] = (),
               weight_roots: tuple[str, ...] | None = None):
    """`weight_roots`: folders weight updates may load from; None: anywhere (a library user's
    own process; `asearcher serve` always sets them)."""
    self.driver = driver
    self.weight_roots = None if weight_roots is None else tuple(
        os.path.realpath(r) for r in weight_roots)
    self.tokenizer = tokenizer
    self.model_name = model_name
    self.default_stop_ids = default_stop_ids
    self._update_lock = asyncio.Lock()

  async def generate(self, prompt: list[int], sampling: SamplingParams, *,
                     session_id: str | None = None, request_id: str = "") -> Request:
    """Runs one request to completion (ValueError / QueueFullError on bad input / overload,
    GenerationFailed if the decode loop failed it)."""
    request, events = self._submit(prompt, sampling, session_id, request_id)
    async for _ in self._drain(request, events):
      pass
    _raise_if_failed(request)
    return request

  async def stream(self, prompt: list[int], sampling: SamplingParams, *,
                   session_id: str | None = None, request_id: str = ""
                   ) -> AsyncIterator[tuple[Request, Chunk]]:
    """Yields (request, chunk of new tokens) as sampled; the request is done after the last.
    Raises GenerationFailed, after whatever it sampled, if the request failed."""
    request, events = self._submit(prompt, sampling, session_id, request_id)
    async for chunk in self._drain(request, events):
      yield request, chunk
    _raise_if_failed(request)

  def _submit(self, prompt, sampling, session_id, request_id) -> tuple[Request, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    request = Request(list(prompt), sampling, session_id or None, request_id,
                      on_tokens=lambda r, ids: loop.call_soon_threadsafe(
                          events.put_nowait, Chunk.of(r, ids)),
                      on_finish=lambda r: loop.call_soon_threadsafe(events.put_nowait, None))
    self.driver.submit(request)
    return request, events

  async def _drain(self, request: Request, events: asyncio.Queue) -> AsyncIterator["Chunk"]:
    try:
      while True:
        chunk = await events.get()
        if chunk is None:
          return
        yield chunk
    finally:  # the caller went away (client disconnect, timeout): free the slot
      if not request.done:
        self.driver.cancel(request)

  async def update_weights(self, version: int, source, *, step: int | None = None,
                           mode: str | None = None) -> dict:
    """Loads `source` off the event loop, then commits it between two decode steps."""
    check_version(version)  # before the load, which can take minutes
    if isinstance(source, str):
      self._check_root(source)
    async with self._update_lock:
      loop = asyncio.get_running_loop()
      t0 = time.perf_counter()
      params = await loop.run_in_executor(None, self._load, source, step)
      t1 = time.perf_counter()
      result = await loop.run_in_executor(
          None, lambda: self.driver.update_weights(version, params, mode))
      return dict(result, load_s=t1 - t0, commit_s=time.perf_counter() - t1)

  def _check_root(self, source: str) -> None:
    """Refuses a path outside the weight roots, the same way whether or not it exists."""
    if self.weight_roots is None:
      return
    real = os.path.realpath(source)
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep)
               for r in self.weight_roots):
      raise ValueError(f"weights may only be loaded from under {', '.join(self.weight_roots)} "
                       "(serve.weight_roots)")

  def _load(self, source, step):
    """The weights at `source`; a folder that is not what it claims (a broken orbax step, a
    missing array) is a CheckpointError naming it, never an unclassified exception."""
    engine = self.driver.engine
    try:
      return load_weights(engine.params, source, engine.cfg, step=step)
    except (AsearcherError, ValueError):
      raise
    except Exception as e:  # noqa: BLE001 -- KeyError, tensorstore and orbax errors
      raise CheckpointError(f"{source}: cannot load weights ({type(e).__name__}: {e})") from e

  async def call(self, fn, *args):
    """A blocking driver call (pause, resume, end_session) without blocking the loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

  # -- text -----------------------------------------------------------------------

  def encode(self, text: str) -> list[int]:
    return self._encode(text, off_loop=False)

  async def tokenize(self, text: str) -> list[int]:
    """`encode` for the fronts: a long text is tokenized off the event loop, so a 10 MB prompt
    does not stall /health and every other request while it is read. There is no refusing a
    text as too long before: a normalizer or an unknown-token piece can map any number of
    characters to one token, so no character count bounds the token count."""
    if len(text) < 1 << 16:
      return self.encode(text)
    return await asyncio.get_running_loop().run_in_executor(None, self._encode, text, True)

  def _encode(self, text: str, off_loop: bool) -> list[int]:
    if self.tokenizer is None:
      raise ValueError("this server has no tokenizer; send token ids")
    try:
      # tokenizers' encode_batch lets go of the GIL while it works, its encode does not: off
      # the loop, encode would still hold the GIL, and so the loop, for the whole text.
      return self.tokenizer.encode_batch([text])[0] if off_loop else self.tokenizer.encode(text)
    except (TypeError, ValueError, UnicodeError) as e:  # e.g. a lone surrogate ("\ud800")
      raise ValueError(f"the text cannot be tokenized (not valid Unicode?): {e}") from None

  def decode(self, ids: list[int]) -> str:
    return self.tokenizer.decode(ids) if self.tokenizer is not None else ""


def _raise_if_failed(request: Request) -> None:
  if request.finish_reason == "error":
    raise GenerationFailed(request.error or "generation failed")


class IncrementalDetokenizer:
  """Text deltas for a growing token list, holding back incomplete UTF-8 sequences.

  Only the tokens since the last emitted text are decoded (with the token
  before them for context), so a long stream costs linear, not quadratic, time.
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self._prefix = 0  # ids[_prefix:_read] were decoded into text already
    self._read = 0

  def add(self, ids: list[int], final: bool = False) -> str:
    self.ids.extend(ids)
    if self.tokenizer is None:  # a server of token ids alone: no text, as `decode` gives
      return ""
    done = self.tokenizer.decode(self.ids[self._prefix:self._read])
    full = self.tokenizer.decode(self.ids[self._prefix:])
    if not final and (full.endswith("\ufffd") or len(full) <= len(done)):
      return ""  # a multi-byte character is not complete yet
    self._prefix, self._read = self._read, len(self.ids)
    return full[len(done):]

  def flush(self) -> str:
    """Whatever is still held back (an incomplete character at the end), as decoded."""
    return self.add([], final=True)


def truncate_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
  """OpenAI semantics: the text ends before the first stop string, which is not included."""
  cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)
