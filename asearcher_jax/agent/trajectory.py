"""The trajectory record (docs/contracts.md): exact engine tokens, loss mask, behaviour
log-probs, per-token versions, turn spans, status, reward and timings; JSON on disk, a compact
binary record (`to_record`) on the replay queue.

A record holds one or more *sequences*, concatenated in `tokens` and split at `seq_starts`.
Each sequence is a context the engine really saw, grown turn by turn (ASearcher's packing):
when the context is rewritten -- a page chunk that has been read is replaced by a short stub
-- the next turn starts a new sequence that repeats the rewritten context with loss mask 0, so
every sampled token is trained exactly once, under the context it was sampled in.
Text-only backends (an external OpenAI-compatible endpoint) give records with no tokens and a
transcript, good for evaluation, not for training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import struct
from typing import Any, Iterator, Literal

import numpy as np

from asearcher_jax.jsonl import append_lines, read_lines

Status = Literal["answered", "no_answer", "max_turns", "context_full", "timeout", "tool_error",
                 "env_error", "aborted"]
STATUSES: tuple[str, ...] = Status.__args__
# Ends the infrastructure caused, not the policy: `aborted` (the policy endpoint went away) and
# `env_error` (tool calls failed in a row because a tool server was down or broken, or the
# judge whose verdict is the reward failed). Such an
# episode says nothing of the policy: it is not scored, trained on or counted in a metric, and
# a rerun of an evaluation retries it.
INFRA_STATUSES = frozenset({"aborted", "env_error"})
# A reward past this is a scorer's bug; the learner's advantages square rewards in float32,
# where 1e300 became inf and the batch's normalisation spread NaN to every group.
MAX_REWARD = 1e6


def _finite(x) -> bool:
  """A real number that is finite as a float (10**400, valid JSON, is an int that is not)."""
  try:
    return isinstance(x, numbers.Real) and math.isfinite(float(x))
  except OverflowError:
    return False

# The binary record (`Trajectory.to_record`): how trajectories cross the replay queue.
RECORD_MAGIC = b"\x00TRJ"  # a NUL never starts a JSON text: old JSON records stay readable
RECORD_SCHEMA = 1
# The per-token arrays, in record order, with their little-endian wire dtypes.
_RECORD_ARRAYS = {"tokens": "<i4", "behav_logp": "<f4", "version": "<i4", "loss_mask": "u1"}
_NATIVE = {"tokens": np.int32, "behav_logp": np.float32, "version": np.int32, "loss_mask": bool}


@dataclasses.dataclass
class Turn:
  """One LLM call. `start:end` is the span of its sampled tokens in `Trajectory.tokens`."""

  kind: Literal["act", "read"]
  start: int
  end: int
  prompt_tokens: int
  finish_reason: str
  action: str = "none"
  argument: str = ""
  tool_ok: bool | None = None  # None: no tool was called
  continues: bool = False  # it goes on with the previous call's message, cut by max_new_tokens
  tool_error: str | None = None
  llm_s: float = 0.0
  tool_s: float = 0.0


@dataclasses.dataclass
class Trajectory:
  qid: str
  question: str
  answers: list[str]
  aug_answers: list[str] = dataclasses.field(default_factory=list)
  group_id: str = ""
  sample: int = 0  # index within the group / the k of Avg@k
  tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
  loss_mask: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, bool))
  behav_logp: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
  version: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
  seq_starts: list[int] = dataclasses.field(default_factory=list)
  turns: list[Turn] = dataclasses.field(default_factory=list)
  transcript: list[dict[str, str]] = dataclasses.field(default_factory=list)  # role, text
  prediction: str | None = None
  status: Status = "aborted"
  error: str | None = None
  reward: float = 0.0
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  format_ok: bool = True
  valid_instruction: bool = False
  submit_version: int = -1  # the learner version when the group was admitted
  sampling: dict[str, Any] = dataclasses.field(default_factory=dict)
  timings: dict[str, float] = dataclasses.field(default_factory=dict)

  # -- derived views -------------------------------------------------------------------------
  @property
  def num_turns(self) -> int:
    return len(self.turns)

  def tool_calls(self, tool: str | None = None) -> int:
    return sum(t.action == (tool or t.action) and t.action in ("search", "access")
               for t in self.turns)

  @property
  def loss_tokens(self) -> int:
    return int(self.loss_mask.sum())

  def sequences(self) -> Iterator[slice]:
    ends = self.seq_starts[1:] + [len(self.tokens)]
    for a, b in zip(self.seq_starts, ends):
      yield slice(a, b)

  def generations(self) -> list[str]:
    """The text of each generation, as the format gate reads it: one per LLM call, except that
    a call cut by max_new_tokens and the calls that continue it are one generation (the agent
    parses their action from the joined text, so the gate reads it the same way). Only a call
    the agent continued joins (`Turn.continues`): the reasoning agent's turns never do."""
    out: list[str] = []
    texts = [m["text"] for m in self.transcript if m["role"] == "policy"]
    for i, text in enumerate(texts):
      if out and i < len(self.turns) and self.turns[i].continues:
        out[-1] += text
      else:
        out.append(text)
    return out

  def versions_range(self) -> tuple[int, int] | None:
    v = self.version[self.loss_mask]
    return (int(v.min()), int(v.max())) if v.size else None

  # -- building -------------------------------------------------------------------------------
  def record_call(self, context: list[int], output: list[int], logprobs: list[float],
                  versions: list[int]) -> tuple[int, int]:
    """Appends one LLM call: the context's new tokens (mask 0) and the sampled ones (mask 1).

    The current sequence continues when `context` extends it; otherwise a new one starts.
    Returns the span of the sampled tokens.
    """
    cur = self.seq_starts[-1] if self.seq_starts else len(self.tokens)
    seq = self.tokens[cur:]
    if not self.seq_starts or len(context) < len(seq) or not np.array_equal(
        seq, np.asarray(context[:len(seq)], np.int32)):
      self.seq_starts.append(len(self.tokens))
      new = context
    else:
      new = context[len(seq):]
    n, m = len(new), len(output)
    self.tokens = np.concatenate([self.tokens, np.asarray(new, np.int32),
                                  np.asarray(output, np.int32)])
    self.loss_mask = np.concatenate([self.loss_mask, np.zeros(n, bool), np.ones(m, bool)])
    self.behav_logp = np.concatenate([self.behav_logp, np.zeros(n, np.float32),
                                      np.asarray(logprobs, np.float32)])
    self.version = np.concatenate([self.version, np.full(n, -1, np.int32),
                                   np.asarray(versions, np.int32)])
    end = len(self.tokens)
    return end - m, end

  # -- serialisation --------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["tokens"] = self.tokens.tolist()
    d["loss_mask"] = self.loss_mask.astype(np.int8).tolist()
    d["behav_logp"] = [float(x) for x in self.behav_logp]  # float32 values, exact in JSON
    d["version"] = self.version.tolist()
    d["turns"] = [dataclasses.asdict(t) for t in self.turns]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Trajectory":
    d = dict(d)
    d["tokens"] = np.asarray(d.get("tokens", []), np.int32)
    d["loss_mask"] = np.asarray(d.get("loss_mask", []), bool)
    d["behav_logp"] = np.asarray(d.get("behav_logp", []), np.float32)
    d["version"] = np.asarray(d.get("version", []), np.int32)
    d["turns"] = [Turn(**t) for t in d.get("turns", [])]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown trajectory fields: {sorted(unknown)}")
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), ensure_ascii=False)

  @classmethod
  def from_json(cls, line: str | bytes) -> "Trajectory":
    return cls.from_dict(json.loads(line))

  def to_record(self) -> bytes:
    """The replay queue's compact form (JSON stays for files people read): RECORD_MAGIC, the
    schema byte, the header's length (uint32), the header (every other field, as JSON), the
    four arrays' lengths (uint32), then the arrays as little-endian bytes: tokens int32,
    behav_logp float32 (the engine's and the training batch's dtype, so the learner trains on
    exactly the sampled values), version int32, loss_mask uint8. 13 bytes a token, where JSON
    spends about 24 on decimal strings (36 on a sampled token)."""
    head = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in _RECORD_ARRAYS}
    head["turns"] = [dataclasses.asdict(t) for t in self.turns]
    h = json.dumps(head, ensure_ascii=False).encode()
    arrays = [np.ascontiguousarray(getattr(self, k), d) for k, d in _RECORD_ARRAYS.items()]
    return b"".join([RECORD_MAGIC, bytes([RECORD_SCHEMA]), struct.pack("<I", len(h)), h,
                     struct.pack("<4I", *map(len, arrays)), *(a.tobytes() for a in arrays)])

  @classmethod
  def from_record(cls, raw: bytes) -> "Trajectory":
    """`to_record`'s inverse; a record without RECORD_MAGIC is read as `to_json`'s (what the
    queue carried before, e.g. in an old journal). A record of an unknown schema, truncated or
    corrupt raises ValueError saying so; the invariants are left to `check`."""
    raw = bytes(raw)
    if raw[:len(RECORD_MAGIC)] != RECORD_MAGIC:
      return cls.from_json(raw)
    what = "binary trajectory record"
    pos = len(RECORD_MAGIC) + 5
    if len(raw) < pos:
      raise ValueError(f"{what} truncated: {len(raw)} bytes")
    if raw[len(RECORD_MAGIC)] != RECORD_SCHEMA:
      raise ValueError(f"{what} of unknown schema version {raw[len(RECORD_MAGIC)]} (this "
                       f"build reads {RECORD_SCHEMA})")
    (hlen,) = struct.unpack_from("<I", raw, pos - 4)
    if len(raw) < pos + hlen + 16:
      raise ValueError(f"{what} truncated in its header: {len(raw)} bytes")
    try:
      head = json.loads(raw[pos:pos + hlen])
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON
      raise ValueError(f"{what}: header is not JSON ({e})") from None
    if not isinstance(head, dict):
      raise ValueError(f"{what}: header is not a JSON object")
    if set(head) & set(_RECORD_ARRAYS):
      raise ValueError(f"{what}: header holds per-token fields "
                       f"{sorted(set(head) & set(_RECORD_ARRAYS))}")
    counts = struct.unpack_from("<4I", raw, pos + hlen)
    pos += hlen + 16
    need = sum(c * np.dtype(d).itemsize for c, d in zip(counts, _RECORD_ARRAYS.values()))
    if len(raw) - pos != need:
      raise ValueError(f"{what} truncated or corrupt: {len(raw) - pos} bytes of arrays where "
                       f"the lengths {list(counts)} need {need}")
    for (k, d), c in zip(_RECORD_ARRAYS.items(), counts):
      a = np.frombuffer(raw, d, c, pos)
      pos += a.nbytes
      if k == "loss_mask" and (a > 1).any():
        raise ValueError(f"{what}: loss_mask bytes other than 0 and 1")
      head[k] = a.astype(_NATIVE[k])  # a writable copy in native byte order
    return cls.from_dict(head)

  def check(self) -> None:
    """The record's invariants; raises ValueError naming the first one broken."""
    n = len(self.tokens)
    if not (len(self.loss_mask) == len(self.behav_logp) == len(self.version) == n):
      raise ValueError("tokens, loss_mask, behav_logp and version differ in length")
    # The header's fields a learner reads (a record off the wire is any JSON): typed here, so
    # a bad one is dropped with its reason rather than failing every step that leases it.
    if not isinstance(self.seq_starts, list) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in self.seq_starts):
      raise ValueError(f"seq_starts must be a list of integers, got {self.seq_starts!r:.80}")
    if not _finite(self.reward) or abs(self.reward) > MAX_REWARD:
      raise ValueError(f"reward must be a finite number within ±{MAX_REWARD:g}, got "
                       f"{self.reward!r:.80}")
    if not isinstance(self.metrics, dict) or not all(
        isinstance(k, str) and _finite(v) for k, v in self.metrics.items()):
      raise ValueError(f"metrics must map names to finite numbers, got {self.metrics!r:.80}")
    if n and (not self.seq_starts or self.seq_starts[0] != 0
              or sorted(set(self.seq_starts)) != self.seq_starts or self.seq_starts[-1] >= n):
      raise ValueError(f"bad seq_starts {self.seq_starts} for {n} tokens")
    if (self.version[~self.loss_mask] != -1).any():
      raise ValueError("a token outside the loss mask has a version other than -1")
    if (self.version[self.loss_mask] < 0).any():
      raise ValueError("a sampled token has no policy version")
    for t in self.turns:
      if not (0 <= t.start <= t.end <= n) or not self.loss_mask[t.start:t.end].all():
        raise ValueError(f"turn span {t.start}:{t.end} is not a run of sampled tokens")
    if self.status not in STATUSES:
      raise ValueError(f"unknown status {self.status!r}")


def write_jsonl(path: str, trajectories) -> None:
  """Appends records, one JSON line each (fsynced; a torn last line is cut off first)."""
  append_lines(path, trajectories, encode=Trajectory.to_json)


def read_jsonl(path: str) -> list[Trajectory]:
  """Records of a file; a torn last line (a crash mid-write) is ignored."""
  return read_lines(path, decode=Trajectory.from_json)
