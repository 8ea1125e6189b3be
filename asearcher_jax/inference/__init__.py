"""Decode servers: the JetStream-protocol engine, continuous batching, gRPC and HTTP fronts.

`protocol` (sampling parameters, errors, stats) is the JAX-free face that clients and the agent
import; the engine and driver load JAX on first use.
"""

from asearcher_jax.inference.protocol import QueueFullError, SamplingParams
from asearcher_jax.lazy import attach

__getattr__, __dir__ = attach(__name__, {
    "Driver": "driver", "Request": "driver",
    "DecodeState": "engine", "Engine": "engine", "Prefix": "engine", "ResultTokens": "engine",
})

__all__ = ["DecodeState", "Driver", "Engine", "Prefix", "QueueFullError", "Request",
           "ResultTokens", "SamplingParams"]
