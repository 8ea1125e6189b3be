"""Config sections of the reward (`reward`, with the LLM judge under `reward.judge`); frozen,
and unknown keys are errors so a typo in YAML never passes silently."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asearcher_jax.section import Section


class EndpointSection(Section):
  """An OpenAI-compatible `/chat/completions` endpoint and how to talk to it (what
  `reward.judge.OpenAIChat` reads). The defaults are the judge's; `synth.llm` overrides some."""


  base_url: str = "http://127.0.0.1:8000/v1"
  model: str | None = None  # None: the first model the endpoint lists under /models
  api_key_env: str = "OPENAI_API_KEY"  # sent as a bearer token when set
  temperature: float = Field(0.6, ge=0.0)
  top_p: float = Field(0.95, gt=0.0, le=1.0)
  max_tokens: int = Field(1024, ge=1)
  max_retries: int = Field(3, ge=0)  # after the first attempt; also for unparseable replies
  backoff_s: float = Field(1.0, ge=0.0)  # doubled per retry, jittered
  max_backoff_s: float = Field(16.0, ge=0.0)
  timeout_s: float = Field(60.0, gt=0.0)  # per request
  concurrency: int = Field(16, ge=1)  # requests in flight per client


class JudgeSection(EndpointSection):
  """An LLM judge behind any OpenAI-compatible `/chat/completions` endpoint. Defaults follow
  ASearcher's evaluation (T 0.6, top-p 0.95, <= 1024 tokens, prediction cut to 500 chars)."""

  prompt_file: str | None = None  # None: the packaged prompts/judge.txt
  max_pred_chars: int = Field(500, ge=1)


class RewardSection(Section):
  """How a finished trajectory is scored (ASearcher defaults: set-F1, 0.3 paraphrase weight,
  multiplicative format gate, -0.5 for "the question is invalid" under the valid prompt)."""


  metric: Literal["f1", "em", "cem", "judge"] = "f1"
  f1_variant: Literal["set", "bag"] = "set"
  # Answer normalisation of every text metric: "squad", the official SQuAD v1.1 script's, as
  # published scores use; "lenient" also strips Unicode punctuation, splits CJK per character
  # and reads True/False as yes/no (reward/qa_metrics.py). Eval reports record it.
  normalization: Literal["squad", "lenient"] = "squad"
  aug_weight: float = Field(0.3, ge=0.0, le=1.0)  # weight of paraphrased answers
  format_gate: bool = True  # reward 0 unless every generation is well formed
  invalid_penalty: float | None = -0.5  # None: no penalty
  judge: JudgeSection = JudgeSection()
