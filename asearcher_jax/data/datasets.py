"""Several QA datasets as one list of (dataset, item) pairs: what evaluation and the RL rollout
workers read, from JSONL files in any published format or TFDS (array_record) folders."""

from __future__ import annotations

import os
import random
from collections import Counter

from asearcher_jax.data.qa import QAItem, load_qa, source_from_path
from asearcher_jax.errors import DataError


def dataset_names(paths) -> list[str]:
  """The dataset name of each path's rows that name none: the file's ("hotpotqa" for
  hotpotqa_500.jsonl), or where several paths share one, their folder's (FlashRAG ships
  nq/test.jsonl and triviaqa/test.jsonl)."""
  names = [source_from_path(p) for p in paths]
  return [n if names.count(n) == 1
          else os.path.basename(os.path.dirname(os.path.abspath(os.path.normpath(p)))) or n
          for p, n in zip(paths, names)]


def load_datasets(paths, split: str = "test", limit: int | None = None,
                  sample_seed: int | None = None
                  ) -> tuple[list[tuple[str, QAItem]], list[str], int]:
  """(dataset name, item) pairs, the loaders' summaries, and the count of skipped rows.

  A dataset is an item's `source` (a DeepResearcher file holds several) or its file's name
  (`dataset_names`). `limit` keeps the first questions of each dataset or, with a
  `sample_seed`, a seeded random subset of them (files sorted by difficulty would otherwise
  yield only the easy ones). A question's (dataset, qid) names its episodes in traces and
  reports, so two questions under one name are a DataError, never merged.
  """
  items, notes, skipped = [], [], 0
  for path, name in zip(paths, dataset_names(paths)):
    if os.path.isdir(path):
      from asearcher_jax.data.tfds_builder import open_qa_dataset
      source = open_qa_dataset(path, split)
      rows = list(source)
      notes.append(f"{path} [{split}]: {len(rows)} questions")
    else:
      report = load_qa(path, default_source=name)
      rows, skipped = report.items, skipped + len(report.skipped)
      notes.append(report.summary())
    items.extend((it.source or name, it) for it in rows)
  clashes = [key for key, n in Counter((ds, it.qid) for ds, it in items).items() if n > 1]
  if clashes:
    ds, qid = clashes[0]
    raise DataError(f"{len(clashes)} questions are named twice, e.g. qid {qid!r} of dataset "
                    f"{ds!r}: the same file given twice, or two files' questions under one "
                    "source name")
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
