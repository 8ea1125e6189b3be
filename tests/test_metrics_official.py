"""EM and F1 against the official SQuAD v1.1 evaluation script's definitions, on the real gold
answers of `../shared/data/eval` with systematic perturbations of each.

The reference below is written from the script (`evaluate-v1.1.py`: `normalize_answer`,
`f1_score`, `exact_match_score`, `metric_max_over_ground_truths`), not from our code, so that
a drift of our normalisation from the published one shows here."""

import collections
import glob
import os
import re
import string

import pytest

from asearcher_jax.data.qa import load_qa
from asearcher_jax.reward import exact_match, f1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "eval"))


def squad_normalize_answer(s):
  def remove_articles(text):
    return re.sub(r"\b(a|an|the)\b", " ", text)

  def white_space_fix(text):
    return " ".join(text.split())

  def remove_punc(text):
    exclude = set(string.punctuation)
    return "".join(ch for ch in text if ch not in exclude)

  return white_space_fix(remove_articles(remove_punc(s.lower())))


def squad_f1_score(prediction, ground_truth):
  prediction_tokens = squad_normalize_answer(prediction).split()
  ground_truth_tokens = squad_normalize_answer(ground_truth).split()
  common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(prediction_tokens)
  recall = 1.0 * num_same / len(ground_truth_tokens)
  return (2 * precision * recall) / (precision + recall)


def squad_exact_match_score(prediction, ground_truth):
  return squad_normalize_answer(prediction) == squad_normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
  return max(metric_fn(prediction, gt) for gt in ground_truths)


def perturbations(gold: str, other: str) -> list[str]:
  """What predictions look like: the gold as is and re-cased, with punctuation, articles and
  dashes of either kind, Unicode punctuation, partial, repeated, extended, reordered, another
  question's answer, and answers that normalise to nothing."""
  words = gold.split()
  return [
      gold, gold.upper(), gold.lower(), gold.title(), f" {gold}. ", f'"{gold}"', f"The {gold}",
      f"a {gold}!", gold.replace("-", "–"), gold.replace("–", "-"), gold.replace(" ", "-"),
      f"{gold}，{gold}。", f"{gold} ({other})", " ".join(words[1:]), " ".join(words[:-1]),
      f"{gold} {gold}", f"{gold} and {other}", " ".join(reversed(words)), other, "", "the",
      "...", "True", "yes", f"{gold}年", gold.replace("'", "’"),
  ]


def gold_sets():
  paths = sorted(glob.glob(os.path.join(EVAL, "r1-searcher", "*.jsonl")) +
                 glob.glob(os.path.join(EVAL, "deepresearcher", "test.parquet")))
  return [list(item.answers) for p in paths for item in load_qa(p).items]


@pytest.mark.skipif(not os.path.isdir(EVAL), reason="shared/data/eval not present")
def test_em_and_f1_equal_the_official_squad_definitions_on_real_answers():
  golds = gold_sets()
  assert len(golds) > 4000
  cases = 0
  for i, answers in enumerate(golds):
    other = golds[(i * 7919 + 1) % len(golds)][0]
    for gold in answers[:2]:
      for pred in perturbations(gold, other):
        want_em = float(metric_max_over_ground_truths(squad_exact_match_score, pred, answers))
        want_f1 = float(metric_max_over_ground_truths(squad_f1_score, pred, answers))
        got_em, got_f1 = exact_match(pred, answers), f1(pred, answers, "bag")
        assert abs(got_em - want_em) <= 1e-9 and abs(got_f1 - want_f1) <= 1e-9, (
            pred, answers[:5], {"em": (got_em, want_em), "f1": (got_f1, want_f1)})
        cases += 1
  assert cases > 100_000
