"""What the replay queue accepts: every trajectory of a group decodes to a sound record.

Checked once, at `Put`, so a poison group is refused with INVALID_ARGUMENT naming what is wrong
and never stored (the learner would otherwise fail on it at every lease, or train on it). The
queue itself stays payload-agnostic; this is the service's boundary.
"""

from __future__ import annotations

import json

import numpy as np

from asearcher_jax.agent.trajectory import RECORD_MAGIC, Trajectory
from asearcher_jax.replay.queue import Group


def check_group(group: Group, *, version: int, vocab_size: int | None = None
                ) -> list[Trajectory]:
  """The group's trajectories, decoded; ValueError naming the first trajectory and field that
  is wrong. `version`: the newest version the decode servers can hold (the queue's, plus the one
  being published); a group or a token from a later one cannot exist yet."""
  if not 0 <= group.submit_version <= version:
    raise ValueError(f"group {group.group_id}: submit_version {group.submit_version} is not in "
                     f"[0, {version}] (the newest version the servers can hold)")
  return [decode_trajectory(raw, f"group {group.group_id} trajectory {i}", vocab_size=vocab_size,
                            max_version=version) for i, raw in enumerate(group.trajectories)]


def decode_trajectory(raw: bytes, where: str, *, vocab_size: int | None = None,
                      max_version: int | None = None) -> Trajectory:
  """One trajectory record, decoded and checked (ValueError prefixed with `where`): the binary
  record (`Trajectory.to_record`), or JSON as queued before it (an older run's journal)."""
  binary = bytes(raw[:len(RECORD_MAGIC)]) == RECORD_MAGIC
  if not binary:
    try:
      record = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON
      raise ValueError(f"{where}: not a JSON trajectory record ({e}), nor a binary one (no "
                       f"{RECORD_MAGIC!r} prefix)") from None
    if not isinstance(record, dict):
      raise ValueError(f"{where}: not a JSON object")
  try:
    t = Trajectory.from_record(raw) if binary else Trajectory.from_dict(record)
    t.check()
  except (TypeError, ValueError, OverflowError) as e:
    raise ValueError(f"{where}: {e}") from None
  if len(t.tokens) == 0:
    raise ValueError(f"{where}: no tokens")
  if (t.tokens < 0).any() or (vocab_size is not None and (t.tokens >= vocab_size).any()):
    raise ValueError(f"{where}: token ids outside the vocabulary [0, {vocab_size})")
  sampled = t.behav_logp[t.loss_mask]
  if not np.isfinite(sampled).all() or (sampled > 1e-3).any():
    raise ValueError(f"{where}: behaviour log-probs must be finite and <= 0")
  if max_version is not None and (t.version[t.loss_mask] > max_version).any():
    raise ValueError(f"{where}: a token was sampled by version "
                     f"{int(t.version[t.loss_mask].max())}, beyond the newest {max_version}")
  return t
