"""Decode servers: the JetStream-protocol engine, continuous batching, gRPC and HTTP fronts."""

from asearcher_jax.inference.driver import Driver, QueueFullError, Request
from asearcher_jax.inference.engine import DecodeState, Engine, Prefix, ResultTokens
from asearcher_jax.inference.sampling import SamplingParams

__all__ = ["DecodeState", "Driver", "Engine", "Prefix", "QueueFullError", "Request",
           "ResultTokens", "SamplingParams"]
