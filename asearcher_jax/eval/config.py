"""The evaluation section (`eval:`): which model endpoint, datasets, k, concurrency, outputs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asearcher_jax.section import Section


class EvalSection(Section):

  data: tuple[str, ...] = ()  # QA files (any loader format) or TFDS dataset directories
  split: str = "test"  # for TFDS directories
  k: int = Field(4, ge=1)  # samples per question: Avg@k and Pass@k
  limit: int | None = Field(None, ge=1)  # questions per dataset
  sample: bool = False  # with `limit`: a seeded (eval.seed) random subset, not the first ones
  concurrency: int = Field(16, ge=1)  # episodes in flight
  out_dir: str | None = None  # default <run.output_dir>/eval
  seed: int = 0  # sample i of question q uses a seed derived from (seed, q, i)
  # Sampling temperature of evaluation episodes; None: agent.temperature, the one rollouts use.
  # ASearcher samples rollouts at 1.0 and evaluates at 0.6 (its evaluation scripts).
  temperature: float | None = Field(None, ge=0)
  judge: bool = False  # also score with reward.judge (LLM-as-judge), reported as metric "judge"
  save_trajectories: bool = False  # full token records beside the readable traces
  backend: Literal["decode", "openai"] = "decode"
  decode_address: str | None = None  # default 127.0.0.1:<serve.grpc_port>
  tokenizer: str | None = None  # default: model.path's tokenizer
  openai_base_url: str = "http://127.0.0.1:8000/v1"
  openai_model: str | None = None  # None: the endpoint's first model
  openai_chat: bool = False  # /chat/completions (chat-only models) instead of /completions
  api_key_env: str = "OPENAI_API_KEY"
  request_timeout_s: float = Field(600.0, gt=0)
