"""A BPE tokenizer for the agent in a world: merges learned from what it will read and write there.

A byte-level tokenizer makes every name and prompt several times longer than a learned one,
and a tiny CPU policy pays for each token in decode and training time. The texts are the
world's passages, pages, URLs and questions, plus the agent's packaged prompts counted once
per question (they open every episode, so their words are as frequent as the questions).
"""

from __future__ import annotations

import glob
import os
from typing import Iterator

from asearcher_jax.errors import DataError
from asearcher_jax.jsonl import iter_rows
from asearcher_jax.models.tokenizer import QWEN_SPECIAL_TOKENS, Tokenizer, build_tokenizer

_FIELDS = ("title", "contents", "url", "question", "answer")


def _files(sources: list[str]) -> list[str]:
  files = []
  for src in sources:
    if os.path.isdir(src):
      found = sorted(glob.glob(os.path.join(src, "*.jsonl")))
      if not found:
        raise DataError(f"{src}: no .jsonl files to train a tokenizer on")
      files += found
    elif os.path.isfile(src):
      files.append(src)
    else:
      raise DataError(f"{src}: no such file or directory")
  return files


def tokenizer_texts(sources: list[str]) -> Iterator[str]:
  """Every text field of every JSONL row of `sources` (world directories or files), then the
  agent's prompts once per question seen."""
  questions = 0
  for path in _files(sources):
    for _, row, _ in iter_rows(path):
      if not isinstance(row, dict):
        continue
      for key in _FIELDS:
        if isinstance(row.get(key), str):
          questions += key == "question"
          yield row[key]
  from asearcher_jax.agent.prompts import packaged_prompt_text, packaged_prompts
  prompts = [packaged_prompt_text(name) for name in packaged_prompts()]
  for _ in range(max(1, questions)):
    yield from prompts


def train_tokenizer(sources: list[str], vocab_size: int) -> Tokenizer:
  """A byte-level BPE tokenizer of at most `vocab_size` ids, ChatML specials last: fewer when
  the texts have no pairs left to merge (numbers never merge), and the model's rows past the
  tokenizer's stay unused, as Qwen2.5's 151,936 rows hold 151,665 tokens."""
  learned = vocab_size - len(QWEN_SPECIAL_TOKENS)
  if learned < 257:
    raise DataError(f"vocab_size={vocab_size} leaves no room for merges beyond the 256 bytes")
  return build_tokenizer(tokenizer_texts(sources), vocab_size=learned)
