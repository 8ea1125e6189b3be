"""One retry policy for every flaky call (decode servers, LLM endpoints, web APIs, the replay
queue): a fixed number of attempts, exponential backoff capped at `max_s` (jittered where many
clients hit one service), raised to a server's Retry-After. Built on tenacity, so a call site
stays a few lines and errors it does not name pass through at once:

  async for attempt in retrying(attempts=4, base_s=0.5, max_s=8.0, retry_on=Transient):
    with attempt:
      reply = await call()

When the attempts are spent the last error is raised as it was (tenacity's RetryError never
escapes), so call sites keep their own error types and messages. A leaf module: stdlib and
tenacity only.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from tenacity import (
  AsyncRetrying,
  RetryCallState,
  Retrying,
  retry_if_exception,
  retry_if_exception_type,
  stop_after_attempt,
)
from tenacity.wait import wait_base

RetryOn = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]


class Transient(Exception):
  """An error worth another try (HTTP 408/429/5xx); `retry_after` is the server's wish."""

  def __init__(self, message: str, retry_after: float | None = None):
    super().__init__(message)
    self.retry_after = retry_after


def retry_after(value: str | None) -> float | None:
  """Seconds from an HTTP Retry-After header (None when absent or not a number)."""
  try:
    return max(0.0, float(value)) if value else None
  except ValueError:
    return None


class Backoff(wait_base):
  """`base_s * 2**(n-1)` before retry n, capped at `max_s`; with `jitter` scaled by a uniform
  factor in [0.5, 1) (from `rng`, so a seeded client retries reproducibly). An exception with a
  `retry_after` attribute raises the wait to it, still capped at `max_s`: a server's wish is
  honoured, but cannot stall a caller past the configured limit."""

  def __init__(self, base_s: float, max_s: float, jitter: bool = True,
               rng: random.Random | None = None, attempts: int | None = None):
    self.base_s, self.max_s, self.jitter = base_s, max_s, jitter
    self.rng = rng or random.Random()
    self.attempts = attempts

  def __call__(self, retry_state: RetryCallState) -> float:
    if self.attempts is not None and retry_state.attempt_number >= self.attempts:
      # tenacity asks for the wait before it checks the stop: no sleep follows the last try,
      # and a seeded client's jitter must not skip a draw for it.
      return 0.0
    delay = min(self.max_s, self.base_s * 2 ** (retry_state.attempt_number - 1))
    if self.jitter:
      delay *= 0.5 + 0.5 * self.rng.random()
    outcome = retry_state.outcome
    wish = getattr(outcome.exception(), "retry_after", None) if outcome else None
    if wish is not None:
      delay = max(delay, min(wish, self.max_s))
    return delay


def _options(attempts: int, base_s: float, max_s: float, retry_on: RetryOn, jitter: bool,
             rng: random.Random | None, before_sleep) -> dict:
  if isinstance(retry_on, (type, tuple)):
    retry = retry_if_exception_type(retry_on)
  else:
    retry = retry_if_exception(retry_on)
  return dict(stop=stop_after_attempt(max(1, attempts)), retry=retry,
              wait=Backoff(base_s, max_s, jitter, rng, max(1, attempts)), before_sleep=before_sleep,
              reraise=True)


def retrying(*, attempts: int, base_s: float, max_s: float, retry_on: RetryOn = Exception,
             jitter: bool = True, rng: random.Random | None = None,
             sleep: Callable[[float], Awaitable[None]] | None = None,
             before_sleep: Callable[[RetryCallState], None] | None = None) -> AsyncRetrying:
  """For `async for attempt in retrying(...): with attempt: ...`. `attempts` counts the first
  try; `retry_on` is exception types or a predicate on the exception. `sleep` defaults to
  `asyncio.sleep` looked up at each wait, so a test that patches it still controls the wait."""
  return AsyncRetrying(sleep=sleep or (lambda s: asyncio.sleep(s)),
                       **_options(attempts, base_s, max_s, retry_on, jitter, rng, before_sleep))


def retrying_sync(*, attempts: int, base_s: float, max_s: float, retry_on: RetryOn = Exception,
                  jitter: bool = True, rng: random.Random | None = None,
                  sleep: Callable[[float], None] | None = None,
                  before_sleep: Callable[[RetryCallState], None] | None = None) -> Retrying:
  """`retrying` for blocking code: `for attempt in retrying_sync(...): with attempt: ...`."""
  return Retrying(sleep=sleep or (lambda s: time.sleep(s)),
                  **_options(attempts, base_s, max_s, retry_on, jitter, rng, before_sleep))
