"""ASearcher's trajectory reward: answer metric x format gate, with the "invalid question"
penalty, and the scorer that puts them together (and reports EM/CEM/F1/judge for evaluation).

Reward of a finished trajectory (ASearcher `ASearcherWorkflow.collect_agent_trajectory`):
1. no extracted answer -> 0;
2. the configured metric against the gold answers, blended with paraphrased (aug) answers for
   the text metrics, or the LLM judge's verdict as 1/0;
3. times the format gate (`format_ok` over every LLM generation of the trajectory);
4. replaced by `invalid_penalty` (-0.5) when the prompt carried the "the question is valid"
   instruction and the answer still calls the question invalid (`invalid_answer`) -- applied
   after the gate, as upstream, so a malformed "invalid" answer is penalised too.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from asearcher_jax.reward.config import RewardSection
from asearcher_jax.reward.judge import Judge, JudgeVerdict
from asearcher_jax.reward.qa_metrics import cover_exact_match, exact_match, f1, paraphrase_blend

if TYPE_CHECKING:
  from typing_extensions import Self

_TOOL_TAGS = ("search", "access", "answer")


def format_violations(generation: str) -> list[str]:
  """What is wrong with one LLM generation (one turn's completion), ASearcher's
  `correct_format_fn` exactly: string counts, case-sensitive, order of tags not checked.
  - `<search>`, `<access>`, `<answer>`: as many opening as closing tags (each kind);
  - at most one opening tool tag in total (`<answer>` counts: one action per turn);
  - no "Assistant" or "assistant" anywhere (the model writing the next dialogue turn of the
    plain-text prompt, or a chat role leaking);
  - at most one `</think>`."""
  s, bad = generation, []
  for tag in _TOOL_TAGS:
    if s.count(f"<{tag}>") != s.count(f"</{tag}>"):
      bad.append(f"unbalanced <{tag}>")
  if sum(s.count(f"<{tag}>") for tag in _TOOL_TAGS) > 1:
    bad.append("more than one tool tag")
  if "Assistant" in s or "assistant" in s:
    bad.append("'assistant' in text")
  if s.count("</think>") > 1:
    bad.append("more than one </think>")
  return bad


def format_ok(generations: Sequence[str]) -> bool:
  """The format gate: every generation is well formed (`format_violations`). No generations
  (e.g. scoring a bare answer in evaluation) passes, as `all([])` does upstream."""
  return all(not format_violations(g) for g in generations)


# Upstream: `any(c in pred for c in ["question", "invalid", "appropriate", "valid"])`, a
# case-sensitive substring test. Here: case-insensitive, and the keyword must start a word, so
# "Invalid", "questions", "inappropriate", "validity" match but words that only contain a keyword
# inside them do not ("unquestioned", "misappropriation", "subquestion").
_INVALID = re.compile(r"\b(?:question|invalid|inappropriate|appropriate|valid)", re.IGNORECASE)


def invalid_answer(pred: str | None) -> bool:
  """Does the answer call the question invalid/inappropriate? (Matched by keyword, so an
  answer that merely mentions "question" or "valid" counts, as upstream.)"""
  return bool(pred) and _INVALID.search(pred) is not None


@dataclass
class Score:
  """`metrics` holds em/cem/f1 on the gold answers (no paraphrase blend, no gate) and, when the
  judge was asked and answered, judge (1/0). `invalid` is the keyword test alone, whether or
  not the penalty applied."""

  reward: float
  metrics: dict[str, float] = field(default_factory=dict)
  format_ok: bool = True
  invalid: bool = False
  verdict: JudgeVerdict | None = None


class Scorer:
  """Scores finished trajectories under a `RewardSection`. Without a `judge` one is made from
  `cfg.judge` on first need and closed by `close()`; a passed-in judge is the caller's to close."""

  def __init__(self, cfg: RewardSection | None = None, judge: Judge | None = None):
    self.cfg = cfg or RewardSection()
    self._judge, self._owns_judge = judge, False
    norm = self.cfg.normalization
    self._text_metric = {
        "em": functools.partial(exact_match, normalization=norm),
        "cem": functools.partial(cover_exact_match, normalization=norm),
        "f1": functools.partial(f1, variant=self.cfg.f1_variant, normalization=norm),
    }

  async def __aenter__(self) -> Self:
    return self

  async def __aexit__(self, *exc) -> None:
    await self.close()

  async def close(self) -> None:
    if self._owns_judge and self._judge is not None:
      await self._judge.close()

  @property
  def judge(self) -> Judge:
    if self._judge is None:
      self._judge, self._owns_judge = Judge(self.cfg.judge), True
    return self._judge

  async def score(self, *, question: str, prediction: str | None, answers: Sequence[str],
                  aug_answers: Sequence[str] = (), generations: Sequence[str] = (),
                  valid_instruction: bool = False, with_judge: bool | None = None) -> Score:
    """`with_judge`: None asks the judge only when it is the metric; True also asks it for
    reporting; False never (an error with metric "judge")."""
    cfg = self.cfg
    if with_judge is False and cfg.metric == "judge":
      raise ValueError("reward.metric is 'judge': cannot score with with_judge=False")
    use_judge = cfg.metric == "judge" or bool(with_judge)
    answers = [answers] if isinstance(answers, str) else list(answers)
    aug_answers = [aug_answers] if isinstance(aug_answers, str) else list(aug_answers)
    metrics = {name: fn(prediction, answers) for name, fn in self._text_metric.items()}
    verdict = None
    if use_judge:
      if prediction is None or not prediction.strip():
        verdict = JudgeVerdict(False, "no prediction", None, 0)
      else:
        verdict = await self.judge.judge(question, prediction, answers)
      if verdict.correct is not None:
        metrics["judge"] = float(verdict.correct)
    fmt = format_ok(generations)
    invalid = invalid_answer(prediction)

    if prediction is None:
      reward = 0.0
    elif cfg.metric == "judge":
      reward = metrics.get("judge", 0.0)
    else:
      reward = paraphrase_blend(prediction, answers, aug_answers, self._text_metric[cfg.metric],
                                cfg.aug_weight)
    if cfg.format_gate and not fmt:
      reward = 0.0
    if valid_instruction and invalid and cfg.invalid_penalty is not None:
      reward = cfg.invalid_penalty
    return Score(reward=float(reward), metrics=metrics, format_ok=fmt, invalid=invalid,
                 verdict=verdict)
