"""The agent's view of a model: one `complete(prompt, sampling)` call per turn.

`DecodePolicy` is token-in/token-out against our decode server's RL API (exact ids, behaviour
log-probs and versions: what training needs). `OpenAIPolicy` talks text to any
OpenAI-compatible endpoint (`/completions`, or `/chat/completions` for chat-only models) for
evaluation; its records carry a transcript but no tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any, Protocol

import aiohttp
import grpc

from asearcher_jax.inference.client import DecodeClient
from asearcher_jax.inference.protocol import QueueFullError, SamplingParams
from asearcher_jax.models.tokenizer import Tokenizer
from asearcher_jax.retry import Transient, retrying


class PolicyUnavailable(RuntimeError):
  """The model endpoint is gone (the episode ends `aborted`)."""


class ContextTooLong(ValueError):
  """The endpoint refused the prompt for its length (the episode ends `context_full`)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  ids: list[int] | None  # token backends
  text: str  # completion backends
  messages: list[dict[str, str]] | None = None  # chat backends
  said: str = ""  # the message so far, when this call continues one cut by max_new_tokens


@dataclasses.dataclass
class Completion:
  text: str
  ids: list[int] | None
  logprobs: list[float] | None
  versions: list[int] | None
  finish_reason: str  # stop | length | max_len | cancelled
  eos: bool  # the model ended its message (end-of-sequence), not a stop string
  prompt_tokens: int | None = None


class Policy(Protocol):
  tokenizer: Tokenizer | None
  chat: bool  # wants `Prompt.messages`

  async def complete(self, prompt: Prompt, sampling: SamplingParams,
                     session_id: str | None = None) -> Completion: ...

  async def end_session(self, session_id: str) -> None: ...


class DecodePolicy:
  """Our decode server over gRPC. `eos_ids` end a message (the tokenizer's by default)."""

  chat = False

  def __init__(self, client: DecodeClient, tokenizer: Tokenizer,
               eos_ids: tuple[int, ...] | None = None, queue_retries: int = 6):
    self.client, self.tokenizer, self.queue_retries = client, tokenizer, queue_retries
    self.eos_ids = eos_ids if eos_ids is not None else tokenizer.eos_ids

  async def complete(self, prompt: Prompt, sampling: SamplingParams,
                     session_id: str | None = None) -> Completion:
    sampling = dataclasses.replace(
        sampling, stop_token_ids=tuple(dict.fromkeys(sampling.stop_token_ids + self.eos_ids)))
    try:
      async for attempt in retrying(attempts=self.queue_retries + 1, base_s=0.2, max_s=10.0,
                                    retry_on=QueueFullError, jitter=False):
        with attempt:
          r = await self.client.generate(prompt.ids, sampling, session_id=session_id)
    except QueueFullError:
      raise PolicyUnavailable(f"decode server {self.client.address}: queue full") from None
    except ValueError as e:
      if "maximum is" in str(e) or "max_len" in str(e):
        raise ContextTooLong(str(e)) from None
      raise PolicyUnavailable(f"decode server {self.client.address} refused: {e}") from None
    except grpc.aio.AioRpcError as e:
      raise PolicyUnavailable(f"decode server {self.client.address}: {e.code().name}: "
                              f"{e.details()}") from None
    if r.finish_reason in ("error", "cancelled") and not r.output_ids:
      raise PolicyUnavailable(f"decode server {self.client.address}: request {r.finish_reason}")
    eos = bool(r.output_ids) and r.output_ids[-1] in self.eos_ids
    return Completion(self.tokenizer.decode(r.output_ids), list(r.output_ids), list(r.logprobs),
                      list(r.versions), r.finish_reason, eos, len(prompt.ids))

  async def end_session(self, session_id: str) -> None:
    try:
      await self.client.end_session(session_id)
    except grpc.aio.AioRpcError:
      pass  # a server that is gone has no session to keep


def restore_stop(text: str, stops: tuple[str, ...]) -> str:
  """OpenAI servers cut the stop string off; the agent needs its closing tag back. Of the stop
  tags, the one whose opening tag appears last (and unclosed) in the text is re-appended. A
  text that already ends with a stop string (a server that keeps it) is left as it is."""
  if any(text.endswith(s) for s in stops):
    return text
  best, where = None, -1
  for stop in stops:
    if stop.startswith("</") and stop.endswith(">"):
      opening = "<" + stop[2:]
      i = text.rfind(opening)
      if i > where and text.rfind(stop) < i:
        best, where = stop, i
  if best is None and "</think>" in stops and "<think>" not in text:
    best = "</think>"  # a reading note closes the <think> the observation opened
  return text + best if best else text


class OpenAIPolicy:
  """Any OpenAI-compatible endpoint; `chat=True` uses /chat/completions with messages."""

  def __init__(self, base_url: str, model: str | None = None, *, chat: bool = False,
               api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 600.0,
               max_retries: int = 3, tokenizer: Tokenizer | None = None):
    self.base_url = base_url.rstrip("/")
    self.model, self.chat, self.tokenizer = model, chat, tokenizer
    self.api_key = os.environ.get(api_key_env)
    self.timeout = aiohttp.ClientTimeout(total=timeout_s)
    self.max_retries = max_retries
    self._session: aiohttp.ClientSession | None = None

  async def close(self) -> None:
    if self._session is not None:
      await self._session.close()
      self._session = None

  def _http(self) -> aiohttp.ClientSession:
    if self._session is None:
      headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
      self._session = aiohttp.ClientSession(headers=headers, timeout=self.timeout)
    return self._session

  async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
      async for attempt in retrying(attempts=self.max_retries + 1, base_s=1.0, max_s=8.0,
                                    retry_on=(Transient, aiohttp.ClientError, asyncio.TimeoutError),
                                    jitter=False):
        with attempt:
          async with self._http().post(self.base_url + path, json=body) as resp:
            if resp.status == 400:
              detail = await resp.text()
              if any(w in detail.lower() for w in ("context", "too long", "maximum")):
                raise ContextTooLong(detail[:300])
              raise PolicyUnavailable(f"{self.base_url}{path}: 400 {detail[:300]}")
            if resp.status in (408, 429) or resp.status >= 500:
              raise Transient(f"HTTP {resp.status}")
            if resp.status != 200:
              raise PolicyUnavailable(f"{self.base_url}{path}: HTTP {resp.status}")
            return await resp.json()
    except Transient as e:
      raise PolicyUnavailable(f"{self.base_url}{path}: {e}") from None
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
      raise PolicyUnavailable(f"{self.base_url}{path}: {type(e).__name__}: {e}") from None

  async def _model(self) -> str:
    """The configured model, else the endpoint's first (GET /models)."""
    if self.model is None:
      try:
        async with self._http().get(self.base_url + "/models") as r:
          self.model = (await r.json())["data"][0]["id"]
      except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, ValueError) as e:
        raise PolicyUnavailable(f"{self.base_url}/models: {type(e).__name__}: {e}") from None
    return self.model

  async def complete(self, prompt: Prompt, sampling: SamplingParams,
                     session_id: str | None = None) -> Completion:
    body: dict[str, Any] = {"model": await self._model(), "temperature": sampling.temperature,
                            "top_p": sampling.top_p}
    if sampling.max_new_tokens:
      body["max_tokens"] = sampling.max_new_tokens
    if sampling.stop:
      body["stop"] = list(sampling.stop)[:4]  # OpenAI's limit
    if sampling.seed is not None:
      body["seed"] = sampling.seed
    if self.chat:
      body["messages"] = prompt.messages
    else:
      body["prompt"] = prompt.text
    path = "/chat/completions" if self.chat else "/completions"
    out = await self._post(path, body)
    try:
      choice = out["choices"][0]
      text = (choice["message"].get("content") if self.chat else choice.get("text")) or ""
    except (KeyError, IndexError, TypeError, AttributeError):
      raise PolicyUnavailable(f"{self.base_url}{path}: malformed reply {str(out)[:200]}") from None
    reason = choice.get("finish_reason") or "stop"
    if reason == "stop":  # the call's opening tag may lie in the part of the message said before
      text = restore_stop(prompt.said + text, tuple(sampling.stop))[len(prompt.said):]
    hit_stop = any((prompt.said + text).endswith(s) for s in sampling.stop)
    usage = out.get("usage") or {}
    return Completion(text, None, None, None, "length" if reason == "length" else "stop",
                      reason == "stop" and not hit_stop, usage.get("prompt_tokens"))

  async def end_session(self, session_id: str) -> None:
    return None
