"""From groups of trajectories to the learner's static-shape micro-batches.

`build_batch` does, in order: group advantages (one scalar per trajectory, broadcast onto
its loss tokens); the consume-time staleness guard; truncation of over-long sequences;
optional token-level batch normalisation of the advantages; first-fit-decreasing packing of
every sequence into rows of `row_tokens`; and padding the row count up to a multiple of
`micro_batch_rows` with empty rows (segment 0), so that each micro-batch has one static
shape, and the micro-batch count up to a power of two, so that the learner compiles only a
few step shapes (empty micro-batches cost the step nothing: it skips them).

With `ppo_n_minibatches` n > 1 the sequences are first split into n parts of near-equal token
counts, each packed and padded on its own to the same micro-batch count: PPO minibatch k is
micro-batches [k·M/n, (k+1)·M/n), and no row mixes two minibatches.

Loss-token convention (train/lm.py): loss_mask[t] marks tokens[t] as a target predicted from
t−1 in the same segment. A sequence's first token has no predecessor, so it is removed from
the loss mask here; `num_tokens` then equals exactly the number of terms the step sums.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from asearcher_jax.rl.advantages import batch_normalize, group_advantages
from asearcher_jax.rl.config import RLSection
from asearcher_jax.train.lm import loss_positions, select_width
from asearcher_jax.train.packing import pack_sequences

Array = np.ndarray | jax.Array  # host arrays as built, device arrays once sharded

if TYPE_CHECKING:  # only the record's fields are read: no import of the agent package
  from asearcher_jax.agent.trajectory import Trajectory

log = logging.getLogger(__name__)

_FIELDS = ("tokens", "loss_mask", "behav_logp", "advantages", "versions")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainBatch:
  """M micro-batches of R packed rows of T tokens: every array is [M, R, T].

  Per-token fields are aligned with `tokens` (behav_logp[t] is the log-prob of tokens[t]);
  `num_tokens` is the global loss-token count N that every micro-batch divides by.
  """

  tokens: Array  # int32
  positions: Array  # int32, restarting at 0 per segment
  segment_ids: Array  # int32, 0 = padding
  loss_mask: Array  # bool
  behav_logp: Array  # float32
  advantages: Array  # float32, 0 off the loss mask
  versions: Array  # int32, policy version of each loss token
  num_tokens: Array  # int32 scalar
  learner_version: Array  # int32 scalar: the version of the policy the step starts from
  # [M, R, C] int32 (optional): each row's positions whose target is a loss token, padded with
  # T-1 (`train.lm.loss_positions`); the step then runs the LM head on those C positions alone
  select: Array | None = None

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(self.tokens.shape)


def staleness_limit(cfg: RLSection) -> int:
  """η_tok: the largest learner_version − token_version a loss token may have."""
  return cfg.max_head_offpolicyness if cfg.max_token_staleness is None else cfg.max_token_staleness


def _check(t: Trajectory) -> None:
  """`Trajectory.check` (the queue ran it on Put; a record built in process may not have been),
  naming the trajectory: the indexing below relies on its lengths and spans."""
  try:
    t.check()
  except ValueError as e:
    raise ValueError(f"trajectory {t.qid!r}/{t.sample}: {e}") from None


def _sequences(t: Trajectory):
  if len(t.tokens) == 0:  # checked: no sequence, but seq_starts may still say [0]
    return
  yield from t.sequences()


def build_batch(groups: list[list[Trajectory]], cfg: RLSection, *,
                learner_version: int) -> tuple[TrainBatch, dict[str, Any]]:
  """Packs groups of trajectories into a `TrainBatch` (numpy arrays) and reports what it did.

  Staleness: a loss token is stale when learner_version − version > η_tok (`staleness_limit`).
  With stale_policy "drop" a group with any stale loss token is dropped whole; with "mask"
  its stale tokens leave the loss mask. A sequence longer than `row_tokens` keeps its first
  `row_tokens` tokens (the tail is cut: its loss tokens are lost, counted and logged),
  rather than failing the step. Sequences left with no loss token are not packed. `info["used"]`
  lists the indices of the groups not dropped.
  """
  limit = learner_version - staleness_limit(cfg)
  info: dict[str, Any] = collections.Counter()
  seqs: list[dict[str, np.ndarray]] = []
  used: list[int] = []  # indices of the groups not dropped: what the step trains on
  for i, group in enumerate(groups):
    for t in group:
      _check(t)
    stale = [np.asarray(t.loss_mask, bool) & (t.version < limit) for t in group]
    if cfg.stale_policy == "drop" and any(s.any() for s in stale):
      info["groups_dropped_stale"] += 1
      info["tokens_dropped_stale"] += int(sum(t.loss_mask.sum() for t in group))
      continue
    info["groups_used"] += 1
    used.append(i)
    adv = group_advantages([t.reward for t in group], cfg.adv_std_norm)
    for t, a, s in zip(group, adv, stale):
      info["trajectories"] += 1
      mask = np.asarray(t.loss_mask, bool) & ~s
      info["tokens_masked_stale"] += int(s.sum())
      for sl in _sequences(t):
        m = mask[sl].copy()
        if len(m) > cfg.row_tokens:
          info["sequences_truncated"] += 1
          info["tokens_truncated"] += int(m[cfg.row_tokens:].sum())
          sl = slice(sl.start, sl.start + cfg.row_tokens)
          m = m[:cfg.row_tokens]
        if m[0]:  # no predecessor in its segment: cannot be a target
          info["tokens_unpredictable"] += 1
          m[0] = False
        if not m.any():
          continue
        seqs.append({
            "tokens": t.tokens[sl].astype(np.int32),
            "loss_mask": m,
            "behav_logp": np.where(m, t.behav_logp[sl], 0.0).astype(np.float32),
            "advantages": np.where(m, a, 0.0).astype(np.float32),
            "versions": np.where(m, t.version[sl], 0).astype(np.int32),
        })
  if info["sequences_truncated"]:
    log.warning("build_batch: %d sequences longer than row_tokens=%d were truncated, losing %d "
                "loss tokens", info["sequences_truncated"], cfg.row_tokens,
                info["tokens_truncated"])

  if cfg.adv_batch_norm and seqs:
    flat = batch_normalize(np.concatenate([s["advantages"] for s in seqs]),
                           np.concatenate([s["loss_mask"] for s in seqs]))
    offsets = np.cumsum([0] + [len(s["tokens"]) for s in seqs])
    for s, a, b in zip(seqs, offsets[:-1], offsets[1:]):
      s["advantages"] = flat[a:b]

  parts = [_pack(p, cfg.row_tokens, cfg.micro_batch_rows)
           for p in _split(seqs, cfg.ppo_n_minibatches)]
  per_part = max(len(p["tokens"]) for p in parts)  # each a power of two of micro-batches
  rows = {k: np.concatenate([_pad_rows(p[k], per_part) for p in parts]) for k in parts[0]}
  m, r = len(rows["tokens"]) // cfg.micro_batch_rows, cfg.micro_batch_rows
  select = loss_positions(rows["segment_ids"], rows["loss_mask"],
                          multiple=_head_bucket(cfg.row_tokens))
  arrays = {k: v.reshape(m, r, cfg.row_tokens) for k, v in rows.items()}
  num_tokens = int(arrays["loss_mask"].sum())
  batch = TrainBatch(**arrays, num_tokens=np.asarray(num_tokens, np.int32),
                     learner_version=np.asarray(learner_version, np.int32),
                     select=select.reshape(m, r, -1))

  lag = learner_version - arrays["versions"][arrays["loss_mask"]]
  values, counts = np.unique(lag, return_counts=True)
  info = dict(info)
  info.update(
      groups=len(groups), sequences=len(seqs), num_tokens=num_tokens,
      tokens=int((arrays["segment_ids"] > 0).sum()), rows=m * r, head_positions=select.shape[1],
      empty_rows=int((arrays["segment_ids"].max(axis=-1) == 0).sum()), micro_batches=m,
      minibatches=cfg.ppo_n_minibatches,
      fill=float((arrays["segment_ids"] > 0).mean()),
      staleness_hist={int(v): int(c) for v, c in zip(values, counts)},
      staleness_max=int(lag.max()) if lag.size else 0, used=used)
  for k in ("groups_used", "groups_dropped_stale", "tokens_dropped_stale", "trajectories",
            "tokens_masked_stale", "sequences_truncated", "tokens_truncated",
            "tokens_unpredictable"):
    info.setdefault(k, 0)
  return batch, info


def _head_bucket(row_tokens: int) -> int:
  """`loss_positions`' rounding for the learner: an eighth of a row (a multiple of 16), so a
  run compiles at most eight head widths per micro-batch count and the head computes at most
  an eighth of a row that carries no loss."""
  return -(-row_tokens // 128) * 16


def head_widths(row_tokens: int) -> list[int]:
  """Every width C of `TrainBatch.select` that `build_batch` can give rows of `row_tokens`:
  the head shapes a learner may compile (what a warm-up compiles ahead)."""
  b = _head_bucket(row_tokens)
  return sorted({select_width(n, row_tokens, b) for n in range(1, row_tokens + 1, b)})


def _split(seqs: list[dict[str, np.ndarray]], n: int) -> list[list[dict[str, np.ndarray]]]:
  """n parts of near-equal token counts: longest first, each to the part with fewest tokens."""
  if n == 1:
    return [seqs]
  parts: list[list[dict[str, np.ndarray]]] = [[] for _ in range(n)]
  sizes = np.zeros(n, np.int64)
  for s in sorted(seqs, key=lambda s: -len(s["tokens"])):
    k = int(np.argmin(sizes))
    parts[k].append(s)
    sizes[k] += len(s["tokens"])
  return parts


def _pad_rows(v: np.ndarray, rows: int) -> np.ndarray:
  return np.concatenate([v, np.zeros((rows - len(v),) + v.shape[1:], v.dtype)])


def _pack(seqs: list[dict[str, np.ndarray]], row_tokens: int,
          micro_batch_rows: int) -> dict[str, np.ndarray]:
  """[R, T] rows (every field plus positions and segment_ids): R / `micro_batch_rows` is a
  power of two (the step skips empty micro-batches, so the padding costs no compute and a
  learner compiles O(log) step shapes); an empty batch is one micro-batch of empty rows."""
  if not seqs:
    dtypes = {"tokens": np.int32, "loss_mask": bool, "behav_logp": np.float32,
              "advantages": np.float32, "versions": np.int32, "positions": np.int32,
              "segment_ids": np.int32}
    return {k: np.zeros((micro_batch_rows, row_tokens), d) for k, d in dtypes.items()}
  rows, _ = pack_sequences(seqs, row_tokens)
  m = -(-len(rows["tokens"]) // micro_batch_rows)
  return {k: _pad_rows(v, (1 << (m - 1).bit_length()) * micro_batch_rows)
          for k, v in rows.items()}


def shard_batch(batch: TrainBatch, mesh: Mesh) -> TrainBatch:
  """Puts the batch on `mesh`: rows (axis 1) over ("data", "fsdp") when they divide evenly,
  replicated otherwise; the scalars replicated."""
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = ("data", "fsdp") if batch.tokens.shape[1] % n == 0 else None
  arrays = NamedSharding(mesh, P(None, rows))
  scalar = NamedSharding(mesh, P())
  shardings = dataclasses.replace(jax.tree.map(lambda _: arrays, batch), num_tokens=scalar,
                                  learner_version=scalar)
  return jax.device_put(batch, shardings)
