"""Sizes and knobs of the synthetic knowledge world, as a frozen pydantic section.

Defaults give the single-host debug world: a few thousand passages and a few
thousand questions, generated in about a second, so it is built into a cache
directory at first use instead of being shipped as data files.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from asearcher_jax.section import Section


class WorldConfig(Section):

  seed: int = 0
  num_people: int = Field(400, ge=4)
  num_cities: int = Field(80, ge=4)
  num_countries: int = Field(16, ge=2)
  num_orgs: int = Field(80, ge=4)
  num_works: int = Field(160, ge=2)
  # Near-duplicate names (one letter changed, shared first name, same occupation): makes a
  # retriever and the agent tell "Alen Varro" from "Alen Varrow".
  distractor_fraction: float = Field(0.25, ge=0.0, le=1.0)
  filler_sentences: int = Field(6, ge=0, description="per page, beyond the entity's facts")
  # Each passage states 1..N facts of its entity. With 1 and one hit per search (agent.topk=1)
  # a search's result is exactly one sentence: a policy trained from scratch in minutes learns
  # to copy that sentence long before it learns to pick the one that answers out of several.
  max_facts_per_passage: int = Field(2, ge=1)
  min_hops: int = Field(1, ge=1)
  max_hops: int = Field(4, ge=1, le=32)
  questions_per_hop: int = Field(600, ge=1)
  test_fraction: float = Field(0.15, gt=0.0, lt=1.0)
  url_prefix: str = "https://world.local/wiki/"

  @model_validator(mode="after")
  def _consistent(self) -> WorldConfig:
    if self.min_hops > self.max_hops:
      raise ValueError(f"min_hops={self.min_hops} > max_hops={self.max_hops}")
    if self.num_cities < self.num_countries:
      raise ValueError(f"num_cities={self.num_cities} < num_countries={self.num_countries}: "
                       f"every country needs a city for its capital")
    return self


# Named worlds for `asearcher world build --preset NAME`.
PRESETS: dict[str, dict] = {
    # The single-host debug world (WorldConfig()): ~740 entities, ~2k passages, ~740 pages,
    # 1,715 train / 434 held-out questions of 1-4 hops (split by final fact, drawn per final
    # relation; questions that touch a held-out fact are dropped from train); about 0.15 s to
    # generate.
    "debug": {},
    # Long chains (up to 16 hops) for long-horizon work: ~7k entities, ~20k passages,
    # ~8k train / ~2k held-out questions (long chains often touch a held-out fact and are
    # dropped from train); about 3 s to generate.
    "long_horizon": {"num_people": 4000, "num_cities": 800, "num_countries": 60,
                     "num_orgs": 800, "num_works": 1600, "distractor_fraction": 0.3,
                     "max_hops": 16, "questions_per_hop": 1000, "test_fraction": 0.1},
}


def preset(name: str, **overrides) -> WorldConfig:
  from asearcher_jax.errors import ConfigError
  if name not in PRESETS:
    raise ConfigError(f"unknown world preset {name!r} (have {', '.join(PRESETS)})")
  return WorldConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


def load_world_config(path: str, **overrides) -> WorldConfig:
  """A WorldConfig from a YAML file of its fields, with keyword overrides on top."""
  import yaml
  from pydantic import ValidationError

  from asearcher_jax.errors import ConfigError
  try:
    with open(path) as f:
      data = yaml.safe_load(f) or {}
  except (OSError, yaml.YAMLError) as e:
    raise ConfigError(f"{path}: cannot read world config ({e})") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: expected a mapping of WorldConfig fields")
  data.update({k: v for k, v in overrides.items() if v is not None})
  try:
    return WorldConfig(**data)
  except ValidationError as e:
    raise ConfigError(f"{path}: {e}") from None
