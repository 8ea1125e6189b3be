"""Several QA datasets as one list of (dataset, item) pairs: what evaluation and the RL rollout
workers read, from JSONL files in any published format or TFDS (array_record) folders."""

from __future__ import annotations

import os
import random

from asearcher_jax.data.qa import QAItem, load_qa


def load_datasets(paths, split: str = "test", limit: int | None = None,
                  sample_seed: int | None = None
                  ) -> tuple[list[tuple[str, QAItem]], list[str], int]:
  """(dataset name, item) pairs, the loaders' summaries, and the count of skipped rows.

  A dataset is an item's `source` (a DeepResearcher file holds several) or its file's name.
  `limit` keeps the first questions of each dataset or, with a `sample_seed`, a seeded random
  subset of them (files sorted by difficulty would otherwise yield only the easy ones).
  """
  items, notes, skipped = [], [], 0
  for path in paths:
    if os.path.isdir(path):
      from asearcher_jax.data.tfds_builder import open_qa_dataset
      source = open_qa_dataset(path, split)
      rows = list(source)
      notes.append(f"{path} [{split}]: {len(rows)} questions")
    else:
      report = load_qa(path)
      rows, skipped = report.items, skipped + len(report.skipped)
      notes.append(report.summary())
    stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    items.extend((it.source or stem, it) for it in rows)
  if limit is not None:
    order = list(range(len(items)))
    if sample_seed is not None:
      random.Random(sample_seed).shuffle(order)
    seen: dict[str, int] = {}
    keep = set()
    for i in order:
      ds = items[i][0]
      seen[ds] = seen.get(ds, 0) + 1
      if seen[ds] <= limit:
        keep.add(i)
    items = [x for i, x in enumerate(items) if i in keep]  # in file order
  return items, notes, skipped
