"""Answer metrics: exact match, cover exact match and token F1, all max over gold answers.

Two normalisations, named, one for all metrics so that EM, CEM and F1 agree on what a token is:
- "squad" (the default): the official SQuAD v1.1 evaluation script's `normalize_answer`
  (lowercase; delete ASCII punctuation; drop the articles a/an/the; collapse whitespace) and
  whitespace tokens. Published scores (SQuAD, HotpotQA, Search-R1, FlashRAG, ASearcher) use it:
  "Trenton-Mercer" and "Trenton–Mercer" differ, and two answers that both normalise to nothing
  ("the" and "a") are an exact match, as in the script.
- "lenient": any Unicode punctuation (P*) is deleted, not just ASCII; CJK ideographs and
  Japanese kana are one token per character (the scripts have no spaces) while runs of other
  characters inside them stay whole ("2008年北京" -> 2008 年 北 京); "True"/"False" read as
  "yes"/"no" on both sides (ASearcher's `bool_mapping`); normalised-empty strings never match.
An eval report records which one scored it.

ASearcher's reward adopted: set-based F1 (`variant="set"`, its training reward: precision and
recall over token *sets*) beside SQuAD's multiset F1 (`variant="bag"`); max over several gold
answers; the paraphrase blend `(1-w)·m(answers) + w·max(m(aug), m(answers))`, w = 0.3.

Declined from ASearcher: its F1 normalisation (punctuation -> space, articles kept) differs from
its EM one; its Chinese handling switches the whole comparison to character sets when the gold
has a Chinese character. Its CEM (`cover_exact_match_score_1`) asks only that every gold word
occurs somewhere in the prediction, and Search-R1's substring EM matches inside words ("us" in
"bus"); ours asks for the gold tokens as one contiguous token run in the prediction.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Literal, get_args

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# CJK ideographs (with extensions A..F and compatibility) and Japanese kana.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_BOOLS = {"true": "yes", "false": "no"}

Golds = str | Iterable[str | None] | None
MetricFn = Callable[[str | None, Golds], float]
Normalization = Literal["squad", "lenient"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)


def _is_punct(ch: str) -> bool:
  return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(s: str, normalization: Normalization = "squad") -> str:
  """SQuAD v1.1's normalisation; "lenient" also deletes non-ASCII punctuation (，。–)."""
  punct = _is_punct if _check(normalization) == "lenient" else _ASCII_PUNCT.__contains__
  s = s.lower()
  s = "".join(ch for ch in s if not punct(ch))
  s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


def tokens(s: str, normalization: Normalization = "squad") -> list[str]:
  """Normalised tokens: SQuAD's whitespace words; "lenient": one token per CJK character and
  True/False as yes/no."""
  norm = normalize_answer(s, normalization)
  if normalization == "squad":
    return norm.split()
  norm = _BOOLS.get(norm, norm)
  return _TOKEN.findall(norm)


def _check(normalization: str) -> str:
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"unknown answer normalisation {normalization!r} "
                     f"(expected one of {', '.join(NORMALIZATIONS)})")
  return normalization


def _gold_list(golds: Golds) -> list[str]:
  if golds is None:
    return []
  if isinstance(golds, str):
    return [golds]
  return [str(g) for g in golds if g is not None]


def _max_over(pred: str | None, golds: Golds, fn: Callable[[list[str], list[str]], float],
              normalization: Normalization, empty_match: bool = False) -> float:
  """fn's best over the golds; empty token lists score 0, except that with `empty_match` an
  empty prediction matches an empty gold (SQuAD's EM). No prediction (None) scores 0."""
  if pred is None:
    return 0.0
  p = tokens(str(pred), normalization)
  best = 0.0
  for g in _gold_list(golds):
    gt = tokens(g, normalization)
    if p and gt:
      best = max(best, fn(p, gt))
    elif empty_match and not p and not gt:
      best = 1.0
  return best


def exact_match(pred: str | None, golds: Golds, normalization: Normalization = "squad") -> float:
  """1.0 if the normalised prediction equals a normalised gold answer."""
  return _max_over(pred, golds, lambda p, g: float(p == g), normalization,
                   empty_match=normalization == "squad")


def _contains_run(p: list[str], g: list[str]) -> float:
  n = len(g)
  return float(any(p[i:i + n] == g for i in range(len(p) - n + 1)))


def cover_exact_match(pred: str | None, golds: Golds,
                      normalization: Normalization = "squad") -> float:
  """1.0 if a gold answer's tokens appear as one contiguous run in the prediction's tokens
  (a long answer that contains the gold counts; a gold word split across answers does not)."""
  return _max_over(pred, golds, _contains_run, normalization)


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


def f1(pred: str | None, golds: Golds, variant: Literal["bag", "set"] = "bag",
       normalization: Normalization = "squad") -> float:
  """Token F1, max over golds. "bag": SQuAD (repeated tokens count each time); "set":
  ASearcher (each distinct token once, so repeating a right word buys nothing)."""
  if variant == "set":
    return _max_over(pred, golds, _f1_set, normalization)
  if variant == "bag":
    return _max_over(pred, golds, _f1_bag, normalization)
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
