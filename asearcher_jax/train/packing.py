"""Packing variable-length sequences into fixed-length rows with segment ids (no padding waste
beyond each row's tail). SFT and the RL learner both train on rows made here."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def pack_sequences(seqs: Sequence[Mapping[str, np.ndarray]], row_len: int,
                   num_rows: int | None = None) -> tuple[dict[str, np.ndarray], list[int]]:
  """First-fit-decreasing packing of sequences (dicts of equal-length per-token arrays, one of
  them `tokens`) into rows of `row_len` tokens.

  Returns ([R, row_len] arrays -- every field of the inputs, plus `positions` restarting at 0
  per sequence and `segment_ids` numbering the sequences of a row from 1, 0 for padding -- and
  the row each input went to). `num_rows` fixes R (a static shape for `jax.jit`); a sequence
  longer than a row, or more sequences than `num_rows` hold, is a ValueError.
  """
  if row_len <= 0:
    raise ValueError("row_len must be positive")
  lengths = [len(s["tokens"]) for s in seqs]
  for i, n in enumerate(lengths):
    if n > row_len:
      raise ValueError(f"sequence {i} has {n} tokens, more than a row of {row_len}")
  free: list[int] = []
  where = [0] * len(seqs)
  for i in sorted(range(len(seqs)), key=lambda i: -lengths[i]):
    row = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
    if row is None:
      free.append(row_len)
      row = len(free) - 1
    free[row] -= lengths[i]
    where[i] = row
  rows = len(free) if num_rows is None else num_rows
  if len(free) > rows:
    raise ValueError(f"{len(seqs)} sequences need {len(free)} rows of {row_len}; "
                     f"only {rows} allowed")
  fields = set(seqs[0]) if seqs else {"tokens"}
  out = {k: np.zeros((rows, row_len), np.asarray(seqs[0][k]).dtype if seqs else np.int32)
         for k in fields}
  out["positions"] = np.zeros((rows, row_len), np.int32)
  out["segment_ids"] = np.zeros((rows, row_len), np.int32)
  fill = [0] * rows
  segments = [0] * rows
  for i, s in enumerate(seqs):  # input order within a row: deterministic, easy to read
    r, a, n = where[i], fill[where[i]], lengths[i]
    segments[r] += 1
    for k in fields:
      out[k][r, a:a + n] = s[k]
    out["positions"][r, a:a + n] = np.arange(n)
    out["segment_ids"][r, a:a + n] = segments[r]
    fill[r] += n
  return out, where
