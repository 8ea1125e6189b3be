"""gRPC fronts: JetStream's Orchestrator (Decode, HealthCheck) and the RL Decode service.

Bad input is INVALID_ARGUMENT with a message that says what is wrong, a full
queue is RESOURCE_EXHAUSTED, and neither disturbs the other requests. When a
token is configured every call but JetStream's HealthCheck must carry
`authorization: Bearer <token>`, checked before the request is read.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import grpc

from asearcher_jax.auth import bind_grpc, grpc_auth_interceptor
from asearcher_jax.errors import AsearcherError
from asearcher_jax.inference.protocol import GenerationFailed, QueueFullError, SamplingParams
from asearcher_jax.inference.protos import (
  decode_pb2,
  decode_pb2_grpc,
  jetstream_pb2,
  jetstream_pb2_grpc,
)
from asearcher_jax.inference.service import DecodeService, IncrementalDetokenizer


def _guarded(stream: bool = False):
  """Maps our errors onto gRPC status codes (the token is checked before: build_grpc_server)."""

  def wrap(fn):
    async def fail(context, e):
      code = (grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(e, QueueFullError)
              else grpc.StatusCode.INTERNAL if isinstance(e, GenerationFailed)
              else grpc.StatusCode.INVALID_ARGUMENT)
      await context.abort(code, str(e))

    if stream:
      @functools.wraps(fn)
      async def gen(self, request, context):
        try:
          async for item in fn(self, request, context):
            yield item
        except (ValueError, QueueFullError, GenerationFailed, AsearcherError) as e:
          await fail(context, e)
      return gen

    @functools.wraps(fn)
    async def unary(self, request, context):
      try:
        return await fn(self, request, context)
      except (ValueError, QueueFullError, GenerationFailed, AsearcherError) as e:
        await fail(context, e)
    return unary

  return wrap


def sampling_from_proto(p: decode_pb2.SamplingParams) -> SamplingParams:
  return SamplingParams(
      temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k,
      seed=p.seed if p.HasField("seed") else None, max_new_tokens=p.max_new_tokens or None,
      stop_token_ids=tuple(p.stop_token_ids), stop=tuple(p.stop))


def response_from_request(r) -> decode_pb2.GenerateResponse:
  done = r.finished_at or time.monotonic()
  ttft = (r.first_token_at - r.submitted_at) if r.first_token_at else 0.0
  return decode_pb2.GenerateResponse(
      request_id=r.request_id, output_ids=r.output_ids, logprobs=r.logprobs, versions=r.versions,
      finish_reason=r.finish_reason or "", cached_tokens=r.cached_tokens,
      prefilled_tokens=r.prefilled_tokens, interruptions=r.interruptions, ttft_s=ttft,
      latency_s=done - r.submitted_at)


class RLDecodeServicer(decode_pb2_grpc.DecodeServicer):
  def __init__(self, service: DecodeService):
    self.service = service

  @_guarded()
  async def Generate(self, request, context):
    r = await self.service.generate(list(request.prompt_ids), sampling_from_proto(request.sampling),
                                    session_id=request.session_id, request_id=request.request_id)
    return response_from_request(r)

  @_guarded(stream=True)
  async def GenerateStream(self, request, context):
    r = None
    async for r, chunk in self.service.stream(list(request.prompt_ids),
                                              sampling_from_proto(request.sampling),
                                              session_id=request.session_id,
                                              request_id=request.request_id):
      yield decode_pb2.GenerateResponse(request_id=r.request_id, output_ids=chunk.ids,
                                        logprobs=chunk.logprobs, versions=chunk.versions)
    if r is not None:
      final = response_from_request(r)
      del final.output_ids[:], final.logprobs[:], final.versions[:]
      yield final

  @_guarded()
  async def UpdateWeights(self, request, context):
    source = request.orbax_dir or request.hf_dir
    if not source:
      raise ValueError("UpdateWeights needs a source: orbax_dir or hf_dir")
    step = request.orbax_step if request.HasField("orbax_step") else None
    out = await self.service.update_weights(request.version, source, step=step,
                                            mode=request.mode or None)
    return decode_pb2.UpdateWeightsResponse(version=out["version"], interrupted=out["interrupted"],
                                            load_s=out["load_s"], commit_s=out["commit_s"])

  @_guarded()
  async def Pause(self, request, context):
    await self.service.call(self.service.driver.pause)
    return self._state()

  @_guarded()
  async def Resume(self, request, context):
    await self.service.call(self.service.driver.resume)
    return self._state()

  @_guarded()
  async def EndSession(self, request, context):
    existed = await self.service.call(self.service.driver.end_session, request.session_id)
    return decode_pb2.EndSessionResponse(existed=existed)

  @_guarded()
  async def Stats(self, request, context):
    s = self.service.driver.stats()
    return decode_pb2.StatsResponse(**{f.name: getattr(s, f.name)
                                       for f in decode_pb2.StatsResponse.DESCRIPTOR.fields})

  def _state(self):
    s = self.service.driver.stats()
    return decode_pb2.ServerState(paused=s.paused, version=s.version)


class OrchestratorServicer(jetstream_pb2_grpc.OrchestratorServicer):
  """JetStream's wire protocol: text or token ids in, streamed samples out (greedy by default)."""

  def __init__(self, service: DecodeService):
    self.service = service

  @_guarded(stream=True)
  async def Decode(self, request, context):
    which = request.WhichOneof("content")
    if which == "text_content":
      prompt = await self.service.tokenize(request.text_content.text)
    elif which == "token_content":
      prompt = list(request.token_content.token_ids)
    else:
      raise ValueError("DecodeRequest needs text_content or token_content")
    sampling = SamplingParams(temperature=0.0, stop_token_ids=self.service.default_stop_ids)
    if request.max_tokens <= 0:
      # JetStream ends a sample whose length exceeds max_tokens before sending its token
      # (token_utils.process_result_tokens: complete |= slot_lengths > slot_max_length), so
      # max_tokens 0, proto3's default, answers no token. The prompt is still checked.
      self.service.driver.validate(prompt, sampling, request.session_cache or None)
      return
    sampling = dataclasses.replace(sampling, max_new_tokens=request.max_tokens)
    detok = IncrementalDetokenizer(self.service.tokenizer) if self.service.tokenizer else None
    stops = set(sampling.stop_token_ids)
    async for _, chunk in self.service.stream(prompt, sampling,
                                              session_id=request.session_cache or None):
      # JetStream sends the stop token's id as the sample's last, with no text (since its
      # PR #108, "return the actual eos token"): clients count output tokens by token_ids.
      ids = chunk.ids
      if not ids:
        continue
      text = detok.add([t for t in ids if t not in stops]) if detok else ""
      sample = jetstream_pb2.DecodeResponse.StreamContent.Sample(text=text, token_ids=ids)
      yield jetstream_pb2.DecodeResponse(
          stream_content=jetstream_pb2.DecodeResponse.StreamContent(samples=[sample]))
    rest = detok.flush() if detok else ""
    if rest:
      sample = jetstream_pb2.DecodeResponse.StreamContent.Sample(text=rest)
      yield jetstream_pb2.DecodeResponse(
          stream_content=jetstream_pb2.DecodeResponse.StreamContent(samples=[sample]))

  async def HealthCheck(self, request, context):
    return jetstream_pb2.HealthCheckResponse(is_live=self.service.driver.live)


def build_grpc_server(service: DecodeService, host: str, port: int,
                      token: str | None) -> tuple[grpc.aio.Server, int]:
  """An aio server with both services; returns it (not started) and the bound port."""
  # HealthCheck answers anyone, as JetStream's does: load balancers probe it without a token.
  health = "/{}/HealthCheck".format(
      jetstream_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name)
  # so_reuseport off: a port another server holds is an error, not silently shared traffic.
  server = grpc.aio.server(interceptors=[grpc_auth_interceptor(token, (health,))],
                           options=[("grpc.max_send_message_length", 64 << 20),
                                    ("grpc.max_receive_message_length", 64 << 20),
                                    ("grpc.so_reuseport", 0)])
  decode_pb2_grpc.add_DecodeServicer_to_server(RLDecodeServicer(service), server)
  jetstream_pb2_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(service), server)
  return server, bind_grpc(server, host, port)
