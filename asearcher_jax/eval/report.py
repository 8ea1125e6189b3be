"""Avg@k / Pass@k per dataset and metric, from per-sample scores; a printed table; and the
change against a baseline with a paired bootstrap interval over questions."""

from __future__ import annotations

import collections
import zlib
from typing import Iterable, Mapping

import numpy as np

from asearcher_jax.agent.trajectory import INFRA_STATUSES


def aggregate(samples: Iterable[Mapping], k: int) -> dict[str, dict]:
  """`samples`: dicts with dataset, qid, sample, status, metrics, turns, tool_calls.

  Avg@k is the mean over questions of the mean over their samples; Pass@k the mean over
  questions of the best sample (for F1, the best F1). A question counts with the samples it
  has (at most k). Samples the infrastructure ended (`INFRA_STATUSES`) are left out of the
  metrics and counted apart; every other status (a wrong answer, running out of turns)
  scores what it got.
  """
  out = {}
  for ds, (questions, scored) in sorted(_by_question(samples, k).items()):
    statuses = collections.Counter(s["status"] for qs in questions.values() for s in qs)
    table = {}
    for m, per_q in _metric_scores(scored).items():
      per_q = list(per_q.values())
      table[m] = {f"avg@{k}": sum(sum(v) / len(v) for v in per_q) / len(per_q),
                  f"pass@{k}": sum(max(v) for v in per_q) / len(per_q), "questions": len(per_q)}
    flat = [s for qs in scored.values() for s in qs]
    out[ds] = {
        "questions": len(questions), "samples": sum(len(v) for v in questions.values()),
        "metrics": table, "status": dict(statuses),
        "mean_turns": _mean(s["turns"] for s in flat),
        "mean_tool_calls": _mean(s["tool_calls"] for s in flat),
        # The reward's format gate: every generation well formed (a sample scored before the
        # record kept it counts as passing).
        "format_ok": _mean(float(s.get("format_ok", True)) for s in flat),
        "tool_errors": sum(s.get("tool_errors", 0) for s in flat),
    }
  return out


def _by_question(samples: Iterable[Mapping], k: int) -> dict[str, tuple[dict, dict]]:
  """{dataset: ({qid: every sample}, {qid: its first k samples the infrastructure did not end})},
  questions with no such sample left out of the second."""
  by_ds: dict[str, dict[str, list[Mapping]]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  for s in samples:
    by_ds[s["dataset"]][s["qid"]].append(s)
  out = {}
  for ds, questions in by_ds.items():
    scored = {q: [s for s in qs if s["status"] not in INFRA_STATUSES][:k]
              for q, qs in questions.items()}
    out[ds] = questions, {q: qs for q, qs in scored.items() if qs}
  return out


def _metric_scores(scored: Mapping[str, list[Mapping]]) -> dict[str, dict[str, list[float]]]:
  """{metric: {qid: the scores of its samples}} over the questions that have the metric."""
  metrics = sorted({m for qs in scored.values() for s in qs for m in s["metrics"]})
  out = {}
  for m in metrics:
    per_q = {q: [s["metrics"][m] for s in qs if m in s["metrics"]] for q, qs in scored.items()}
    if per_q := {q: v for q, v in per_q.items() if v}:
      out[m] = per_q
  return out


def paired_intervals(before: Iterable[Mapping], after: Iterable[Mapping], k: int, *,
                     level: float = 0.95, resamples: int = 10000, seed: int = 0
                     ) -> dict[tuple[str, str], dict[str, tuple[float, float]]]:
  """{(dataset, metric): {"avg@k"/"pass@k": (low, high), "change": {"avg@k"/"pass@k": the
  mean change}, "questions": n}}: a percentile bootstrap interval of the change after − before,
  and the change itself, over the n questions both runs scored (paired: a question's
  difficulty cancels out, so the interval is far narrower than two separate ones).

  Why: on a few dozen questions a gain of several points can be noise; this says whether the
  questions support it. It covers the evaluation's sampling only, not the training run's."""
  k_before, k_after = _by_question(before, k), _by_question(after, k)
  out = {}
  for ds in sorted(set(k_before) & set(k_after)):
    b, a = _metric_scores(k_before[ds][1]), _metric_scores(k_after[ds][1])
    for m in sorted(set(b) & set(a)):
      qids = sorted(set(b[m]) & set(a[m]))
      if not qids:
        continue
      # Each cell draws its own resamples: its interval does not move when another dataset
      # or metric joins the report.
      rng = np.random.default_rng([seed, zlib.crc32(f"{ds}\0{m}".encode())])
      picks = rng.integers(len(qids), size=(resamples, len(qids)))
      tail = 100 * (1 - level) / 2
      cells = {"change": {}, "questions": len(qids)}
      for stat, f in ((f"avg@{k}", np.mean), (f"pass@{k}", np.max)):
        diff = np.array([f(a[m][q]) - f(b[m][q]) for q in qids])
        lo, hi = np.percentile(diff[picks].mean(axis=1), [tail, 100 - tail])
        cells[stat], cells["change"][stat] = (float(lo), float(hi)), float(diff.mean())
      out[ds, m] = cells
  return out


def _mean(xs) -> float:
  xs = list(xs)
  return sum(xs) / len(xs) if xs else 0.0


def _render(head: list[str], rows: list[list[str]]) -> str:
  """Left-aligned columns two spaces apart, under a head and a rule of dashes."""
  widths = [max(len(x) for x in col) for col in zip(head, *rows)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
  return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_table(report: Mapping[str, dict], k: int) -> str:
  metrics = sorted({m for r in report.values() for m in r["metrics"]})
  head = ["dataset", "n"] + [f"{m} avg@{k}/pass@{k}" for m in metrics] + ["turns", "tools",
                                                                           "answered", "format"]
  rows = []
  for ds, r in report.items():
    cells = [ds, str(r["questions"])]
    for m in metrics:
      v = r["metrics"].get(m)
      cells.append("-" if v is None
                   else f"{100 * v[f'avg@{k}']:5.1f} / {100 * v[f'pass@{k}']:5.1f}")
    # Of the samples that ran (as in the metrics, not those the infrastructure ended).
    ran = r["samples"] - sum(r["status"].get(s, 0) for s in INFRA_STATUSES)
    answered = r["status"].get("answered", 0) / max(1, ran)
    cells += [f"{r['mean_turns']:.1f}", f"{r['mean_tool_calls']:.1f}", f"{100 * answered:.0f}%",
              f"{100 * r.get('format_ok', 1.0):.0f}%"]
    rows.append(cells)
  return _render(head, rows)


def incomparable(before: Mapping, after: Mapping) -> str | None:
  """Why two reports' scores cannot be set side by side (None: they can). Reports written
  before sampling was recorded are taken at their word."""
  if before["k"] != after["k"]:
    return f"k={before['k']} against k={after['k']}: Avg@k and Pass@k differ in meaning"
  for key, what in (("sampling", "sampled with"), ("scoring", "scored with")):
    if before.get(key, after.get(key)) != after.get(key, before.get(key)):
      return f"{what} {before[key]} against {after[key]}"
  return None


def scoring_line(scoring: Mapping[str, str]) -> str:
  """The report header's account of how answers were scored (never silently lenient)."""
  norm = {"squad": "SQuAD v1.1 answer normalisation (official)",
          "lenient": "lenient answer normalisation (Unicode punctuation, CJK per character, "
                     "True/False as yes/no; not the official SQuAD one)"}[scoring["normalization"]]
  f1 = {"bag": "F1 over token multisets (SQuAD)",
        "set": "F1 over token sets (ASearcher)"}[scoring["f1_variant"]]
  return f"{norm}; {f1}"


def format_comparison(before: Mapping[str, dict], after: Mapping[str, dict], k: int,
                      names: tuple[str, str] = ("baseline", "this run"),
                      intervals: Mapping[tuple[str, str], dict] | None = None) -> str:
  """Avg@k and Pass@k of two reports side by side, with the change in points, for every
  dataset and metric both have; with `intervals` (`paired_intervals`), the change over the
  questions both runs scored, with its 95% interval in brackets. Where the two runs scored
  different questions, a note under the table says which change is over which."""
  head = ["dataset", "metric", f"{names[0]} avg@{k}", f"{names[1]} avg@{k}", "change",
          f"{names[0]} pass@{k}", f"{names[1]} pass@{k}", "change"]
  rows, notes = [], []
  for ds in sorted(set(before) & set(after)):
    b, a = before[ds]["metrics"], after[ds]["metrics"]
    for m in sorted(set(b) & set(a)):
      cells, paired = [ds, m], (intervals or {}).get((ds, m))
      for stat in (f"avg@{k}", f"pass@{k}"):
        x, y = 100 * b[m][stat], 100 * a[m][stat]
        if paired:
          lo, hi = paired[stat]
          change = f"{100 * paired['change'][stat]:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        else:
          change = f"{y - x:+.1f}"
        cells += [f"{x:.1f}", f"{y:.1f}", change]
      rows.append(cells)
      nb, na = b[m]["questions"], a[m]["questions"]
      if paired and not nb == na == paired["questions"]:
        notes.append(f"note: {ds} {m}: the change is over the {paired['questions']} questions "
                     f"both runs scored ({names[0]} {nb}, {names[1]} {na})")
      elif not paired and nb != na:
        notes.append(f"warning: {ds} {m}: {names[0]} scored {nb} questions, {names[1]} {na}: "
                     "the change compares different questions")
  if not rows:
    return "no dataset and metric in common with the baseline"
  return "\n".join([_render(head, rows)] + notes)
