"""Avg@k / Pass@k per dataset and metric, from per-sample scores; a printed table."""

from __future__ import annotations

import collections
from typing import Iterable, Mapping


def aggregate(samples: Iterable[Mapping], k: int) -> dict[str, dict]:
  """`samples`: dicts with dataset, qid, sample, status, metrics, turns, tool_calls.

  Avg@k is the mean over questions of the mean over their samples; Pass@k the mean over
  questions of the best sample (for F1, the best F1). A question counts with the samples it
  has (at most k). Samples `aborted` by the infrastructure are left out of the metrics and
  counted apart; every other status (a wrong answer, running out of turns) scores what it got.
  """
  by_ds: dict[str, dict[str, list[Mapping]]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  for s in samples:
    by_ds[s["dataset"]][s["qid"]].append(s)
  out = {}
  for ds, questions in sorted(by_ds.items()):
    statuses = collections.Counter(s["status"] for qs in questions.values() for s in qs)
    scored = {q: [s for s in qs if s["status"] != "aborted"][:k] for q, qs in questions.items()}
    scored = {q: qs for q, qs in scored.items() if qs}
    metrics = sorted({m for qs in scored.values() for s in qs for m in s["metrics"]})
    table = {}
    for m in metrics:
      per_q = [[s["metrics"][m] for s in qs if m in s["metrics"]] for qs in scored.values()]
      per_q = [v for v in per_q if v]
      if per_q:
        table[m] = {f"avg@{k}": sum(sum(v) / len(v) for v in per_q) / len(per_q),
                    f"pass@{k}": sum(max(v) for v in per_q) / len(per_q), "questions": len(per_q)}
    flat = [s for qs in scored.values() for s in qs]
    out[ds] = {
        "questions": len(questions), "samples": sum(len(v) for v in questions.values()),
        "metrics": table, "status": dict(statuses),
        "mean_turns": _mean(s["turns"] for s in flat),
        "mean_tool_calls": _mean(s["tool_calls"] for s in flat),
        "tool_errors": sum(s.get("tool_errors", 0) for s in flat),
    }
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
                                                                           "answered"]
  rows = []
  for ds, r in report.items():
    cells = [ds, str(r["questions"])]
    for m in metrics:
      v = r["metrics"].get(m)
      cells.append("-" if v is None
                   else f"{100 * v[f'avg@{k}']:5.1f} / {100 * v[f'pass@{k}']:5.1f}")
    # Of the samples that ran (aborted ones are the infrastructure's, as in the metrics).
    ran = r["samples"] - r["status"].get("aborted", 0)
    answered = r["status"].get("answered", 0) / max(1, ran)
    cells += [f"{r['mean_turns']:.1f}", f"{r['mean_tool_calls']:.1f}", f"{100 * answered:.0f}%"]
    rows.append(cells)
  return _render(head, rows)


def format_comparison(before: Mapping[str, dict], after: Mapping[str, dict], k: int,
                      names: tuple[str, str] = ("baseline", "this run")) -> str:
  """Avg@k and Pass@k of two reports side by side, with the change in points, for every
  dataset and metric both have."""
  head = ["dataset", "metric", f"{names[0]} avg@{k}", f"{names[1]} avg@{k}", "change",
          f"{names[0]} pass@{k}", f"{names[1]} pass@{k}", "change"]
  rows = []
  for ds in sorted(set(before) & set(after)):
    b, a = before[ds]["metrics"], after[ds]["metrics"]
    for m in sorted(set(b) & set(a)):
      cells = [ds, m]
      for stat in (f"avg@{k}", f"pass@{k}"):
        x, y = 100 * b[m][stat], 100 * a[m][stat]
        cells += [f"{x:.1f}", f"{y:.1f}", f"{y - x:+.1f}"]
      rows.append(cells)
  if not rows:
    return "no dataset and metric in common with the baseline"
  return _render(head, rows)
