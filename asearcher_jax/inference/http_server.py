"""OpenAI-compatible HTTP endpoint (aiohttp): completions, chat completions, models, metrics.

Evaluation tools and the `openai` client work against it unchanged. Log-probs
are the sampling-time ones the RL side uses. Stop strings follow OpenAI: the
text ends before the stop string. Errors are OpenAI-shaped JSON with 400
(bad request), 401 (token), 503 (queue full).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any

from aiohttp import web

from asearcher_jax.auth import bearer_ok
from asearcher_jax.errors import AsearcherError
from asearcher_jax.inference.driver import QueueFullError
from asearcher_jax.inference.sampling import SamplingParams
from asearcher_jax.inference.service import DecodeService, truncate_at_stop

MAX_BODY = 16 << 20
MAX_N = 16


class BadRequest(ValueError):
  pass


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
  return web.json_response({"error": {"message": message, "type": kind, "code": status}},
                           status=status)


def _field(body: dict, name: str, types, default=None, check=None, what: str = ""):
  """A numeric field: absent/null gives the default; bools and other types are refused."""
  value = body.get(name)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, types):
    raise BadRequest(f"'{name}' must be {what}, got {value!r}")
  if isinstance(value, int) and float in (types if isinstance(types, tuple) else (types,)):
    try:
      value = float(value)
    except OverflowError:
      raise BadRequest(f"'{name}' is out of range") from None
  if check is not None and not check(value):
    raise BadRequest(f"'{name}' must be {what}, got {value!r}")
  return value


class OpenAIServer:
  def __init__(self, service: DecodeService, token: str | None, metrics=None):
    self.service, self.token, self.metrics = service, token, metrics

  def app(self) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
    app.router.add_post("/v1/completions", self.completions)
    app.router.add_post("/v1/chat/completions", self.chat_completions)
    app.router.add_get("/v1/models", self.models)
    app.router.add_get("/health", self.health)
    app.router.add_get("/metrics", self.metrics_text)
    return app

  @web.middleware
  async def _middleware(self, request: web.Request, handler):
    if request.path != "/health" and not bearer_ok(request.headers.get("Authorization"),
                                                   self.token):
      return _error(401, "missing or wrong bearer token", "authentication_error")
    try:
      return await handler(request)
    except web.HTTPException:
      raise
    except QueueFullError as e:
      return _error(503, str(e), "server_overloaded")
    except (BadRequest, ValueError, AsearcherError) as e:
      return _error(400, str(e))

  async def _json(self, request: web.Request) -> dict[str, Any]:
    try:
      body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise BadRequest(f"the body is not valid JSON: {e}") from None
    except web.HTTPRequestEntityTooLarge:
      raise BadRequest(f"the body exceeds {MAX_BODY} bytes") from None
    if not isinstance(body, dict):
      raise BadRequest("the body must be a JSON object")
    return body

  def _sampling(self, body: dict, max_tokens_key: str = "max_tokens") -> tuple[SamplingParams, int]:
    max_tokens = _field(body, max_tokens_key, int, None, lambda v: v >= 1, "a positive integer")
    if max_tokens_key != "max_tokens" and max_tokens is None:
      max_tokens = _field(body, "max_tokens", int, None, lambda v: v >= 1, "a positive integer")
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 8:
      raise BadRequest("'stop' must be a non-empty string or a list of up to 8 of them")
    if body.get("stream"):
      raise BadRequest("'stream': true is not supported by this endpoint; use the gRPC "
                       "GenerateStream or Orchestrator.Decode for streaming")
    n = _field(body, "n", int, 1, lambda v: 1 <= v <= MAX_N, f"1..{MAX_N}")
    sampling = SamplingParams(
        temperature=float(_field(body, "temperature", (int, float), 1.0, what="a number")),
        top_p=float(_field(body, "top_p", (int, float), 1.0, what="a number")),
        top_k=_field(body, "top_k", int, 0, what="an integer"),
        seed=_field(body, "seed", int, None, what="an integer"), max_new_tokens=max_tokens,
        stop_token_ids=self.service.default_stop_ids, stop=stop)
    return sampling, n

  async def _run(self, prompt: list[int], sampling: SamplingParams, n: int):
    """n samples run concurrently (seed + i each); one failure cancels the others."""
    seeds = [None if sampling.seed is None else sampling.seed + i for i in range(n)]
    tasks = [asyncio.ensure_future(self.service.generate(
        prompt, dataclasses.replace(sampling, seed=seed))) for seed in seeds]
    try:
      results = await asyncio.gather(*tasks)
    except BaseException:
      for t in tasks:
        t.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)
      raise
    failed = [r for r in results if r.finish_reason == "error"]
    if failed:
      raise web.HTTPInternalServerError(
          text=json.dumps({"error": {"message": failed[0].error or "generation failed",
                                     "type": "server_error", "code": 500}}),
          content_type="application/json")
    return results

  def _choice_text(self, r, sampling: SamplingParams) -> tuple[str, str, int]:
    """(text, finish_reason, how many output tokens the text covers)."""
    ids = r.output_ids
    if r.finish_reason == "stop" and ids and ids[-1] in sampling.stop_token_ids:
      ids = ids[:-1]  # the end-of-turn token is not part of the text
    text, hit = truncate_at_stop(self.service.decode(ids), sampling.stop)
    reason = "stop" if hit or r.finish_reason == "stop" else "length"
    return text, reason, len(ids)

  async def completions(self, request: web.Request) -> web.Response:
    body = await self._json(request)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
      if not prompt:
        raise BadRequest("'prompt' is empty")
      ids = self.service.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
      ids = prompt
    else:
      raise BadRequest("'prompt' must be a non-empty string or a list of token ids")
    sampling, n = self._sampling(body)
    want_logprobs = body.get("logprobs") is not None
    results = await self._run(ids, sampling, n)
    choices = []
    for i, r in enumerate(results):
      text, reason, covered = self._choice_text(r, sampling)
      choice = {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
      if want_logprobs:
        tokens = [self.service.decode([t]) for t in r.output_ids[:covered]]
        offsets, pos = [], 0
        for t in tokens:
          offsets.append(pos)
          pos += len(t)
        choice["logprobs"] = {"tokens": tokens, "token_logprobs": r.logprobs[:covered],
                              "top_logprobs": None, "text_offset": offsets}
      choices.append(choice)
    return web.json_response(self._envelope("text_completion", choices, len(ids), results))

  async def chat_completions(self, request: web.Request) -> web.Response:
    body = await self._json(request)
    messages = body.get("messages")
    if (not isinstance(messages, list) or not messages or
        not all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                isinstance(m.get("content"), str) for m in messages)):
      raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    if self.service.tokenizer is None:
      raise BadRequest("this server has no tokenizer; chat needs one")
    text = self.service.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = self.service.encode(text)
    sampling, n = self._sampling(body, "max_completion_tokens")
    results = await self._run(ids, sampling, n)
    choices = []
    for i, r in enumerate(results):
      content, reason, covered = self._choice_text(r, sampling)
      choice = {"index": i, "message": {"role": "assistant", "content": content},
                "finish_reason": reason, "logprobs": None}
      if body.get("logprobs"):
        entries = []
        for t, lp in zip(r.output_ids[:covered], r.logprobs[:covered]):
          piece = self.service.decode([t])
          entries.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()),
                          "top_logprobs": []})
        choice["logprobs"] = {"content": entries}
      choices.append(choice)
    return web.json_response(self._envelope("chat.completion", choices, len(ids), results))

  def _envelope(self, kind: str, choices, prompt_tokens: int, results) -> dict:
    completion = sum(len(r.output_ids) for r in results)
    return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": kind, "created": int(time.time()), "model": self.service.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
            "system_fingerprint":
                f"version-{results[0].versions[-1] if results[0].versions else 0}"}

  async def models(self, request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [
        {"id": self.service.model_name, "object": "model", "created": 0, "owned_by": "asearcher"}]})

  async def health(self, request: web.Request) -> web.Response:
    live = self.service.driver.live
    return web.json_response({"live": live, "version": self.service.driver.version},
                             status=200 if live else 503)

  async def metrics_text(self, request: web.Request) -> web.Response:
    if self.metrics is None:
      return _error(404, "metrics are disabled")
    body = self.metrics.render(self.service.driver.stats())
    return web.Response(body=body, content_type="text/plain", charset="utf-8")
