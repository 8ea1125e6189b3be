"""Prompt templates: packaged files (asearcher_jax/agent/prompts/) or any file, `${name}` slots."""

from __future__ import annotations

import functools
import os
import string
from importlib import resources

from asearcher_jax.errors import ConfigError

# ASearcher's two instructions about invalid questions (prompts.py / evaluation/utils.py).
INVALID_INSTRUCTION = ("Note that when the Assistant finds the question is invalid, e.g. no answer "
                       "could match all information in the question, the Assistant replies with "
                       "'<answer> the question is invalid. </answer>'.")
VALID_INSTRUCTION = ("Note: the question is a valid question and you should try to find a "
                     "correct answer.")
ANSWER_INSTRUCTION = ("\nor <answer> answer </answer> once you are sure of it: usually fewer than "
                      "10 words; answer only after you double-check.")


def _packaged_dir():
  return resources.files("asearcher_jax.agent").joinpath("prompts")


def packaged_prompts() -> list[str]:
  """The names of the packaged prompts (asearcher_jax/agent/prompts/*.txt), in file order."""
  return [n[:-4] for n in sorted(p.name for p in _packaged_dir().iterdir()
                                 if p.name.endswith(".txt"))]


def packaged_prompt_text(name: str) -> str:
  """The text of a packaged prompt; FileNotFoundError for a name `packaged_prompts` lacks."""
  return _packaged_dir().joinpath(f"{name}.txt").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=64)
def load_template(name_or_path: str) -> string.Template:
  """A packaged prompt by name (`asearcher`, `reasoning_act`, ...) or a file path."""
  if os.path.sep in name_or_path or name_or_path.endswith(".txt"):
    path = name_or_path
    if not os.path.isfile(path):
      raise ConfigError(f"prompt file not found: {path}")
    with open(path, encoding="utf-8") as f:
      text = f.read()
  else:
    try:
      text = packaged_prompt_text(name_or_path)
    except FileNotFoundError:
      raise ConfigError(f"unknown prompt {name_or_path!r}; packaged prompts: "
                        f"{packaged_prompts()}, or give a file path") from None
  template = string.Template(text)
  if "question" not in template.get_identifiers():
    raise ConfigError(f"prompt {name_or_path!r} has no ${{question}} slot")
  return template


def render(name_or_path: str, **values: str) -> str:
  template = load_template(name_or_path)
  missing = [k for k in template.get_identifiers() if k not in values]
  if missing:
    raise ConfigError(f"prompt {name_or_path!r} needs values for {missing}")
  return template.substitute(values)
