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

`OpenAIChat` is that transport on its own (session, concurrency cap, retries, model lookup,
ask-until-parseable); the QA synthesis agent (`asearcher_jax.synth`) talks through it too.
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
from typing import TYPE_CHECKING, Any

import aiohttp

from asearcher_jax.retry import retry_after, retrying
from asearcher_jax.reward.config import EndpointSection, JudgeSection

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


def check_template(text: str, names: Iterable[str], label: str) -> str:
  """`text` if it formats with exactly the placeholders `names` (literal braces doubled)."""
  names = list(names)
  probe_values = {n: f"\0{n}\0" for n in names}
  try:
    probe = text.format(**probe_values)
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(f"prompt {label}: bad placeholder ({e!r}); only "
                     + ", ".join("{" + n + "}" for n in names)
                     + ", with literal braces doubled") from None
  missing = [n for n in names if probe_values[n] not in probe]
  if missing:
    raise ValueError(f"prompt {label} lacks placeholders for {missing}")
  return text


def load_prompt(path: str | None = None) -> str:
  """The judge prompt template: `path`, or the packaged `prompts/judge.txt`. It must format with
  `{question}`, `{gold}` and `{prediction}` (literal braces doubled)."""
  if path is None:
    text = resources.files("asearcher_jax.reward").joinpath("prompts/judge.txt").read_text("utf-8")
  else:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  return check_template(text, ("question", "gold", "prediction"), path or "judge.txt")


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


def parse_json_reply(text: str | None, accept=lambda obj: True) -> dict | None:
  """The JSON object an LLM reply holds, or None: the last ``` fence first, then the whole
  reply (prose around the object, single quotes and trailing commas allowed). `accept` picks
  among candidates, e.g. the one with the field a prompt asked for."""
  if not text:
    return None
  for candidate in [m.group(1) for m in _FENCE.finditer(text)][::-1] + [text]:
    obj = _load_object(candidate)
    if isinstance(obj, dict) and accept(obj):
      return obj
  return None


def parse_verdict(text: str | None) -> tuple[bool, str] | None:
  """(correct, rationale) from a judge reply, or None if it holds no verdict. Tries the last
  ``` fence first, then the whole reply, then a `"judgement": correct` pattern (last wins)."""
  if not text:
    return None
  obj = parse_json_reply(
      text, lambda o: _judgement(o.get("judgement", o.get("judgment"))) is not None)
  if obj is not None:
    return _judgement(obj.get("judgement", obj.get("judgment"))), str(obj.get("rationale", ""))
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

  def __init__(self, message: str, status: int | None = None):
    super().__init__(message)
    self.status = status


@dataclass(frozen=True)
class Reply:
  """The outcome of `OpenAIChat.ask`: `value` is the parsed reply, or None with `error` saying
  why; `unavailable` tells endpoint trouble (HTTP, timeouts, no models) from replies that came
  but never parsed, since a caller may retry the first later and count the second as content."""

  value: Any
  error: str | None
  attempts: int
  raw: str = ""
  unavailable: bool = False
  status: int | None = None  # the HTTP status of a request refused for good (4xx)


class OpenAIChat:
  """One user message to `POST {base_url}/chat/completions`, with one aiohttp session and one
  concurrency limit per event loop, jittered exponential backoff (Retry-After respected) on
  408/429/5xx, timeouts, dropped connections and unparseable replies."""

  def __init__(self, cfg: EndpointSection, *, seed: int | None = None):
    self.cfg = cfg
    self._model = cfg.model
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
            raise _Fatal(f"{path}: HTTP {r.status} {detail}".strip(), r.status)
          try:
            return await r.json(content_type=None)
          except ValueError as e:
            raise _Retry(f"{path}: reply is not JSON ({e})") from None
    except asyncio.TimeoutError:
      raise _Retry(f"{path}: no reply within {self.cfg.timeout_s}s") from None
    except aiohttp.ClientError as e:
      raise _Retry(f"{url}: {type(e).__name__}: {e}") from None

  async def model(self) -> str:
    """The configured model, else the first one the endpoint lists under /models."""
    if self._model is None:
      data = await self._call("GET", "/models")
      models = data.get("data") if isinstance(data, dict) else None
      if not isinstance(models, list):
        raise _Retry("/models: reply lacks a 'data' list")
      ids = [m.get("id") for m in models if isinstance(m, dict) and m.get("id")]
      if not ids:
        raise _Fatal("/models: the endpoint serves no models; set the endpoint's model")
      self._model = str(ids[0])
    return self._model

  async def complete(self, prompt: str, temperature: float | None = None) -> str:
    """One request, no retries: the reply text (raises `_Retry`/`_Fatal`)."""
    body = {"model": await self.model(),
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.cfg.temperature if temperature is None else temperature,
            "top_p": self.cfg.top_p, "max_tokens": self.cfg.max_tokens}
    data = await self._call("POST", "/chat/completions", json=body)
    try:
      content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
      raise _Retry("/chat/completions: reply lacks choices[0].message.content") from None
    return content if isinstance(content, str) else ""

  async def ask(self, prompt: str, parse, *,
                temperature: float | None = None, what: str = "reply") -> Reply:
    """Asks until `parse(reply)` is not None or `max_retries` retries are spent. Never raises
    for endpoint trouble or a bad reply; a 4xx other than 408/429 is not retried."""
    raw, n, unavailable = "", 0, True
    try:
      async for attempt in retrying(attempts=self.cfg.max_retries + 1, base_s=self.cfg.backoff_s,
                                    max_s=self.cfg.max_backoff_s, retry_on=_Retry, rng=self._rng):
        with attempt:
          n, unavailable = n + 1, True
          raw = await self.complete(prompt, temperature)
          value = parse(raw)
          if value is not None:
            return Reply(value, None, n, raw)
          unavailable = False
          raise _Retry(f"unparseable {what}: {raw[:200]!r}")
    except _Retry as e:
      return Reply(None, f"{e} (after {n} attempts)", n, raw, unavailable)
    except _Fatal as e:
      return Reply(None, str(e), n, raw, unavailable=True, status=e.status)
    except Exception as e:  # noqa: BLE001 - a caller's loop must not die on a client bug
      return Reply(None, f"{type(e).__name__}: {e}", n, raw, unavailable=True)


class Judge(OpenAIChat):
  """An LLM judge client: `OpenAIChat` with the judge prompt.
  Use as `async with Judge(cfg) as j: verdict = await j.judge(q, pred, golds)`."""

  cfg: JudgeSection

  def __init__(self, cfg: JudgeSection | None = None, *, seed: int | None = None):
    cfg = cfg or JudgeSection()
    self.template = load_prompt(cfg.prompt_file)
    super().__init__(cfg, seed=seed)

  def render(self, question: str, prediction: str, golds: Iterable[str]) -> str:
    """The judge prompt for one item, the prediction cut to `max_pred_chars`."""
    return self.template.format(question=question, gold=format_golds(golds),
                                prediction=prediction[:self.cfg.max_pred_chars])

  async def judge(self, question: str, prediction: str, golds: Iterable[str] | str) -> JudgeVerdict:
    """Is `prediction` equivalent to one of `golds`? Never raises for endpoint trouble."""
    golds = [golds] if isinstance(golds, str) else [str(g) for g in golds if g is not None]
    if not prediction or not prediction.strip():
      return JudgeVerdict(False, "empty prediction", None, 0)
    if not golds:
      return JudgeVerdict(None, "", "no gold answers to judge against", 0)
    reply = await self.ask(self.render(question, prediction, golds), parse_verdict,
                           what="verdict")
    if reply.value is None:
      return JudgeVerdict(None, "", reply.error, reply.attempts, reply.raw)
    return JudgeVerdict(reply.value[0], reply.value[1], None, reply.attempts, reply.raw)
