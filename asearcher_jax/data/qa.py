"""QA records and tolerant loaders for the question files search agents train and evaluate on.

Every published search-agent dataset ships its own layout; they are all normalised here into one
`QAItem` so the rollout worker, the reward and the evaluation harness see a single schema.

Formats (`load_qa(format=...)`):
  asearcher       JSONL: question, answer (str | list), aug_answer?, qid?, source?; anything else
                  (our synthetic world's hops/chain/supporting_facts, ...) goes to `extra`.
  flashrag        JSONL: id, question, golden_answers (list), metadata?
  r1-searcher     JSONL: idx, question, answer (str); gen_text_store is dropped (a model output).
  deepresearcher  verl parquet (or the same rows as JSONL): data_source, prompt (chat messages),
                  reward_model.ground_truth (aliases joined by `<|answer_split|>`), extra_info.
  auto            .parquet -> deepresearcher; JSONL by the keys of its first JSON object.

Bad rows (no question, no non-empty answer, malformed JSON) are skipped and reported with their
1-based line/row number rather than raised: one broken row in a 35k-row training file must not
stop a run, but it must not vanish silently either.

qid: the file's id field (`qid`/`id`, flashrag `id`, r1-searcher `idx`, verl
`extra_info.index`). Bare integer ids are row numbers, not ids, so they are namespaced as
`{source}_{id}` (matching DeepResearcher's own `Bamboogle_39` style). Without an id field the qid
is `{source}-{sha1(source + "\\n" + question)[:16]}`: stable across runs and machines; a repeated
question in the same file gets `#2`, `#3`, ... in file order so qids stay unique. Nothing is
deduplicated; a repeated explicit id is kept, suffixed the same way, and counted in
`LoadReport.summary()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from asearcher_jax.errors import DataError
from asearcher_jax.jsonl import iter_rows

FORMATS = ("asearcher", "flashrag", "r1-searcher", "deepresearcher")
ANSWER_SPLIT = "<|answer_split|>"
_ALIASES = {"r1_searcher": "r1-searcher", "r1searcher": "r1-searcher", "verl": "deepresearcher",
            "deep-researcher": "deepresearcher", "deep_researcher": "deepresearcher"}



class _Skip(Exception):
  """One row is unusable; carries the reason into `SkippedRow`."""


@dataclass(frozen=True)
class QAItem:
  """One question with its gold answers; `aug_answers` are extra accepted aliases."""

  qid: str
  question: str
  answers: tuple[str, ...]
  aug_answers: tuple[str, ...] = ()
  source: str = ""
  extra: dict = field(default_factory=dict, hash=False)

  def __post_init__(self):
    # Lists are accepted (JSON hands them over) but stored as tuples so items stay immutable.
    object.__setattr__(self, "answers", tuple(self.answers))
    object.__setattr__(self, "aug_answers", tuple(self.aug_answers))

  @property
  def all_answers(self) -> tuple[str, ...]:
    """Answers then aug answers, first occurrence kept: what a reward should accept."""
    return tuple(dict.fromkeys(self.answers + self.aug_answers))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["answers"], d["aug_answers"] = list(self.answers), list(self.aug_answers)
    return d

  def to_json(self) -> str:
    """One JSONL line; `default=str` so odd parquet values (timestamps) cannot break a dump."""
    return json.dumps(self.to_dict(), ensure_ascii=False, default=str)

  @classmethod
  def from_json(cls, data: str | bytes | Mapping[str, Any]) -> QAItem:
    d = json.loads(data) if isinstance(data, (str, bytes)) else dict(data)
    return cls(qid=str(d["qid"]), question=d["question"], answers=tuple(d["answers"]),
               aug_answers=tuple(d.get("aug_answers", ())), source=d.get("source", ""),
               extra=dict(d.get("extra") or {}))


@dataclass(frozen=True)
class SkippedRow:
  path: str
  line: int  # 1-based: the JSONL line or the parquet row
  reason: str


@dataclass
class LoadReport:
  """What `load_qa` kept and what it skipped (with why), for logs and data-quality checks."""

  items: list[QAItem]
  skipped: list[SkippedRow]
  format: str
  path: str = ""
  duplicate_ids: int = 0  # rows whose explicit id repeats an earlier row's
  repeated_questions: int = 0  # rows without an id whose (source, question) repeats

  def __len__(self) -> int:
    return len(self.items)

  def summary(self, max_reasons: int = 5) -> str:
    s = (f"{self.path} [{self.format}]: {len(self.items)} items, {len(self.skipped)} skipped")
    if self.duplicate_ids:
      s += f", {self.duplicate_ids} duplicate ids (kept, qid suffixed)"
    if self.repeated_questions:
      s += f", {self.repeated_questions} repeated questions (kept, qid suffixed)"
    for row in self.skipped[:max_reasons]:
      s += f"\n  line {row.line}: {row.reason}"
    if len(self.skipped) > max_reasons:
      s += f"\n  ... and {len(self.skipped) - max_reasons} more"
    return s


# --------------------------------------------------------------------------------------- helpers

def _text(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, bytes):
    v = v.decode("utf-8")
  if isinstance(v, (list, tuple, dict)):
    raise _Skip(f"expected text, got {type(v).__name__}")
  if isinstance(v, bool):  # StrategyQA's true/false: the reply a reader gives is yes/no
    return "yes" if v else "no"
  if isinstance(v, float) and v.is_integer():  # 1990.0 from a column with gaps in it
    v = int(v)
  s = str(v).strip()
  if any("\ud800" <= c <= "\udfff" for c in s):  # valid JSON ("\ud83d" cut from an emoji)
    raise _Skip("text holds a lone UTF-16 surrogate, which no UTF-8 file can")
  return s


def _unquote_csv(q: str) -> str:
  """`"Who was ""X""?"` -> `Who was "X"?`: TriviaQA questions keep CSV quoting in the verl files.

  Only a fully wrapped string whose inner quotes are all doubled is unwrapped, so ordinary
  questions that merely start and end with a quoted title are left alone.
  """
  if len(q) >= 2 and q[0] == q[-1] == '"' and '"' not in q[1:-1].replace('""', ""):
    return q[1:-1].replace('""', '"').strip()
  return q


def _question(v: Any) -> str:
  q = _unquote_csv(_text(v))
  if not q:
    raise _Skip("missing or empty question")
  return q


def _answer_list(v: Any, what: str = "answer") -> tuple[str, ...]:
  """str | list -> non-empty aliases. Empty aliases are dropped: one would reward an empty reply."""
  if isinstance(v, Mapping) and "target" in v:  # Search-R1 verl rows: {"target": [...]}
    v = v["target"]
  if v is None:
    return ()
  if isinstance(v, (str, bytes, int, float)):  # bool is an int
    v = [v]
  if not hasattr(v, "__iter__") or isinstance(v, Mapping):
    raise _Skip(f"{what} has unsupported type {type(v).__name__}")
  out = []
  for a in v:
    t = _text(a)
    if t:
      out.append(t)
  return tuple(out)


def _require_answers(v: Any) -> tuple[str, ...]:
  answers = _answer_list(v)
  if not answers:
    raise _Skip("missing or empty answer")
  return answers


def source_from_path(path: str) -> str:
  """`r1-searcher/hotpotqa_500.jsonl` -> `hotpotqa`: the file name is the only hint it has."""
  stem = os.path.basename(os.path.normpath(path)).split(".")[0]
  return re.sub(r"_\d+$", "", stem) or stem


def _hash_qid(source: str, question: str) -> str:
  digest = hashlib.sha1(f"{source}\n{question}".encode()).hexdigest()[:16]
  return f"{source or 'qa'}-{digest}"


def _explicit_id(v: Any, source: str) -> str | None:
  if v is None or (isinstance(v, str) and not v.strip()):
    return None
  if isinstance(v, int) and not isinstance(v, bool):
    return f"{source}_{v}" if source else str(v)
  return _text(v)


# ------------------------------------------------------------------------------------ row parsers
# Each returns (explicit id or None, QAItem fields without qid).

def _parse_asearcher(row: dict, source: str | None, default_source: str):
  known = {"question", "answer", "aug_answer", "aug_answers", "qid", "id", "source"}
  src = source or _text(row.get("source")) or default_source
  aug = row.get("aug_answer", row.get("aug_answers"))
  fields = {"question": _question(row.get("question")),
            "answers": _require_answers(row.get("answer")),
            "aug_answers": _answer_list(aug, "aug_answer"), "source": src,
            "extra": {k: v for k, v in row.items() if k not in known}}
  return _explicit_id(row.get("qid", row.get("id")), src), fields


def _parse_flashrag(row: dict, source: str | None, default_source: str):
  known = {"id", "question", "golden_answers", "metadata"}
  src = source or default_source
  extra = {k: v for k, v in row.items() if k not in known}
  if row.get("metadata") is not None:
    extra["metadata"] = row["metadata"]
  fields = {"question": _question(row.get("question")),
            "answers": _require_answers(row.get("golden_answers")), "source": src, "extra": extra}
  return _explicit_id(row.get("id"), src), fields


def _parse_r1_searcher(row: dict, source: str | None, default_source: str):
  known = {"idx", "question", "answer", "gen_text_store"}
  src = source or default_source
  fields = {"question": _question(row.get("question")),
            "answers": _require_answers(row.get("answer")), "source": src,
            "extra": {k: v for k, v in row.items() if k not in known}}
  return _explicit_id(row.get("idx"), src), fields


_QUESTION_MARKER = "Question:"


def _question_from_prompt(prompt: Any) -> str:
  """The last user message; a templated prompt (Search-R1: `... Question: {q}`) is cut after
  its last `Question:` marker. DeepResearcher's own files hold the bare question."""
  if isinstance(prompt, (str, bytes)):
    content = _text(prompt)
  else:
    try:
      messages = list(prompt or ())
    except TypeError:
      raise _Skip(f"prompt has unsupported type {type(prompt).__name__}") from None
    users = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
    if not users:
      raise _Skip("prompt has no user message")
    content = _text(users[-1].get("content"))
  if _QUESTION_MARKER in content:
    tail = content.rsplit(_QUESTION_MARKER, 1)[1].strip()
    if tail:
      content = tail
  return content


def _parse_deepresearcher(row: dict, source: str | None, default_source: str):
  info = dict(row.get("extra_info") or {})
  reward = dict(row.get("reward_model") or {})
  src = source or _text(row.get("data_source")) or default_source
  question = info.pop("question", None) or _question_from_prompt(row.get("prompt"))
  truth = reward.pop("ground_truth", None)
  answers = _require_answers(truth.split(ANSWER_SPLIT) if isinstance(truth, str) else truth)
  qid = _explicit_id(info.pop("index", None), src)
  extra = {k: v for k, v in row.items()
           if k not in ("data_source", "prompt", "reward_model", "extra_info")}
  if info:
    extra["extra_info"] = info
  if reward:
    extra["reward_model"] = reward
  return qid, {"question": _question(question), "answers": answers, "source": src, "extra": extra}


_PARSERS = {"asearcher": _parse_asearcher, "flashrag": _parse_flashrag,
            "r1-searcher": _parse_r1_searcher, "deepresearcher": _parse_deepresearcher}


def detect_format(row: Mapping[str, Any]) -> str | None:
  """The format a JSON row belongs to, by its keys; None when it matches none."""
  if "golden_answers" in row:
    return "flashrag"
  if "prompt" in row and "reward_model" in row:
    return "deepresearcher"
  if "question" in row and "answer" in row:
    return "r1-searcher" if ("idx" in row or "gen_text_store" in row) else "asearcher"
  return None


# ------------------------------------------------------------------------------------- readers

def _iter_parquet(path: str) -> Iterator[tuple[int, dict | None, str | None]]:
  import pyarrow.parquet as pq  # only parquet needs it

  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several types for "not a parquet file"
    raise DataError(f"{path}: cannot read as parquet: {e}") from e
  n = 0
  for batch in pf.iter_batches(batch_size=1024):
    for row in batch.to_pylist():
      n += 1
      yield n, row, None


def _normalise_format(fmt: str) -> str:
  f = fmt.strip().lower()
  f = _ALIASES.get(f, f)
  if f != "auto" and f not in FORMATS:
    raise DataError(f"unknown QA format {fmt!r}; expected one of auto, {', '.join(FORMATS)}")
  return f


def load_qa(path: str | os.PathLike, format: str = "auto", source: str | None = None,
            limit: int | None = None, default_source: str | None = None) -> LoadReport:
  """Read a QA file into `QAItem`s; bad rows land in `report.skipped`, never in an exception.

  `source` overrides the per-row dataset name (default: the row's `source`/`data_source`, else
  `default_source`, else the file name without a trailing `_<count>`). `limit` caps the
  number of items kept.
  """
  path = os.fspath(path)
  fmt = _normalise_format(format)
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file")
  if not os.path.isfile(path):
    raise DataError(f"{path}: not a file")
  is_parquet = path.endswith(".parquet")
  if fmt == "auto" and is_parquet:
    fmt = "deepresearcher"
  rows = _iter_parquet(path) if is_parquet else iter_rows(path)

  items: list[QAItem] = []
  skipped: list[SkippedRow] = []
  if fmt == "auto":  # buffer up to the first JSON object whose keys name a format
    buffered, first = [], None
    for rec in rows:
      buffered.append(rec)
      if rec[1] is not None:
        first = first or rec
        detected = detect_format(rec[1])
        if detected:
          fmt = detected
          break
    if fmt == "auto" and first is not None:
      raise DataError(f"{path}: cannot tell the QA format from any line (line {first[0]} has "
                      f"keys {sorted(first[1])}); pass format= one of {', '.join(FORMATS)}")
    if fmt == "auto":
      raise DataError(f"{path}: no JSON object to detect the format from "
                      f"({len(buffered)} malformed lines); pass format= explicitly")
    rows = _chain(buffered, rows)  # rows before that one are parsed (and skipped) as it says

  parse = _PARSERS[fmt]
  default_source = default_source or source_from_path(path)
  issued: set[str] = set()
  dup_ids = repeated = 0
  for n, row, err in rows:
    if limit is not None and len(items) >= limit:
      break
    if err is not None:
      skipped.append(SkippedRow(path, n, err))
      continue
    try:
      qid, fields = parse(row, source, default_source)
    except _Skip as e:
      skipped.append(SkippedRow(path, n, str(e)))
      continue
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # odd field types: still a row
      skipped.append(SkippedRow(path, n, f"unreadable row: {type(e).__name__}: {e}"))
      continue
    hashed = qid is None
    qid = _hash_qid(fields["source"], fields["question"]) if hashed else qid
    if qid in issued:  # kept, but as its own question: evaluation and rollout key on qid
      repeated, dup_ids = repeated + hashed, dup_ids + (not hashed)
      qid = free_id(qid, issued)
    issued.add(qid)
    items.append(QAItem(qid=qid, **fields))
  return LoadReport(items=items, skipped=skipped, format=fmt, path=path, duplicate_ids=dup_ids,
                    repeated_questions=repeated)


def free_id(qid: str, issued: set[str]) -> str:
  """`qid`, or the first `#N` suffix (N >= 2) not issued yet: a repeated id is kept as its own
  question (evaluation, rollouts and synthesis key on it)."""
  if qid not in issued:
    return qid
  return next(f"{qid}#{i}" for i in itertools.count(2) if f"{qid}#{i}" not in issued)


def _chain(first, rest):
  yield from first
  yield from rest
