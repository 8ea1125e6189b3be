"""The replay queue between rollout workers and the learner (see ../shared/DESIGN.md).

The queue itself needs no gRPC; the service and its clients are imported on first use, so that
`python -m asearcher_jax.replay.server` does not import its own module twice.
"""

from __future__ import annotations

import importlib

from asearcher_jax.replay.queue import Group, Lease, ReplayQueue

_LAZY = {
    "ReplayClient": "client", "SyncReplayClient": "client", "ReplayUnavailable": "client",
    "ReplayState": "client", "ReplayServer": "server", "serve": "server", "LocalReplay": "local",
}

__all__ = ["Group", "Lease", "ReplayQueue", *_LAZY]


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(f"asearcher_jax.replay.{_LAZY[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
