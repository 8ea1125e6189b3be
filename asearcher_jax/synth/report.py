"""Statistics of a synthesis run, from the journal's seed records: what was kept, how much each
kept item was transformed, and why rounds and seeds were rejected."""

from __future__ import annotations

from collections import Counter
from typing import Any


def _mean(xs: list[float]) -> float:
  return round(sum(xs) / len(xs), 3) if xs else 0.0


def summarize(records: list[dict], dropped: Counter) -> dict[str, Any]:
  done = [r for r in records if r["status"] == "done"]
  started = [r for r in done if r["rejected"] is None]
  variants = [v for r in done for v in r["variants"]]
  rounds = [e for r in done for e in r["rounds"]]
  by_status = Counter(e["status"] for e in rounds)
  accepted = [Counter(e["action"] for e in r["rounds"] if e["status"] == "accepted")
              for r in started]
  aborted = [r for r in records if r["status"] == "aborted"]
  return {
      "seeds": {"total": len(records) + sum(dropped.values()), "done": len(done),
                "aborted": len(aborted), "dropped": sum(dropped.values()),
                "rejected": len(done) - len(started),
                "with_items": sum(bool(r["variants"]) for r in done)},
      "items": len(variants),
      "pool": sum(r["pool"] for r in done),
      "avg_injections": _mean([v["injections"] for v in variants]),
      "avg_fuzzes": _mean([v["fuzzes"] for v in variants]),
      "per_seed": {"accepted_injections": _mean([c["inject"] for c in accepted]),
                   "accepted_fuzzes": _mean([c["fuzz"] for c in accepted])},
      "rounds": {"total": len(rounds), "accepted": by_status["accepted"],
                 "rejected": by_status["rejected"], "exit": by_status["exit"]},
      "actions_proposed": dict(Counter(e["action"] or "none" for e in rounds).most_common()),
      "rejections": dict(Counter(e["reason"] for e in rounds
                                 if e["status"] == "rejected").most_common()),
      "seed_rejections": dict((Counter(r["rejected"]["reason"] for r in done
                                       if r["rejected"]) + dropped).most_common()),
      "first_abort": aborted[0]["error"] if aborted else None,
  }


def format_table(report: dict[str, Any]) -> str:
  s = report["seeds"]
  lines = [
      f"seeds: {s['total']} ({s['done']} done, {s['aborted']} aborted, {s['rejected']} rejected "
      f"at the base question, {s['dropped']} dropped at loading)",
      f"items kept: {report['items']} from {s['with_items']} seeds (pool of {report['pool']} "
      f"hard variants)",
      f"per kept item: {report['avg_injections']:.2f} injections, {report['avg_fuzzes']:.2f} "
      f"fuzzes; per seed: {report['per_seed']['accepted_injections']:.2f} injections, "
      f"{report['per_seed']['accepted_fuzzes']:.2f} fuzzes accepted",
      f"rounds: {report['rounds']['total']} ({report['rounds']['accepted']} accepted, "
      f"{report['rounds']['rejected']} rejected, {report['rounds']['exit']} exits)",
  ]
  for title, counts in (("round rejections", report["rejections"]),
                        ("seed rejections", report["seed_rejections"])):
    if counts:
      width = max(len(k) for k in counts)
      lines.append(f"{title}:")
      lines += [f"  {k:<{width}}  {v:>6}" for k, v in counts.items()]
  if report["first_abort"]:
    lines.append(f"aborted seeds are retried by a rerun; first error: {report['first_abort']}")
  return "\n".join(lines)
