"""The agent's config section (`agent:`): prompt, turn and context budgets, sampling, reading."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asearcher_jax.section import Section


class AgentSection(Section):
  """ASearcher's agent. `variant: base` keeps one growing context (the base-model prompt, tool
  output spliced in as <information>); `variant: reasoning` builds a fresh prompt each turn from
  a bounded history of the agent's own notes (the QwQ-style agent for reasoning models)."""


  variant: Literal["base", "reasoning"] = "base"
  # A packaged prompt (asearcher, asearcher_search_only; with template chat, asearcher means
  # asearcher_chat; the reasoning variant uses reasoning_act) or a prompt file of that shape.
  prompt: str = "asearcher"
  # plain: the prompt is raw text (base models); chat: the tokenizer's chat template wraps the
  # prompt and each tool observation is a user message (chat and reasoning models).
  template: Literal["plain", "chat"] = "plain"
  max_turns: int = Field(32, ge=1)  # LLM calls per episode, reading turns included
  max_new_tokens: int = Field(1024, ge=1)  # per turn
  max_context_tokens: int = Field(32768, ge=16)  # prompt + generation; beyond: context_full
  max_wall_s: float | None = Field(None, gt=0)  # per episode; beyond: timeout
  max_tool_errors: int = Field(3, ge=1)  # consecutive failed tool calls end the episode
  temperature: float = Field(1.0, ge=0)
  top_p: float = Field(1.0, gt=0, le=1)
  top_k: int = Field(0, ge=0)
  topk: int | None = Field(None, ge=1)  # search results per query; None: search.topk
  read_pages: bool = True  # read accessed pages one chunk per turn
  stub_chars: int = Field(100, ge=0)  # a read chunk is replaced by its first stub_chars
  # With this probability a training prompt says "the question is valid" instead of offering
  # "the question is invalid" as an answer; invalid-style answers then score reward.invalid_penalty.
  valid_instruction_ratio: float = Field(0.0, ge=0, le=1)
  # reasoning variant
  history_chars: int = Field(25_000, ge=0)  # the tail of the notes history each prompt shows
  answer_after_acts: int = Field(0, ge=0)  # answers are allowed only after this many acts
