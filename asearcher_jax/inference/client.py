"""asyncio client of the RL decode service, as the agent and the learner use it."""

from __future__ import annotations

import dataclasses
from typing import AsyncIterator

import grpc

from asearcher_jax.inference.protocol import QueueFullError, SamplingParams
from asearcher_jax.inference.protos import decode_pb2, decode_pb2_grpc


@dataclasses.dataclass
class GenerateResult:
  request_id: str
  output_ids: list[int]
  logprobs: list[float]
  versions: list[int]
  finish_reason: str
  cached_tokens: int = 0
  prefilled_tokens: int = 0
  interruptions: int = 0
  ttft_s: float = 0.0
  latency_s: float = 0.0

  @classmethod
  def from_proto(cls, p: decode_pb2.GenerateResponse) -> "GenerateResult":
    return cls(p.request_id, list(p.output_ids), list(p.logprobs), list(p.versions),
               p.finish_reason, p.cached_tokens, p.prefilled_tokens, p.interruptions, p.ttft_s,
               p.latency_s)


def sampling_to_proto(s: SamplingParams) -> decode_pb2.SamplingParams:
  p = decode_pb2.SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                max_new_tokens=s.max_new_tokens or 0,
                                stop_token_ids=list(s.stop_token_ids), stop=list(s.stop))
  if s.seed is not None:
    p.seed = s.seed
  return p


def _translate(e: grpc.aio.AioRpcError) -> Exception:
  if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
    return ValueError(e.details())
  if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
    return QueueFullError(e.details())
  return e


class DecodeClient:
  """One channel to one decode server. Use `async with DecodeClient(addr) as c: ...`."""

  def __init__(self, address: str, token: str | None = None, timeout: float | None = None):
    self.address = address
    self._metadata = (("authorization", f"Bearer {token}"),) if token else None
    self._timeout = timeout
    self._channel = grpc.aio.insecure_channel(address, options=[
        ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
    self._stub = decode_pb2_grpc.DecodeStub(self._channel)

  async def __aenter__(self) -> "DecodeClient":
    return self

  async def __aexit__(self, *exc) -> None:
    await self.close()

  async def close(self) -> None:
    await self._channel.close()

  async def _call(self, method, request, wait_for_ready: bool = False):
    try:
      return await method(request, metadata=self._metadata, timeout=self._timeout,
                          wait_for_ready=wait_for_ready)
    except grpc.aio.AioRpcError as e:
      raise _translate(e) from None

  async def generate(self, prompt_ids: list[int], sampling: SamplingParams | None = None, *,
                     session_id: str = "", request_id: str = "") -> GenerateResult:
    req = decode_pb2.GenerateRequest(request_id=request_id, prompt_ids=prompt_ids,
                                     session_id=session_id,
                                     sampling=sampling_to_proto(sampling or SamplingParams()))
    return GenerateResult.from_proto(await self._call(self._stub.Generate, req))

  async def stream(self, prompt_ids: list[int], sampling: SamplingParams | None = None, *,
                   session_id: str = "", request_id: str = "") -> AsyncIterator[GenerateResult]:
    """Yields partial results (new tokens only), then a final one with finish_reason set."""
    req = decode_pb2.GenerateRequest(request_id=request_id, prompt_ids=prompt_ids,
                                     session_id=session_id,
                                     sampling=sampling_to_proto(sampling or SamplingParams()))
    call = self._stub.GenerateStream(req, metadata=self._metadata, timeout=self._timeout)
    try:
      async for p in call:
        yield GenerateResult.from_proto(p)
    except grpc.aio.AioRpcError as e:
      raise _translate(e) from None
    finally:  # a caller that stops reading frees the server's slot at once, not at GC
      call.cancel()

  async def update_weights(self, version: int, *, orbax_dir: str | None = None,
                           hf_dir: str | None = None, step: int | None = None,
                           mode: str = "") -> decode_pb2.UpdateWeightsResponse:
    req = decode_pb2.UpdateWeightsRequest(version=version, mode=mode)
    if orbax_dir:
      req.orbax_dir = orbax_dir
    if hf_dir:
      req.hf_dir = hf_dir
    if step is not None:
      req.orbax_step = step
    return await self._call(self._stub.UpdateWeights, req)

  async def pause(self) -> decode_pb2.ServerState:
    return await self._call(self._stub.Pause, decode_pb2.PauseRequest())

  async def resume(self) -> decode_pb2.ServerState:
    return await self._call(self._stub.Resume, decode_pb2.ResumeRequest())

  async def end_session(self, session_id: str) -> bool:
    resp = await self._call(self._stub.EndSession, decode_pb2.EndSessionRequest(
        session_id=session_id))
    return resp.existed

  async def stats(self, wait_for_ready: bool = False) -> decode_pb2.StatsResponse:
    """`wait_for_ready`: a server still starting is waited for (up to the timeout)."""
    return await self._call(self._stub.Stats, decode_pb2.StatsRequest(), wait_for_ready)
