"""The QA data-synthesis agent (ASearcher §3.2.2): simple seed questions made hard by injection
and fuzzing, with quality, difficulty and answer-uniqueness verification after every change.

`synthesize` is imported on first use, so that loading a config (which holds `SynthSection`)
does not import the agent, its HTTP client and the page stores.
"""

from __future__ import annotations

from asearcher_jax.synth.config import LLMSection, SynthSection

__all__ = ["LLMSection", "SynthSection", "qa_row", "synthesize"]


def __getattr__(name: str):
  if name in ("qa_row", "synthesize"):
    from asearcher_jax.synth import run
    return getattr(run, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
