"""The `synth:` section: the QA synthesis agent's endpoints, sources, loop limits and outputs.

Defaults follow ASearcher's agent where it states them (QwQ at T 0.8 / top-p 0.95 for actions,
8 tool-free answers at T 0.6 for difficulty, at most 3 variants per seed, 50k-character pages);
its 16 rounds per seed become `max_actions: 8` here, a cheaper default for small models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from asearcher_jax.reward.config import EndpointSection
from asearcher_jax.section import Section


class LLMSection(EndpointSection):
  """An OpenAI-compatible `/chat/completions` endpoint: our decode server or an external one."""

  temperature: float = Field(0.8, ge=0.0)
  max_tokens: int = Field(2048, ge=1)
  timeout_s: float = Field(300.0, gt=0.0)  # per request
  concurrency: int = Field(32, ge=1)  # requests in flight to this endpoint


class SynthSection(Section):

  llm: LLMSection = LLMSection()  # chooses and performs actions, judges quality and answers
  solver: LLMSection | None = None  # answers without tools (difficulty); None: `llm`
  solver_temperature: float = Field(0.6, ge=0.0)  # used for solving, not solver.temperature
  prompts_dir: str | None = None  # *.txt here replace the packaged prompts of the same name

  # Sources. Pages: a pages JSONL (url, title, contents, links) or an index directory built
  # with --pages; None: the pages of `world_dir`, else of the config's `world:` (built on use).
  world_dir: str | None = None
  pages: str | None = None
  corpus: str | None = None  # resolves passage-id supporting facts; default: the world's
  seeds: tuple[str, ...] = ()  # QA files (any loader format) whose supporting pages resolve
  seed_pages: str | None = None  # JSONL rows {url or title, fact?}
  random_pages: int = Field(0, ge=0)  # seeds drawn at random from the pages
  limit: int | None = Field(None, ge=1)  # seeds at most, in order (drops before it count)

  # The loop.
  max_actions: int = Field(8, ge=1)  # rounds per seed (each proposes one action)
  min_actions: int = Field(1, ge=0)  # accepted actions before a variant may be kept
  variants_per_seed: int = Field(3, ge=1)  # k: the last k hard variants of a seed are kept
  neighbour_tries: int = Field(3, ge=1)  # linked pages tried per injection
  max_page_chars: int = Field(50_000, ge=1000)  # page text shown to the LLM

  # Verification.
  verifier: Literal["llm", "world"] = "llm"  # world: exact groundedness and uniqueness
  quality_judge: bool = True  # also ask the LLM whether the question is clear and valid
  difficulty_samples: int = Field(8, ge=1)  # tool-free answers; hard when none is right
  # em: exact match; f1: set-F1 >= f1_threshold or the gold inside the answer (cover EM);
  # judge: reward.judge's endpoint.
  answer_check: Literal["em", "f1", "judge"] = "f1"
  f1_threshold: float = Field(0.8, gt=0.0, le=1.0)

  concurrency: int = Field(16, ge=1)  # seeds in flight
  seed: int = 0
  out_dir: str | None = None  # default <run.output_dir>/synth
  source_name: str = "synthetic"  # the `source` field of written items

  @model_validator(mode="after")
  def _one_page_source(self) -> SynthSection:
    if self.pages is not None and self.world_dir is not None:
      raise ValueError("set at most one of synth.pages and synth.world_dir")
    return self
