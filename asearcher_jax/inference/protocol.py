"""The decode servers' wire layer: what a client, the agent and the fronts exchange.

Kept free of JAX so that a rollout worker, an evaluation client or a config loader can import
it without paying for (or having) an accelerator stack; the engine and driver import it too.
"""

from __future__ import annotations

import dataclasses

# The most alternatives a request may ask log-probs of at each position (OpenAI's limit). The
# engine computes this many or none, so a step has two compiled variants, not twenty.
MAX_TOP_LOGPROBS = 20
# Every sampled token carries its policy version, an int32 on the wire (decode.proto): a version
# the wire cannot carry would break every reply from then on.
MAX_VERSION = 2**31 - 1
UPDATE_MODES = ("abort", "keep_kv")


def check_version(version: int) -> None:
  if not 0 <= version <= MAX_VERSION:
    raise ValueError(f"version must be in [0, {MAX_VERSION}] (an int32 on the wire), "
                     f"got {version}")


class QueueFullError(Exception):
  """The server is at capacity; retry later."""


class GenerationFailed(RuntimeError):
  """The decode loop failed this request (a device or prefill error): a stream raises it rather
  than end as if the request had finished."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """What a request asks for. temperature 0 is greedy; top_k 0 and top_p 1 disable truncation."""

  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  max_new_tokens: int | None = None  # None: until a stop or the server's max_len
  stop_token_ids: tuple[int, ...] = ()
  stop: tuple[str, ...] = ()
  top_logprobs: int = 0  # also report the n most likely tokens at each position, 0..20

  def validate(self, max_tokens_limit: int) -> None:
    if not 0.0 <= self.temperature <= 100.0:
      raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if self.seed is not None and not 0 <= self.seed < 2**64:
      raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
    if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= max_tokens_limit:
      raise ValueError(f"max_new_tokens must be in [1, {max_tokens_limit}], "
                       f"got {self.max_new_tokens}")
    if any(not s for s in self.stop):
      raise ValueError("stop strings must be non-empty")
    if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
      raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], "
                       f"got {self.top_logprobs}")


@dataclasses.dataclass
class Stats:
  """A decode server's state, as its GetStats RPC and /metrics report it."""

  version: int
  slots_total: int
  slots_in_use: int
  queue_depth: int
  paused: bool
  sessions_device: int
  sessions_host: int
  generated_tokens: int
  prefill_tokens: int
  reused_tokens: int
  requests_finished: int
  decode_steps: int
  decode_step_s: float  # median over the last 64 steps (one step's time swings with the host)
  tokens_per_s: float  # over the last few seconds
