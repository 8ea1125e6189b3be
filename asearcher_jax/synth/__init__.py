"""The QA data-synthesis agent (ASearcher §3.2.2): simple seed questions made hard by injection
and fuzzing, with quality, difficulty and answer-uniqueness verification after every change.

`synthesize` is imported on first use, so that loading a config (which holds `SynthSection`)
does not import the agent, its HTTP client and the page stores.
"""

from asearcher_jax.lazy import attach
from asearcher_jax.synth.config import LLMSection, SynthSection

__getattr__, __dir__ = attach(__name__, {"qa_row": "run", "synthesize": "run"})

__all__ = ["LLMSection", "SynthSection", "qa_row", "synthesize"]

