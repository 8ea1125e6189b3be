"""Answer metrics: exact match, cover exact match and token F1, all max over gold answers.

One normalisation for every metric, so EM, CEM and F1 agree on what a token is:
SQuAD's `normalize_answer` (lowercase; delete punctuation; drop the articles a/an/the;
collapse whitespace), then tokens are the whitespace-separated words, except that CJK
ideographs and Japanese kana are one token per character (the scripts have no spaces) while
runs of other characters inside them stay whole ("2008年北京" -> 2008 年 北 京).

ASearcher quirks adopted:
- "True"/"False" answers count as "yes"/"no" (their `bool_mapping`), on both sides; here on
  the normalised text, so "true." and "TRUE" map too (theirs maps only the exact strings).
- Set-based F1 (`variant="set"`, their training reward and `evaluate.py` F1): precision and
  recall over token *sets*. `variant="bag"` is SQuAD's multiset F1.
- Max over several gold answers; an empty prediction or gold scores 0 (their F1 guards).
- The paraphrase blend `(1-w)·m(answers) + w·max(m(aug), m(answers))`, w = 0.3.

Declined:
- Their F1 normalisation (punctuation -> space, articles kept) differs from their EM/CEM one;
  we use SQuAD's for all metrics.
- Their Chinese handling switches the *whole* comparison to character sets (Latin letters
  included) when the gold contains a Chinese character, and drops Chinese punctuation by a
  hand list; we split CJK per character everywhere and delete all Unicode punctuation.
- Their CEM (`cover_exact_match_score_1`) asks only that every gold word occurs somewhere in
  the prediction; Search-R1's substring EM matches inside words ("us" in "bus"). Ours asks for
  the gold tokens as one contiguous token run in the prediction.
- Normalised-empty strings never match (theirs gives EM 1 for "" vs "the").
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Literal

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# CJK ideographs (with extensions A..F and compatibility) and Japanese kana.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_BOOLS = {"true": "yes", "false": "no"}

Golds = str | Iterable[str | None] | None
MetricFn = Callable[[str | None, Golds], float]


def _is_punct(ch: str) -> bool:
  return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(s: str) -> str:
  """SQuAD normalisation, with punctuation meaning ASCII punctuation plus any Unicode P*
  character (so CJK punctuation such as ，。 goes too)."""
  s = s.lower()
  s = "".join(ch for ch in s if not _is_punct(ch))
  s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


def tokens(s: str) -> list[str]:
  """Normalised tokens: words, but one token per CJK character; True/False -> yes/no."""
  norm = normalize_answer(s)
  norm = _BOOLS.get(norm, norm)
  return _TOKEN.findall(norm)


def _gold_list(golds: Golds) -> list[str]:
  if golds is None:
    return []
  if isinstance(golds, str):
    return [golds]
  return [str(g) for g in golds if g is not None]


def _max_over(pred: str | None, golds: Golds, fn: Callable[[list[str], list[str]], float]) -> float:
  if pred is None:
    return 0.0
  p = tokens(str(pred))
  if not p:
    return 0.0
  best = 0.0
  for g in _gold_list(golds):
    gt = tokens(g)
    if gt:
      best = max(best, fn(p, gt))
  return best


def exact_match(pred: str | None, golds: Golds) -> float:
  """1.0 if the normalised prediction equals a normalised gold answer."""
  return _max_over(pred, golds, lambda p, g: float(p == g))


def _contains_run(p: list[str], g: list[str]) -> float:
  n = len(g)
  return float(any(p[i:i + n] == g for i in range(len(p) - n + 1)))


def cover_exact_match(pred: str | None, golds: Golds) -> float:
  """1.0 if a gold answer's tokens appear as one contiguous run in the prediction's tokens
  (a long answer that contains the gold counts; a gold word split across answers does not)."""
  return _max_over(pred, golds, _contains_run)


def _f1_set(p: list[str], g: list[str]) -> float:
  ps, gs = set(p), set(g)
  common = len(ps & gs)
  if common == 0:
    return 0.0
  precision, recall = common / len(ps), common / len(gs)
  return 2 * precision * recall / (precision + recall)


def _f1_bag(p: list[str], g: list[str]) -> float:
  common = sum((Counter(p) & Counter(g)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(p), common / len(g)
  return 2 * precision * recall / (precision + recall)


def f1(pred: str | None, golds: Golds, variant: Literal["bag", "set"] = "bag") -> float:
  """Token F1, max over golds. "bag": SQuAD (repeated tokens count each time); "set":
  ASearcher (each distinct token once, so repeating a right word buys nothing)."""
  if variant == "set":
    return _max_over(pred, golds, _f1_set)
  if variant == "bag":
    return _max_over(pred, golds, _f1_bag)
  raise ValueError(f"unknown F1 variant {variant!r} (expected 'bag' or 'set')")


def paraphrase_blend(pred: str | None, answers: Golds, aug_answers: Golds, metric_fn: MetricFn,
                     aug_weight: float = 0.3) -> float:
  """ASearcher's credit for paraphrased gold answers: `(1-w)·m(answers) + w·max(m(aug),
  m(answers))`. A paraphrase match earns at most `w`, so the canonical answer stays the
  target; with no aug answers this is `m(answers)`."""
  base = metric_fn(pred, answers)
  aug = _gold_list(aug_answers)
  if not aug:
    return base
  return (1.0 - aug_weight) * base + aug_weight * max(metric_fn(pred, aug), base)
