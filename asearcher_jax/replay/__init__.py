"""The replay queue between rollout workers and the learner (docs/contracts.md).

The queue itself needs no gRPC; the service and its clients load on first use, so that
`python -m asearcher_jax.replay.server` does not import its own module twice.
"""

from asearcher_jax.lazy import attach
from asearcher_jax.replay.queue import Group, Lease, ReplayQueue

__getattr__, __dir__ = attach(__name__, {
    "ReplayClient": "client", "SyncReplayClient": "client", "ReplayUnavailable": "client",
    "ReplayState": "client", "ReplayServer": "server", "serve": "server", "LocalReplay": "local",
})

__all__ = ["Group", "Lease", "LocalReplay", "ReplayClient", "ReplayQueue", "ReplayServer",
           "ReplayState", "ReplayUnavailable", "SyncReplayClient", "serve"]
