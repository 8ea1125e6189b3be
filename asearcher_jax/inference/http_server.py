"""OpenAI-compatible HTTP endpoint (aiohttp): completions, chat completions, models, metrics.

The `openai` client, chat UIs and eval harnesses work against it unchanged, streaming or not:
`stream: true` answers Server-Sent Events (`data: {chunk}` ... `data: [DONE]`, with a usage
chunk under `stream_options.include_usage`), `n` samples run concurrently (seed + i each, modulo
2**64), `max_tokens` defaults to 16 on /v1/completions (OpenAI's legacy default; chat's is none),
`logprobs` / `top_logprobs` report the sampling-time log-probs the RL side uses with the most
likely alternatives, and each token's exact `bytes` (part of a character included). Stop strings
follow OpenAI: the text ends before the stop string (a stream holds back only what could still
begin one). What this server cannot honour (`logit_bias`, penalties, `echo`, `suffix`, tools,
JSON mode) is refused with a 400 naming the field, never silently ignored. Errors are
OpenAI-shaped JSON: 400 (bad request), 401 (token), 404 (unknown model or route), 405 (method),
500 (the decode loop failed the request), 503 (queue full).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import json
import time
import uuid
from typing import Any

from aiohttp import web

from asearcher_jax.auth import bearer_ok
from asearcher_jax.errors import AsearcherError
from asearcher_jax.inference.protocol import (
    MAX_TOP_LOGPROBS,
    GenerationFailed,
    QueueFullError,
    SamplingParams,
)
from asearcher_jax.inference.service import (
    DecodeService,
    IncrementalDetokenizer,
    truncate_at_stop,
)

MAX_BODY = 16 << 20
MAX_N = 16
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit
COMPLETION_MAX_TOKENS = 16  # the legacy completions API's default max_tokens

# Fields a client may send that this server cannot honour: refused when they ask for anything
# but the default, so a client never gets a result computed differently from what it asked.
_UNSUPPORTED = {
    "logit_bias": lambda v: bool(v), "presence_penalty": lambda v: v not in (0, 0.0),
    "frequency_penalty": lambda v: v not in (0, 0.0), "repetition_penalty": lambda v: v != 1,
    "echo": bool, "suffix": bool, "tools": bool, "functions": bool,
    "tool_choice": lambda v: v != "none", "function_call": lambda v: v != "none",
    "response_format": lambda v: not (isinstance(v, dict) and v.get("type") == "text"),
    "prediction": bool, "audio": bool,
    "modalities": lambda v: v != ["text"],
}


class BadRequest(ValueError):
  pass


class UnknownModel(LookupError):
  pass


def _error(status: int, message: str, kind: str = "invalid_request_error",
           code: str | int | None = None) -> web.Response:
  return web.json_response(
      {"error": {"message": message, "type": kind, "code": status if code is None else code}},
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


@dataclasses.dataclass(frozen=True)
class Ask:
  """What one request asks, validated."""

  sampling: SamplingParams
  n: int
  stream: bool
  include_usage: bool
  logprobs: int | None  # None: no log-probs; else how many alternatives per token


class StopScanner:
  """Streams text that ends before the first stop string, holding back only a tail that could
  still be the start of one."""

  def __init__(self, stops: tuple[str, ...]):
    self.stops, self.buf = stops, ""
    self.hold = max((len(s) for s in stops), default=1) - 1

  def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
    """(text safe to send, whether a stop string was hit)."""
    self.buf += text
    out, hit = truncate_at_stop(self.buf, self.stops)
    if hit or final:
      self.buf = ""
      return out, hit
    safe = max(len(self.buf) - self.hold, 0)
    out, self.buf = self.buf[:safe], self.buf[safe:]
    return out, False


class TokenText:
  """A choice's text, decoded token by token, with where each token's text starts: a token's
  log-probs go out with the first of its text that does, so a stop string's tokens never
  report one, and a streamed choice reports the tokens its whole answer would."""

  def __init__(self, tokenizer, per_token: bool = True):
    self.detok = IncrementalDetokenizer(tokenizer)
    self.per_token = per_token  # off: the text alone, decoded a chunk at a time
    self.starts: list[int] = []
    self.length = 0

  def add(self, ids: list[int]) -> str:
    if not self.per_token:
      return self.detok.add(ids) if ids else ""
    pieces = []
    for t in ids:
      self.starts.append(self.length)
      pieces.append(self.detok.add([t]))
      self.length += len(pieces[-1])
    return "".join(pieces)

  def flush(self) -> str:
    return self.detok.flush()

  def covering(self, chars: int) -> int:
    """How many tokens have text within the first `chars` characters: OpenAI's rule for the
    text before a stop string, the tokens up to the one that completes it (none for "")."""
    return bisect.bisect_left(self.starts, chars)


class OpenAIServer:
  def __init__(self, service: DecodeService, token: str | None, metrics=None,
               max_body_bytes: int = MAX_BODY):
    self.service, self.token, self.metrics = service, token, metrics
    self.max_body_bytes = max_body_bytes

  def app(self) -> web.Application:
    app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._middleware])
    app.router.add_post("/v1/completions", self.completions)
    app.router.add_post("/v1/chat/completions", self.chat_completions)
    app.router.add_get("/v1/models", self.models)
    app.router.add_get("/v1/models/{model:.+}", self.model)  # "Qwen/Qwen3-0.6B" unencoded too
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
    except web.HTTPException as e:  # aiohttp's own (no such route, method) answer in JSON too
      if e.status < 400 or e.content_type == "application/json":
        raise
      response = _error(e.status, f"{request.method} {request.path}: {e.reason}")
      if "Allow" in e.headers:  # a 405 names the methods the route takes
        response.headers["Allow"] = e.headers["Allow"]
      return response
    except UnknownModel as e:
      return _error(404, str(e), code="model_not_found")
    except QueueFullError as e:
      return _error(503, str(e), "server_overloaded")
    except GenerationFailed as e:
      return _error(500, str(e), "server_error")
    except (BadRequest, ValueError, AsearcherError) as e:
      return _error(400, str(e))

  # -- requests -----------------------------------------------------------------------

  async def _json(self, request: web.Request) -> dict[str, Any]:
    try:
      raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
      raise BadRequest(f"the body exceeds {self.max_body_bytes} bytes (serve.max_body_bytes)"
                       ) from None
    except Exception as e:  # noqa: BLE001 -- a body that cannot be read (bad gzip, cut short)
      raise BadRequest(f"the body cannot be read: {type(e).__name__}: {e}") from None
    try:
      body = json.loads(raw)
    except RecursionError:
      raise BadRequest("the body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer of over 4,300 digits
      raise BadRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
      raise BadRequest("the body must be a JSON object")
    model = body.get("model")
    if model is not None and model != self.service.model_name:
      raise UnknownModel(f"The model {model!r} does not exist (this server serves "
                         f"{self.service.model_name!r})")
    for name, asks in _UNSUPPORTED.items():
      if body.get(name) is not None and asks(body[name]):
        raise BadRequest(f"'{name}' is not supported by this server")
    return body

  def _ask(self, body: dict, chat: bool) -> Ask:
    max_tokens = None
    if chat:
      max_tokens = _field(body, "max_completion_tokens", int, None, lambda v: v >= 1,
                          "a positive integer")
    if max_tokens is None:
      max_tokens = _field(body, "max_tokens", int, None, lambda v: v >= 1, "a positive integer")
    if max_tokens is None and not chat:
      # OpenAI's legacy completions (and vLLM's) stop at 16 tokens unless told otherwise.
      max_tokens = min(COMPLETION_MAX_TOKENS, self.service.driver.engine.max_len)
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if (not isinstance(stop, (tuple, list)) or len(stop) > 8
        or not all(isinstance(s, str) and s for s in stop)):
      raise BadRequest("'stop' must be a non-empty string or a list of up to 8 of them")
    stop = tuple(stop)
    n = _field(body, "n", int, 1, lambda v: 1 <= v <= MAX_N, f"1..{MAX_N}")
    _field(body, "best_of", int, n, lambda v: v == n, f"equal to n ({n}): no other is served")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
      raise BadRequest(f"'stream' must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
      raise BadRequest("'stream_options' must be an object like {\"include_usage\": true}")
    if options and not stream:
      raise BadRequest("'stream_options' is only allowed with 'stream': true")
    if chat:
      want = body.get("logprobs")
      if want is not None and not isinstance(want, bool):
        raise BadRequest(f"'logprobs' must be true or false, got {want!r}")
      top = _field(body, "top_logprobs", int, None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
                   f"an integer in 0..{MAX_TOP_LOGPROBS}")
      if top is not None and not want:
        raise BadRequest("'top_logprobs' needs 'logprobs': true")
      logprobs = (top or 0) if want else None
    else:
      logprobs = _field(body, "logprobs", int, None, lambda v: 0 <= v <= MAX_COMPLETION_LOGPROBS,
                        f"an integer in 0..{MAX_COMPLETION_LOGPROBS}")
    sampling = SamplingParams(
        temperature=float(_field(body, "temperature", (int, float), 1.0, what="a number")),
        top_p=float(_field(body, "top_p", (int, float), 1.0, what="a number")),
        top_k=_field(body, "top_k", int, 0, what="an integer"),
        seed=_field(body, "seed", int, None, what="an integer"), max_new_tokens=max_tokens,
        stop_token_ids=self.service.default_stop_ids, stop=stop, top_logprobs=logprobs or 0)
    return Ask(sampling, n, bool(stream), bool(options.get("include_usage")), logprobs)

  def _seeded(self, sampling: SamplingParams, i: int) -> SamplingParams:
    """Choice i's sampling: seed + i, wrapped into [0, 2**64) so that every seed a request may
    carry serves n choices (n distinct seeds); an out-of-range one is left to be refused."""
    seed = sampling.seed
    if seed is not None and 0 <= seed < 2**64:
      seed = (seed + i) % 2**64
    return dataclasses.replace(sampling, seed=seed)

  # -- log-probs ----------------------------------------------------------------------

  def _completion_logprobs(self, ids, logprobs, tops, offset: int) -> dict:
    """The legacy shape: tokens, token_logprobs, top_logprobs (the n best plus the sampled
    token, as OpenAI returns up to logprobs + 1), text_offset (each token's text counted from
    `offset`, the length of the tokens before it)."""
    tokens = [self.service.decode([t]) for t in ids]
    offsets, pos = [], offset
    for t in tokens:
      offsets.append(pos)
      pos += len(t)
    top_dicts = []
    for t, lp, top in zip(tokens, logprobs, tops):
      d: dict[str, float] = {}
      for text, value in [(self.service.decode([a]), b) for a, b in top] + [(t, lp)]:
        d.setdefault(text, value)  # tokens that read alike (parts of a character) keep the best
      top_dicts.append(d)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top_dicts,
            "text_offset": offsets}

  def _chat_logprobs(self, ids, logprobs, tops) -> list[dict]:
    tok = self.service.tokenizer

    def entry(t, lp):
      return {"token": self.service.decode([t]), "logprob": lp,
              "bytes": list(tok.token_bytes(t))}
    return [dict(entry(t, lp), top_logprobs=[entry(a, b) for a, b in top])
            for t, lp, top in zip(ids, logprobs, tops)]

  @staticmethod
  def _tops(r, n: int) -> list:
    return r.top_logprobs[:n] if r.top_logprobs else [[] for _ in range(n)]

  # -- whole responses ----------------------------------------------------------------

  async def _run(self, prompt: list[int], ask: Ask):
    """n samples run concurrently (`_seeded`); one failure cancels the others."""
    tasks = [asyncio.ensure_future(self.service.generate(prompt, self._seeded(ask.sampling, i)))
             for i in range(ask.n)]
    try:
      return await asyncio.gather(*tasks)  # GenerationFailed of a failed one, a 500
    except BaseException:
      for t in tasks:
        t.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)
      raise

  def _choice_text(self, r, sampling: SamplingParams) -> tuple[str, str, int]:
    """(text, finish_reason, how many output tokens the text covers)."""
    ids = r.output_ids
    if r.finish_reason == "stop" and ids and ids[-1] in sampling.stop_token_ids:
      ids = ids[:-1]  # the end-of-turn token is not part of the text
    text, hit = truncate_at_stop(self.service.decode(ids), sampling.stop)
    covered = len(ids)
    if hit:
      tokens = TokenText(self.service.tokenizer)
      tokens.add(ids)
      covered = tokens.covering(len(text))
    reason = "stop" if hit or r.finish_reason == "stop" else "length"
    return text, reason, covered

  async def _prompt_ids(self, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
      prompt = prompt[0]  # a batch of one, as clients send it
    if isinstance(prompt, str):
      if not prompt:
        raise BadRequest("'prompt' is empty")
      return await self.service.tokenize(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                   for t in prompt):
      return prompt
    raise BadRequest("'prompt' must be a non-empty string or a list of token ids (one prompt "
                     "per request)")

  async def _chat_ids(self, body: dict) -> list[int]:
    messages = body.get("messages")
    if (not isinstance(messages, list) or not messages or
        not all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                isinstance(m.get("content"), str) for m in messages)):
      raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    if self.service.tokenizer is None:
      raise BadRequest("this server has no tokenizer; chat needs one")
    try:
      text = self.service.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except AsearcherError:
      raise
    except Exception as e:  # noqa: BLE001 -- the template's raise_exception or a render error
      raise BadRequest(f"the chat template refused the messages: {e}") from None
    return await self.service.tokenize(text)

  async def completions(self, request: web.Request) -> web.StreamResponse:
    body = await self._json(request)
    ids = await self._prompt_ids(body)
    ask = self._ask(body, chat=False)
    if ask.stream:
      return await self._stream(request, ids, ask, chat=False)
    results = await self._run(ids, ask)
    choices = []
    for i, r in enumerate(results):
      text, reason, covered = self._choice_text(r, ask.sampling)
      choice = {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
      if ask.logprobs is not None:
        choice["logprobs"] = self._completion_logprobs(
            r.output_ids[:covered], r.logprobs[:covered], self._tops(r, covered), 0)
      choices.append(choice)
    return web.json_response(self._envelope("text_completion", choices, len(ids), results))

  async def chat_completions(self, request: web.Request) -> web.StreamResponse:
    body = await self._json(request)
    ids = await self._chat_ids(body)
    ask = self._ask(body, chat=True)
    if ask.stream:
      return await self._stream(request, ids, ask, chat=True)
    results = await self._run(ids, ask)
    choices = []
    for i, r in enumerate(results):
      content, reason, covered = self._choice_text(r, ask.sampling)
      choice = {"index": i, "message": {"role": "assistant", "content": content},
                "finish_reason": reason, "logprobs": None}
      if ask.logprobs is not None:
        choice["logprobs"] = {"content": self._chat_logprobs(
            r.output_ids[:covered], r.logprobs[:covered], self._tops(r, covered))}
      choices.append(choice)
    return web.json_response(self._envelope("chat.completion", choices, len(ids), results))

  def _head(self, kind: str) -> dict:
    return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": kind, "created": int(time.time()), "model": self.service.model_name}

  @staticmethod
  def _usage(prompt_tokens: int, completion: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}

  def _envelope(self, kind: str, choices, prompt_tokens: int, results) -> dict:
    completion = sum(len(r.output_ids) for r in results)
    return {**self._head(kind), "choices": choices,
            "usage": self._usage(prompt_tokens, completion),
            "system_fingerprint":
                f"version-{results[0].versions[-1] if results[0].versions else 0}"}

  # -- streams ------------------------------------------------------------------------

  async def _stream(self, request: web.Request, prompt: list[int], ask: Ask,
                    chat: bool) -> web.StreamResponse:
    """Server-Sent Events: one chunk per batch of new tokens per choice, a last chunk with each
    choice's finish_reason, the usage chunk if asked, then [DONE]. A request refused before
    any token (queue full, bad input) is an ordinary JSON error, not a stream."""
    events: asyncio.Queue = asyncio.Queue()
    stop_ids = set(ask.sampling.stop_token_ids)

    async def one(i: int) -> None:
      tokens = TokenText(self.service.tokenizer, per_token=ask.logprobs is not None)
      scan, sent, request_ = StopScanner(ask.sampling.stop), 0, None
      # Log-probs wait with the text the scanner holds back: (ids, logprobs, tops) of the
      # tokens not reported yet, and the text_offset the next one starts at.
      held: tuple[list, list, list] = ([], [], [])
      reported, offset = 0, 0

      def due(upto: int):
        nonlocal reported, offset
        n, reported = upto - reported, upto
        if ask.logprobs is None or n <= 0:
          return None
        ids, lp, top = (x[:n] for x in held)
        for x in held:
          del x[:n]
        if chat:
          return self._chat_logprobs(ids, lp, top)
        out = self._completion_logprobs(ids, lp, top, offset)
        offset += sum(len(t) for t in out["tokens"])
        return out

      try:
        async with contextlib.aclosing(self.service.stream(
            prompt, self._seeded(ask.sampling, i))) as stream:
          async for request_, chunk in stream:
            keep = [j for j, t in enumerate(chunk.ids) if t not in stop_ids]
            ids = [chunk.ids[j] for j in keep]
            text, hit = scan.feed(tokens.add(ids))
            sent += len(text)
            if ask.logprobs is not None:
              held[0].extend(ids)
              held[1].extend(chunk.logprobs[j] for j in keep)
              held[2].extend(chunk.top[j] if chunk.top else [] for j in keep)
            lps = due(tokens.covering(sent))
            if text or lps:
              await events.put((i, text, lps, None))
            if hit:
              await events.put((i, "", None, "stop"))
              return
        text, hit = scan.feed(tokens.flush(), final=True)
        lps = due(tokens.covering(sent + len(text)) if hit else len(tokens.starts))
        if text or lps:
          await events.put((i, text, lps, None))
        reason = "stop" if hit or (request_ and request_.finish_reason == "stop") else "length"
        await events.put((i, "", None, reason))
      except Exception as e:  # noqa: BLE001 -- handed to the writer, which answers it
        await events.put((i, e, None, "error"))
      finally:
        if request_ is not None:
          await events.put(("done", len(request_.output_ids)))

    kind = "chat.completion.chunk" if chat else "text_completion"
    head = self._head(kind)
    tasks = [asyncio.ensure_future(one(i)) for i in range(ask.n)]
    response: web.StreamResponse | None = None
    finished, generated, started = 0, 0, set()
    try:
      while finished < ask.n:
        event = await events.get()
        if event[0] == "done":
          generated += event[1]
          continue
        i, text, lps, reason = event
        if reason == "error":
          if response is None:
            raise text  # nothing sent yet: an ordinary error response
          await self._send(response, {"error": {"message": f"{type(text).__name__}: {text}",
                                                "type": "server_error", "code": 500}})
          return response
        if response is None:
          response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                 "Cache-Control": "no-cache"})
          await response.prepare(request)
        if chat:
          delta = {"content": text} if text or reason is None else {}
          if i not in started:
            delta = {"role": "assistant", **delta, "content": text}
          choice = {"index": i, "delta": delta,
                    "logprobs": {"content": lps} if lps else None, "finish_reason": reason}
        else:
          choice = {"index": i, "text": text, "logprobs": lps, "finish_reason": reason}
        started.add(i)
        await self._send(response, {**head, "choices": [choice]})
        finished += reason is not None
      # Every choice finished; the `done` counts arrive right after each finish.
      await asyncio.gather(*tasks)
      while not events.empty():
        event = events.get_nowait()
        if event[0] == "done":
          generated += event[1]
      if ask.include_usage:
        await self._send(response, {**head, "choices": [],
                                    "usage": self._usage(len(prompt), generated)})
      await response.write(b"data: [DONE]\n\n")
      await response.write_eof()
      return response
    finally:
      for t in tasks:
        t.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)

  @staticmethod
  async def _send(response: web.StreamResponse, obj: dict) -> None:
    await response.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

  # -- the rest -----------------------------------------------------------------------

  def _model_card(self) -> dict:
    return {"id": self.service.model_name, "object": "model", "created": 0,
            "owned_by": "asearcher"}

  async def models(self, request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [self._model_card()]})

  async def model(self, request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name != self.service.model_name:
      raise UnknownModel(f"The model {name!r} does not exist")
    return web.json_response(self._model_card())

  async def health(self, request: web.Request) -> web.Response:
    live = self.service.driver.live
    return web.json_response({"live": live, "version": self.service.driver.version},
                             status=200 if live else 503)

  async def metrics_text(self, request: web.Request) -> web.Response:
    if self.metrics is None:
      return _error(404, "metrics are disabled")
    body = self.metrics.render(self.service.driver.stats())
    return web.Response(body=body, content_type="text/plain", charset="utf-8")
