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
      text = resources.files("asearcher_jax.agent").joinpath(
          "prompts", f"{name_or_path}.txt").read_text(encoding="utf-8")
    except FileNotFoundError:
      names = sorted(p.name[:-4] for p in resources.files("asearcher_jax.agent").joinpath(
          "prompts").iterdir() if p.name.endswith(".txt"))
      raise ConfigError(f"unknown prompt {name_or_path!r}; packaged prompts: {names}, or give a "
                        "file path") from None
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
