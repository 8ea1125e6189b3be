"""Errors a user can act on: each names the file, tensor or axis at fault."""


class AsearcherError(Exception):
  """Base class; the CLI prints these without a traceback."""


class ConfigError(AsearcherError):
  """A YAML config, an override or a config.json is wrong."""


class CheckpointError(AsearcherError):
  """A checkpoint directory is missing, incomplete or does not match the model."""


class ShardingError(AsearcherError):
  """A mesh does not fit the devices or does not divide a tensor."""


class RetrievalError(AsearcherError):
  """A corpus, pages file or search index is missing, corrupt or does not match its manifest."""


class DataError(AsearcherError, ValueError):
  """A QA file cannot be read at all (missing, unknown format); bad rows are reported instead."""
