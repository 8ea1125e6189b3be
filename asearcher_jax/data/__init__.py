"""QA datasets: tolerant loaders for the published formats and a TF-free TFDS (array_record) store.

The TFDS names are imported lazily so that `from asearcher_jax.data import load_qa` does not pay
for (or require) tensorflow_datasets.
"""

from __future__ import annotations

from asearcher_jax.data.qa import (
    FORMATS,
    DataError,
    LoadReport,
    QAItem,
    SkippedRow,
    detect_format,
    load_qa,
)

# From tfds_builder (tensorflow_datasets-backed), imported on first use by __getattr__.
_TFDS_NAMES = ("QADataSource", "build_qa_dataset", "open_qa_dataset", "qa_features")

__all__ = [
  "FORMATS",
  "DataError",
  "LoadReport",
  "QADataSource",
  "QAItem",
  "SkippedRow",
  "build_qa_dataset",
  "detect_format",
  "load_qa",
  "open_qa_dataset",
  "qa_features",
]


def __getattr__(name: str):
  if name in _TFDS_NAMES:
    from asearcher_jax.data import tfds_builder
    return getattr(tfds_builder, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
