"""LLM-as-judge ("LasJ") against any OpenAI-compatible endpoint (POST {base_url}/chat/completions).

As in ASearcher's evaluation, the judge sees the question, the gold answer(s) and the
prediction (cut to `max_pred_chars`) and replies with a JSON verdict
`{"rationale": ..., "judgement": "correct"|"incorrect"}`. Judges are sampled at T=0.6 and do
not always obey the format, so parsing is lenient (fenced or bare JSON, prose around it, single
quotes, trailing commas, then a regex for the judgement word). HTTP 408/429/5xx, timeouts,
dropped connections and unparseable replies are retried with jittered exponential backoff
(`max_retries` retries after the first try); other 4xx are not, as asking again cannot help.
The judge is a remote service used inside reward and evaluation loops, so `Judge.judge` never
raises for endpoint trouble: it returns a verdict with `correct=None` and the reason in `error`.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import aiohttp

from asearcher_jax.reward.config import JudgeSection
from asearcher_jax.tools.web import retry_after

if TYPE_CHECKING:
  from typing_extensions import Self


@dataclass(frozen=True)
class JudgeVerdict:
  """`correct` is None when no verdict was obtained (then `error` says why); `attempts` counts
  tries (0: decided without asking, e.g. an empty prediction)."""

  correct: bool | None
  rationale: str
  error: str | None
  attempts: int
  raw: str = ""  # the judge's last reply, for inspection


def load_prompt(path: str | None = None) -> str:
  """The judge prompt template: `path`, or the packaged `prompts/judge.txt`. It must format with
  `{question}`, `{gold}` and `{prediction}` (literal braces doubled)."""
  if path is None:
    text = resources.files("asearcher_jax.reward").joinpath("prompts/judge.txt").read_text("utf-8")
  else:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  try:
    probe = text.format(question="\0q", gold="\0g", prediction="\0p")
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(f"judge prompt {path or 'judge.txt'}: bad placeholder ({e!r}); only "
                     "{question}, {gold}, {prediction}, with literal braces doubled") from None
  missing = [k for k in ("q", "g", "p") if f"\0{k}" not in probe]
  if missing:
    raise ValueError(f"judge prompt {path or 'judge.txt'} lacks placeholders for {missing}")
  return text


def format_golds(golds: Iterable[str]) -> str:
  """Several gold answers are shown as `a | b | c` (the packaged prompt explains this)."""
  return " | ".join(str(g).strip() for g in golds)


_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
# `judgement: correct`, quoted or in markdown bold; not the template's `"correct" or "incorrect"`.
_JUDGEMENT = re.compile(
    r"""[*"'`]*judge?ment[*"'`]*\s*[:=]\s*[*"'`]*\s*(incorrect|correct)\b(?![*"'`]*\s+or\b)""",
    re.IGNORECASE)
_MAX_LITERAL_CHARS = 20_000  # ast.literal_eval on a huge reply is slow; JSON verdicts are short


def _load_object(text: str):
  text = text.strip()
  start, end = text.find("{"), text.rfind("}")
  if start < 0 or end < start:
    return None
  body = text[start:end + 1]
  for candidate in (body, _TRAILING_COMMA.sub(r"\1", body)):
    try:
      return json.loads(candidate)
    except ValueError:
      pass
    if len(candidate) <= _MAX_LITERAL_CHARS:
      try:  # single-quoted "JSON" is a Python literal
        return ast.literal_eval(candidate)
      except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
  return None


def _judgement(value) -> bool | None:
  if isinstance(value, bool):
    return value
  if isinstance(value, str):
    word = value.strip().strip(".!\"' ").lower()
    if word in ("correct", "incorrect"):
      return word == "correct"
  return None


def parse_verdict(text: str | None) -> tuple[bool, str] | None:
  """(correct, rationale) from a judge reply, or None if it holds no verdict. Tries the last
  ``` fence first, then the whole reply, then a `"judgement": correct` pattern (last wins)."""
  if not text:
    return None
  for candidate in [m.group(1) for m in _FENCE.finditer(text)][::-1] + [text]:
    obj = _load_object(candidate)
    if isinstance(obj, dict):
      verdict = _judgement(obj.get("judgement", obj.get("judgment")))
      if verdict is not None:
        return verdict, str(obj.get("rationale", ""))
  matches = _JUDGEMENT.findall(text)
  if matches:
    return matches[-1].lower() == "correct", text.strip()
  return None


class _Retry(Exception):
  def __init__(self, message: str, retry_after: float | None = None):
    super().__init__(message)
    self.retry_after = retry_after


class _Fatal(Exception):
  """Retrying cannot help (a 4xx other than 408/429, an endpoint with no models)."""


class Judge:
  """An LLM judge client: one aiohttp session and one concurrency limit per event loop.
  Use as `async with Judge(cfg) as j: verdict = await j.judge(q, pred, golds)`."""

  def __init__(self, cfg: JudgeSection | None = None, *, seed: int | None = None):
    self.cfg = cfg or JudgeSection()
    self.template = load_prompt(self.cfg.prompt_file)
    self._model = self.cfg.model
    self._rng = random.Random(seed)
    self._session: aiohttp.ClientSession | None = None
    self._sem: asyncio.Semaphore | None = None
    self._loop = None
    self.requests = 0  # HTTP requests made, /models and retries included

  async def __aenter__(self) -> Self:
    return self

  async def __aexit__(self, *exc) -> None:
    await self.close()

  def _ensure(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
    # Sessions and semaphores belong to their event loop: a new loop gets new ones.
    loop = asyncio.get_running_loop()
    if self._session is None or self._session.closed or self._loop is not loop:
      self._session = aiohttp.ClientSession()
      self._sem, self._loop = asyncio.Semaphore(self.cfg.concurrency), loop
    return self._session, self._sem

  async def close(self) -> None:
    if self._session is not None and self._loop is asyncio.get_running_loop():
      await self._session.close()
    self._session = None

  def render(self, question: str, prediction: str, golds: Iterable[str]) -> str:
    """The judge prompt for one item, the prediction cut to `max_pred_chars`."""
    return self.template.format(question=question, gold=format_golds(golds),
                                prediction=prediction[:self.cfg.max_pred_chars])

  def _headers(self) -> dict[str, str]:
    key = os.environ.get(self.cfg.api_key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}

  async def _call(self, method: str, path: str, **kw):
    session, sem = self._ensure()
    url = self.cfg.base_url.rstrip("/") + path
    try:
      async with sem:
        self.requests += 1
        async with session.request(method, url, headers=self._headers(),
                                   timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
                                   **kw) as r:
          if r.status in (408, 429) or r.status >= 500:
            raise _Retry(f"{path}: HTTP {r.status}", retry_after(r.headers.get("Retry-After")))
          if r.status >= 400:
            detail = (await r.text(errors="replace"))[:200]
            raise _Fatal(f"{path}: HTTP {r.status} {detail}".strip())
          try:
            return await r.json(content_type=None)
          except ValueError as e:
            raise _Retry(f"{path}: reply is not JSON ({e})") from None
    except asyncio.TimeoutError:
      raise _Retry(f"{path}: no reply within {self.cfg.timeout_s}s") from None
    except aiohttp.ClientError as e:
      raise _Retry(f"{url}: {type(e).__name__}: {e}") from None

  async def _resolve_model(self) -> str:
    if self._model is None:
      data = await self._call("GET", "/models")
      models = data.get("data") if isinstance(data, dict) else None
      if not isinstance(models, list):
        raise _Retry("/models: reply lacks a 'data' list")
      ids = [m.get("id") for m in models if isinstance(m, dict) and m.get("id")]
      if not ids:
        raise _Fatal("/models: the endpoint serves no models; set reward.judge.model")
      self._model = str(ids[0])
    return self._model

  async def _complete(self, prompt: str) -> str:
    body = {"model": await self._resolve_model(),
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.cfg.temperature, "top_p": self.cfg.top_p,
            "max_tokens": self.cfg.max_tokens}
    data = await self._call("POST", "/chat/completions", json=body)
    try:
      content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
      raise _Retry("/chat/completions: reply lacks choices[0].message.content") from None
    return content if isinstance(content, str) else ""

  async def judge(self, question: str, prediction: str, golds: Iterable[str] | str) -> JudgeVerdict:
    """Is `prediction` equivalent to one of `golds`? Never raises for endpoint trouble."""
    golds = [golds] if isinstance(golds, str) else [str(g) for g in golds if g is not None]
    if not prediction or not prediction.strip():
      return JudgeVerdict(False, "empty prediction", None, 0)
    if not golds:
      return JudgeVerdict(None, "", "no gold answers to judge against", 0)
    prompt = self.render(question, prediction, golds)
    attempt, raw = 0, ""
    while True:
      attempt += 1
      retry_after = None
      try:
        raw = await self._complete(prompt)
        parsed = parse_verdict(raw)
        if parsed is not None:
          return JudgeVerdict(parsed[0], parsed[1], None, attempt, raw)
        err = f"unparseable verdict: {raw[:200]!r}"
      except _Retry as e:
        err, retry_after = str(e), e.retry_after
      except _Fatal as e:
        return JudgeVerdict(None, "", str(e), attempt, raw)
      except Exception as e:  # noqa: BLE001 - a reward loop must not die on a judge bug
        return JudgeVerdict(None, "", f"{type(e).__name__}: {e}", attempt, raw)
      if attempt > self.cfg.max_retries:
        return JudgeVerdict(None, "", f"{err} (after {attempt} attempts)", attempt, raw)
      delay = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** (attempt - 1))
      delay *= 0.5 + 0.5 * self._rng.random()
      if retry_after is not None:
        delay = max(delay, min(retry_after, self.cfg.max_backoff_s))
      await asyncio.sleep(delay)
