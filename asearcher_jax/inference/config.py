"""A decode server's section of the run config (`serve:`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from asearcher_jax.section import Section


class ServeSection(Section):
  """A decode server: slots, lengths, sessions, weight-update mode and where it listens."""

  host: str = "127.0.0.1"
  grpc_port: int = Field(50051, ge=0, le=65535)  # 0: any free port
  http_port: int | None = Field(8000, ge=0, le=65535)  # OpenAI-compatible; null disables
  token: str | None = None  # bearer token; falls back to $ASEARCHER_TOKEN; required off loopback
  model_name: str | None = None  # reported by /v1/models; defaults to the run name
  slots: int = Field(8, gt=0)
  max_len: int = Field(4096, ge=2)
  min_prefill_bucket: int = Field(16, gt=0)
  max_pending: int = Field(1024, gt=0)
  # The slots' and device sessions' keys and values live in a pool of pages
  # (models/paged_kv.py) that the driver hands out as sequences grow. null: (slots +
  # device_sessions) x max_len / page_size pages, so every slot and every kept session can
  # reach max_len at once; fewer pages hold more slots in the same memory: when the pool runs
  # out, sessions move to host memory first, then the newest request is preempted
  # (re-prefilled later), never lost. At least one whole sequence (max_len / page_size pages).
  # A prompt (or a session's new tokens) longer than this is prefilled this many tokens at a
  # time, between decode steps, so the slots already decoding never wait for a whole long
  # prefill; null: in one piece.
  prefill_chunk: int | None = Field(512, gt=0)
  # The most tokens one batched prefill computes (rows padded to a power of two, times the
  # longest row's bucket), like vLLM's max_num_batched_tokens: fresh prompts or session turns
  # past it wait for the next loop, so a burst of requests (every slot at a rollout's start,
  # every episode's tool output at once) cannot take the device's memory in one call; a request
  # alone always runs. `asearcher plan` counts this batch. null: no bound.
  prefill_tokens: int | None = Field(8192, gt=0)
  page_size: int = Field(16, gt=0)
  kv_pages: int | None = Field(None, gt=0)
  # Decode attention over the pages: "xla" gathers every slot's first positions up to the
  # longest live one (any platform); "pallas" is the Pallas paged-attention kernel of the GPU or
  # the TPU, which reads each slot's live pages alone (GPUs and TPUs only).
  paged_attention: Literal["xla", "pallas"] = "xla"
  # "int8": weight-only int8 serving (models/quant.py). Every matmul weight is held as int8 with
  # a float32 scale per output channel, quantized at load and at every weight swap from the
  # float weights the learner publishes: a decode step reads half the weight bytes of bfloat16.
  # The rollouts then come from the int8 policy; the learner's decoupled objective weighs each
  # token by its recorded sampling log-prob, and logs the train-inference gap it leaves.
  # "none": float weights (placement.decode_param_dtype).
  quantization: Literal["none", "int8"] = "none"
  # Tokens every slot generates per device dispatch in steady decode (one device loop, one
  # host sync per block); 1 while requests wait for a slot, so admission is never held back.
  # null: 8 on accelerators; 1 on CPU, where host and "device" share the cores and blocks
  # measured no faster (benchmarks/decode.py).
  decode_steps: int | None = Field(None, ge=1)
  device_sessions: int = Field(16, ge=0)
  host_sessions: int = Field(256, ge=0)
  update_mode: Literal["abort", "keep_kv"] = "abort"
  warmup: bool = False  # compile every prefill bucket and attention window before serving
  # Also the programs of requests that ask for the most likely tokens (OpenAI logprobs=N,
  # top_logprobs): twice the compiles, for a server that answers such requests.
  warmup_top_logprobs: bool = False
  # Folders UpdateWeights may load from (symlinks resolved); anything else is refused without
  # saying whether it exists. Empty: the run's published weights (placement.weights_dir, else
  # <run.output_dir>/weights).
  weight_roots: tuple[str, ...] = ()
  max_body_bytes: int = Field(16 << 20, ge=1024)  # an HTTP request body; larger is a 400

  @model_validator(mode="after")
  def _pool_holds_a_sequence(self):
    size = self.page_size
    if self.paged_attention == "pallas" and (size < 16 or size & (size - 1)):
      raise ValueError(f"serve.paged_attention=pallas needs serve.page_size a power of two "
                       f">= 16 (the kernel's key blocks), got {size}")
    if self.kv_pages is not None and self.kv_pages < self.sequence_pages():
      raise ValueError(f"serve.kv_pages {self.kv_pages} cannot hold one sequence of max_len "
                       f"{self.max_len} ({self.sequence_pages()} pages of "
                       f"{self.page_size} tokens)")
    return self

  def pool_pages(self) -> int:
    """Pages in the KV pool (not counting the sink)."""
    if self.kv_pages is not None:
      return self.kv_pages
    return (self.slots + self.device_sessions) * self.sequence_pages()

  def sequence_pages(self) -> int:
    """Pages one sequence of max_len fills."""
    return -(-self.max_len // self.page_size)

  def steps_per_dispatch(self, platform: str) -> int:
    """`decode_steps`, or its default for `platform` (a JAX backend name)."""
    if self.decode_steps is not None:
      return self.decode_steps
    return 1 if platform == "cpu" else 8
