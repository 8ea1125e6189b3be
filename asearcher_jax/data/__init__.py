"""QA datasets: tolerant loaders for the published formats and a TF-free TFDS (array_record) store.

The TFDS names are imported lazily so that `from asearcher_jax.data import load_qa` does not pay
for (or require) tensorflow_datasets.
"""

from asearcher_jax.data.datasets import load_datasets
from asearcher_jax.data.qa import (
    FORMATS,
    DataError,
    LoadReport,
    QAItem,
    SkippedRow,
    detect_format,
    load_qa,
)
from asearcher_jax.lazy import attach

__getattr__, __dir__ = attach(__name__, {name: "tfds_builder" for name in (
    "QADataSource", "build_qa_dataset", "open_qa_dataset", "qa_features")})

__all__ = [
  "FORMATS",
  "DataError",
  "LoadReport",
  "QADataSource",
  "QAItem",
  "SkippedRow",
  "build_qa_dataset",
  "detect_format",
  "load_datasets",
  "load_qa",
  "open_qa_dataset",
  "qa_features",
]

