"""Rewards and evaluation metrics: EM / cover-EM / token F1 with ASearcher's paraphrase blend,
the format gate and "invalid question" penalty, and an LLM judge on any OpenAI-compatible
endpoint. `Scorer` combines them under a `RewardSection`."""

from __future__ import annotations

from asearcher_jax.reward.config import JudgeSection, RewardSection
from asearcher_jax.reward.judge import Judge, JudgeVerdict, load_prompt, parse_verdict
from asearcher_jax.reward.qa_metrics import (
    cover_exact_match,
    exact_match,
    f1,
    normalize_answer,
    paraphrase_blend,
    tokens,
)
from asearcher_jax.reward.scorer import (
    Score,
    Scorer,
    format_ok,
    format_violations,
    invalid_answer,
)

__all__ = [
    "Judge", "JudgeSection", "JudgeVerdict", "RewardSection", "Score", "Scorer",
    "cover_exact_match", "exact_match", "f1", "format_ok", "format_violations", "invalid_answer",
    "load_prompt", "normalize_answer", "paraphrase_blend", "parse_verdict", "tokens",
]
