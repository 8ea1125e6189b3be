"""QA files -> an array_record TFDS dataset that hosts read by index, without TensorFlow.

Why TFDS: one versioned on-disk dataset (`dataset_info.json` + `features.json` + sharded
`.array_record` files) that every host opens with O(1) random access, instead of each host
re-parsing JSONL/parquet and hoping they agree on order.

The TF-free path (tensorflow-datasets 4.9.10 + array-record), checked by tests/test_data.py:
  write  `tfds.core.GeneratorBasedBuilder` subclass + `download_and_prepare(file_format=
         "array_record")`. Examples are serialised to tf.Example bytes by tfds' own protobuf
         copy (`tensorflow_datasets.proto.tf_example_pb2`), not by TF.
  read   `tfds.builder_from_directory(dir).as_data_source(split)` -> `ArrayRecordDataSource`,
         decoded by tfds' numpy example parser.
  Avoided `tfds.dataset_builders.store_as_tfds_dataset` (the adhoc builder): it tests
  `isinstance(ds, tf.data.Dataset)`, which imports TensorFlow.

Order is the input order (`disable_shuffling=True`, integer keys): split[i] is the i-th item of
the concatenated `load_qa` reports, so indices mean the same thing on every host and run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence

import tensorflow_datasets as tfds

from asearcher_jax.data.datasets import dataset_names
from asearcher_jax.data.qa import DataError, LoadReport, QAItem, load_qa
from asearcher_jax.outdir import replace_dir

log = logging.getLogger(__name__)


def qa_features() -> tfds.features.FeaturesDict:
  """The stored record: `QAItem` with `extra` as JSON text (per-format fields have no schema)."""
  return tfds.features.FeaturesDict({
      "qid": tfds.features.Text(),
      "question": tfds.features.Text(),
      "answers": tfds.features.Sequence(tfds.features.Text()),
      "aug_answers": tfds.features.Sequence(tfds.features.Text()),
      "source": tfds.features.Text(),
      "extra": tfds.features.Text(),
  })


class _QABuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes pre-loaded QA items; name/version are per instance (like tfds' AdhocBuilder)."""

  def __init__(self, *, name: str, version: str, splits: Mapping[str, list[QAItem]],
               metadata: dict, data_dir: str, progress: bool):
    self.name = name
    self.VERSION = tfds.core.Version(version)
    self._splits, self._metadata, self._progress = splits, metadata, progress
    super().__init__(data_dir=data_dir, version=version, file_format="array_record")

  # tfds looks for checksums/metadata files next to the builder's source file; ours has none, and
  # the lookup needs `importlib_resources`, which tfds does not declare on Python >= 3.9.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="Question-answer items normalised by asearcher_jax.data.",
        features=qa_features(), disable_shuffling=True,
        metadata=tfds.core.MetadataDict(self._metadata))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(items) for split, items in self._splits.items()}

  def _generate_examples(self, items: list[QAItem]) -> Iterator[tuple[int, dict]]:
    for i, it in enumerate(items):
      yield i, {"qid": it.qid, "question": it.question, "answers": list(it.answers),
                "aug_answers": list(it.aug_answers), "source": it.source,
                "extra": json.dumps(it.extra, ensure_ascii=False, sort_keys=True, default=str)}

  # tfds prints these unconditionally; keep them behind `progress` like the bars.
  def _log_download_bytes(self) -> None:
    if self._progress:
      super()._log_download_bytes()

  def _log_download_done(self) -> None:
    if self._progress:
      super()._log_download_done()


def _report_dict(r: LoadReport) -> dict:
  return {"path": os.path.abspath(r.path), "format": r.format, "items": len(r.items),
          "skipped": len(r.skipped),
          "skipped_rows": [[s.line, s.reason] for s in r.skipped[:100]],
          "duplicate_ids": r.duplicate_ids, "repeated_questions": r.repeated_questions}


def build_qa_dataset(sources: Mapping[str, Sequence[str] | str] | Sequence[str], out_dir: str,
                     name: str = "qa", version: str = "1.0.0", progress: bool = True,
                     overwrite: bool = False) -> str:
  """Load every file (any `load_qa` format, auto-detected) and write `out_dir/name/version`.

  `sources` maps split -> files (a bare list means one "train" split); files of a split are
  concatenated in the given order. Bad rows are skipped; each file's `LoadReport` summary is
  logged and kept in the dataset's `metadata.json` (see `QADataSource.metadata`). An existing
  dataset at that path is an error unless `overwrite`: tfds would silently reuse stale data.
  The new dataset is built beside the old one and swapped in once complete, so a build that
  fails leaves the old one as it was. Returns the dataset directory, which `QADataSource`
  opens.
  """
  if isinstance(sources, (str, os.PathLike)):
    sources = [sources]
  if not isinstance(sources, Mapping):
    sources = {"train": list(sources)}
  if not sources:
    raise DataError("build_qa_dataset: no splits given")
  splits: dict[str, list[QAItem]] = {}
  metadata: dict = {"splits": {}}
  for split, files in sources.items():
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    items: list[QAItem] = []
    reports = []
    for f, default_source in zip(files, dataset_names(files)):
      r = load_qa(f, default_source=default_source)
      log.info("%s: %s", split, r.summary())
      items.extend(r.items)
      reports.append(_report_dict(r))
    if not items:
      raise DataError(f"split {split!r}: no usable rows in {files}")
    splits[split] = items
    metadata["splits"][split] = reports

  builder_dir = os.path.join(os.fspath(out_dir), name, str(tfds.core.Version(version)))
  if os.path.exists(builder_dir) and not overwrite:
    raise DataError(f"{builder_dir} already exists; pass overwrite=True to rebuild it")

  os.makedirs(os.fspath(out_dir), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{name}.build-", dir=os.fspath(out_dir))
  was_active = getattr(tfds.core.utils.tqdm_utils, "_active", True)
  tfds.display_progress_bar(progress)
  try:
    builder = _QABuilder(name=name, version=version, splits=splits, metadata=metadata,
                         data_dir=staging, progress=progress)
    with tempfile.TemporaryDirectory(prefix="qa_tfds_dl_") as dl:  # nothing is downloaded
      builder.download_and_prepare(download_dir=dl)
    os.makedirs(os.path.dirname(builder_dir), exist_ok=True)
    replace_dir(os.fspath(builder.data_dir), builder_dir)
  finally:
    tfds.display_progress_bar(was_active)
    shutil.rmtree(staging, ignore_errors=True)
  return builder_dir


def _resolve_dir(path: str) -> str:
  """Accept the version dir, or `out_dir/name` (its highest version)."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  if os.path.isdir(path):
    versions = []
    for d in os.listdir(path):
      if os.path.isfile(os.path.join(path, d, "dataset_info.json")):
        try:
          versions.append((tfds.core.Version(d), d))
        except ValueError:
          pass
    if versions:
      return os.path.join(path, max(versions)[1])
  raise DataError(f"{path}: not a dataset written by build_qa_dataset (no dataset_info.json)")


class QADataSource:
  """Random-access, len()-able `QAItem`s of one split, optionally one host's shard of it.

  Host `shard_index` of `num_shards` gets split indices shard_index, shard_index + num_shards,
  ...: disjoint, sizes differ by at most one, union = the split. Strided rather than contiguous
  so every host sees the same mix of source files when a split concatenates several datasets.
  Implements the `__len__`/`__getitem__` protocol that grain's RandomAccessDataSource expects.
  """

  def __init__(self, path: str, split: str = "train", shard_index: int = 0, num_shards: int = 1):
    if num_shards < 1 or not 0 <= shard_index < num_shards:
      raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index}/{num_shards}")
    self.path = _resolve_dir(path)
    builder = tfds.builder_from_directory(self.path)
    if split not in builder.info.splits:
      raise DataError(f"{self.path}: no split {split!r}; have {sorted(builder.info.splits)}")
    self.split, self.shard_index, self.num_shards = split, shard_index, num_shards
    self.metadata = dict(builder.info.metadata or {})
    self._src = builder.as_data_source(split)
    self._indices = range(shard_index, len(self._src), num_shards)

  def __len__(self) -> int:
    return len(self._indices)

  def global_index(self, i: int) -> int:
    """Index in the whole split of this shard's item i: a stable id for logs and resumes."""
    return self._indices[i]

  def __getitem__(self, i: int) -> QAItem:
    return _decode(self._src[self._indices[i]])

  def __getitems__(self, indices: Sequence[int]) -> list[QAItem]:
    return [_decode(r) for r in self._src.__getitems__([self._indices[i] for i in indices])]

  def __iter__(self) -> Iterator[QAItem]:
    for i in range(len(self)):
      yield self[i]

  def __repr__(self) -> str:
    return (f"QADataSource({self.path!r}, split={self.split!r}, shard={self.shard_index}/"
            f"{self.num_shards}, len={len(self)})")


def open_qa_dataset(path: str, split: str = "train", shard_index: int = 0,
                    num_shards: int = 1) -> QADataSource:
  return QADataSource(path, split, shard_index, num_shards)


def _s(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _decode(rec: Mapping) -> QAItem:
  return QAItem(qid=_s(rec["qid"]), question=_s(rec["question"]),
                answers=tuple(_s(a) for a in rec["answers"]),
                aug_answers=tuple(_s(a) for a in rec["aug_answers"]), source=_s(rec["source"]),
                extra=json.loads(_s(rec["extra"])))
