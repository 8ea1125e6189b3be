"""The shared retry helper on its own: backoff, Retry-After, exhaustion, pass-through."""

import asyncio
import random

import pytest

from asearcher_jax.retry import Transient, retry_after, retrying, retrying_sync


def test_retry_after_header():
  assert retry_after(None) is None and retry_after("") is None
  assert retry_after("3") == 3.0 and retry_after("0.5") == 0.5
  assert retry_after("-2") == 0.0  # never a negative wait
  assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None  # HTTP dates are not honoured


def _run_sync(fail: list[BaseException], **kw):
  """Calls that raise `fail` in turn, then succeed; returns (result, sleeps, calls)."""
  sleeps, calls = [], []

  def call():
    calls.append(1)
    if len(calls) <= len(fail):
      raise fail[len(calls) - 1]
    return "ok"

  for attempt in retrying_sync(sleep=sleeps.append, **kw):
    with attempt:
      out = call()
  return out, sleeps, len(calls)


def test_backoff_doubles_and_is_capped():
  out, sleeps, calls = _run_sync([OSError()] * 5, attempts=6, base_s=0.5, max_s=3.0, jitter=False)
  assert out == "ok" and calls == 6 and sleeps == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_jitter_scales_into_half_to_full_and_follows_the_rng():
  kw = dict(attempts=5, base_s=1.0, max_s=4.0, jitter=True)
  _, a, _ = _run_sync([OSError()] * 4, rng=random.Random(7), **kw)
  _, b, _ = _run_sync([OSError()] * 4, rng=random.Random(7), **kw)
  assert a == b  # a seeded client retries reproducibly
  for got, full in zip(a, [1.0, 2.0, 4.0, 4.0]):
    assert 0.5 * full <= got < full


def test_retry_after_raises_the_wait_but_not_past_the_cap():
  fail = [Transient("429", retry_after=2.5), Transient("429", retry_after=60.0),
          Transient("503", retry_after=0.0)]
  _, sleeps, _ = _run_sync(fail, attempts=4, base_s=0.1, max_s=5.0, jitter=False)
  assert sleeps == [2.5, 5.0, 0.4]


def test_exhausted_attempts_reraise_the_last_error():
  fail = [OSError("first"), OSError("second"), OSError("third")]
  with pytest.raises(OSError, match="third"):
    _run_sync(fail, attempts=3, base_s=0.01, max_s=0.01)


def test_other_errors_pass_through_at_once():
  with pytest.raises(KeyError):
    _run_sync([KeyError("x")], attempts=5, base_s=1.0, max_s=1.0, retry_on=OSError)
  # a predicate chooses too: here every Exception but ValueError is retried
  pred = lambda e: isinstance(e, Exception) and not isinstance(e, ValueError)
  with pytest.raises(ValueError):
    _run_sync([OSError(), ValueError("refused")], attempts=5, base_s=0.0, max_s=0.0,
              retry_on=pred)
  out, _, calls = _run_sync([OSError(), RuntimeError()], attempts=3, base_s=0.0, max_s=0.0,
                            retry_on=pred)
  assert out == "ok" and calls == 3


def test_async_retries_and_before_sleep():
  sleeps, seen, calls = [], [], []

  async def fake_sleep(s):
    sleeps.append(s)

  async def call():
    calls.append(1)
    if len(calls) < 3:
      raise Transient(f"HTTP 503 #{len(calls)}")
    return len(calls)

  async def go():
    async for attempt in retrying(attempts=4, base_s=0.2, max_s=10.0, jitter=False,
                                  retry_on=Transient, sleep=fake_sleep,
                                  before_sleep=lambda s: seen.append(str(s.outcome.exception()))):
      with attempt:
        out = await call()
    return out, attempt.retry_state.attempt_number

  assert asyncio.run(go()) == (3, 3)
  assert sleeps == [0.2, 0.4] and seen == ["HTTP 503 #1", "HTTP 503 #2"]


def test_async_exhaustion_and_patched_asyncio_sleep(monkeypatch):
  sleeps = []

  async def fake_sleep(s):
    sleeps.append(s)

  monkeypatch.setattr(asyncio, "sleep", fake_sleep)  # the default sleep is looked up per wait

  async def go():
    async for attempt in retrying(attempts=3, base_s=1.0, max_s=8.0, jitter=False,
                                  retry_on=Transient):
      with attempt:
        raise Transient(f"down #{attempt.retry_state.attempt_number}")

  with pytest.raises(Transient, match="down #3"):
    asyncio.run(go())
  assert sleeps == [1.0, 2.0]


def test_jitter_draws_once_per_wait_that_happens():
  """A seeded client's jitter sequence advances only for waits it sleeps (tenacity asks for a
  wait after the last attempt too, which must not consume a draw)."""
  rng, slept = random.Random(7), []
  with pytest.raises(ValueError):
    for attempt in retrying_sync(attempts=3, base_s=1.0, max_s=10.0, retry_on=ValueError,
                                 rng=rng, sleep=slept.append):
      with attempt:
        raise ValueError("again")
  reference = random.Random(7)
  assert slept == [1.0 * (0.5 + 0.5 * reference.random()), 2.0 * (0.5 + 0.5 * reference.random())]
  assert rng.random() == reference.random()  # exactly two draws were taken
