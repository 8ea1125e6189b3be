"""A decode server process: policy + engine + driver behind gRPC and OpenAI-compatible HTTP.

Binds 127.0.0.1 unless told otherwise; any other address requires a bearer token.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import jax
from aiohttp import web

from asearcher_jax import auth
from asearcher_jax.background import BackgroundServer
from asearcher_jax.config import Config
from asearcher_jax.inference.driver import Driver
from asearcher_jax.inference.engine import Engine
from asearcher_jax.inference.grpc_server import build_grpc_server
from asearcher_jax.inference.http_server import OpenAIServer
from asearcher_jax.inference.prometheus import DecodeMetrics
from asearcher_jax.inference.service import DecodeService
from asearcher_jax.models import paged_kv

log = logging.getLogger(__name__)


def require_token(host: str, token: str | None) -> str | None:
  """The decode server's token (config, else $ASEARCHER_TOKEN); refuses a non-loopback host
  without one."""
  return auth.server_token(host, token, "set serve.token or $ASEARCHER_TOKEN")


class DecodeServer(BackgroundServer):
  """gRPC (RL Decode + JetStream Orchestrator) and HTTP fronts over one driver."""

  _thread_name = "decode-server"

  def __init__(self, driver: Driver, tokenizer=None, *, host: str = "127.0.0.1",
               grpc_port: int = 0, http_port: int | None = 0, token: str | None = None,
               model_name: str = "policy", default_stop_ids: tuple[int, ...] = (),
               weight_roots: tuple[str, ...] | None = None, max_body_bytes: int = 16 << 20):
    self.token = require_token(host, token)
    self.max_body_bytes = max_body_bytes
    self.host, self.grpc_port, self.http_port = host, grpc_port, http_port
    self.metrics = driver.metrics
    self.driver = driver
    self.service = DecodeService(driver, tokenizer, model_name, default_stop_ids, weight_roots)
    self._grpc = None
    self._runner: web.AppRunner | None = None

  async def start(self) -> None:
    if not self.driver.live:
      self.driver.start()
    self._grpc, self.grpc_port = build_grpc_server(self.service, self.host, self.grpc_port,
                                                   self.token)
    await self._grpc.start()
    if self.http_port is not None:
      app = OpenAIServer(self.service, self.token, self.metrics, self.max_body_bytes).app()
      # handler_cancellation: a client that hangs up cancels its request and frees the slot
      self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
      await self._runner.setup()
      site = web.TCPSite(self._runner, self.host, self.http_port)
      await site.start()
      self.http_port = self._runner.addresses[0][1]
    log.info("decode server: grpc %s:%d, http %s", self.host, self.grpc_port,
             auth.host_port(self.host, self.http_port) if self.http_port is not None else "off")

  async def stop(self) -> None:
    if self._runner is not None:
      await self._runner.cleanup()
    if self._grpc is not None:
      await self._grpc.stop(grace=1.0)
    self.driver.stop()

  async def serve_forever(self) -> None:
    await self.start()
    self._stopped = asyncio.Event()
    try:
      await self._stopped.wait()
    finally:
      await self.stop()

  @property
  def grpc_address(self) -> str:
    return auth.host_port(self.host, self.grpc_port)

  @property
  def http_address(self) -> str:
    return f"http://{auth.host_port(self.host, self.http_port)}"


def build_server(cfg: Config, *, progress: bool = True) -> DecodeServer:
  """The server a config describes: policy from model.path (or a random model.arch)."""
  from asearcher_jax.models.pretrained import load_policy
  from asearcher_jax.placement import serving_param_dtype
  from asearcher_jax.sharding import make_mesh
  s = cfg.serve
  token = require_token(s.host, s.token)  # fail before loading a model
  kernel = paged_kv.platform_kernel(s.paged_attention, jax.default_backend())  # before loading
  mesh = make_mesh(cfg.mesh.shape())
  # Decoding runs no backward pass, so what it would recompute there does not matter.
  served = cfg.model.model_copy(update={
      "remat": "none", "param_dtype": serving_param_dtype(cfg, jax.default_backend())})
  model, tokenizer, arch = load_policy(served, mesh, progress=progress)
  stop_ids = set(tokenizer.eos_ids if tokenizer is not None else ())
  eos = arch.eos_token_id
  stop_ids.update(eos if isinstance(eos, tuple) else (() if eos is None else (eos,)))
  engine = Engine(model, slots=s.slots, max_len=s.max_len, mesh=mesh,
                  min_prefill_bucket=s.min_prefill_bucket,
                  decode_steps=s.steps_per_dispatch(jax.default_backend()),
                  page_size=s.page_size, num_pages=s.pool_pages(), paged_kernel=kernel,
                  quantization=s.quantization)
  if s.warmup:
    t0 = time.perf_counter()
    n = engine.warmup(s.prefill_chunk, s.prefill_tokens, top_logprobs=s.warmup_top_logprobs)
    log.info("compiled %d decode programs in %.1fs", n, time.perf_counter() - t0)
  driver = Driver(engine, tokenizer=tokenizer, max_pending=s.max_pending,
                  prefill_chunk=s.prefill_chunk, prefill_tokens=s.prefill_tokens,
                  device_sessions=s.device_sessions, host_sessions=s.host_sessions,
                  update_mode=s.update_mode, metrics=DecodeMetrics())
  return DecodeServer(driver, tokenizer, host=s.host, grpc_port=s.grpc_port,
                      http_port=s.http_port, token=token,
                      model_name=s.model_name or cfg.run.name,
                      default_stop_ids=tuple(sorted(stop_ids)),
                      max_body_bytes=s.max_body_bytes, weight_roots=s.weight_roots or (
                          cfg.placement.weights_dir or os.path.join(cfg.run.output_dir,
                                                                    "weights"),))
