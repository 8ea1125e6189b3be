"""Tokenizer from an HF directory (tokenizer.json via `tokenizers`) and Jinja chat templates.

Chat templates render the way transformers renders them (sandboxed Jinja,
trim_blocks/lstrip_blocks, `raise_exception`, `tojson`), so prompts built
here tokenize to the ids the model was trained on.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from datetime import datetime
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from asearcher_jax.errors import ConfigError
from asearcher_jax.models.config import read_json

# ChatML, the format of Qwen chat models; used for tokenizers this project builds.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (its tokenizer.json): words with one leading non-letter, and every
# digit alone, so a tokenizer trained here splits text as the Qwen checkpoints do and spends no
# merges on numbers (GPT-2's split gave the debug world's tokenizer 744 number tokens).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# What travels with a tokenizer between HF directories (generation_config.json carries the
# eos ids and sampling defaults a model is served with).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
                   "generation_config.json")


def copy_tokenizer_files(src: str, dst: str) -> None:
  for f in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, f)):
      shutil.copy2(os.path.join(src, f), os.path.join(dst, f))


class Tokenizer:
  """Encode/decode with exact ids, plus the checkpoint's chat template. One read from a
  directory (`source_dir`) saves that directory's other tokenizer files with its own."""

  def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any] | None = None,
               chat_template: str | None = None):
    self.hf = tokenizer
    self.config = dict(config or {})
    template = chat_template or self.config.get("chat_template")
    # Named templates, as transformers saves several: "default", and "tool_use" for requests
    # with tools where there is one.
    self.chat_templates: dict[str, str] = {}
    if isinstance(template, list):
      self.chat_templates = {t["name"]: t["template"] for t in template
                             if isinstance(t, dict) and {"name", "template"} <= t.keys()}
      template = self.chat_templates.get("default")  # none: an error only when rendering
    self.chat_template = template
    self.eos_token = _token_str(self.config.get("eos_token"))
    self.pad_token = _token_str(self.config.get("pad_token"))
    self.bos_token = _token_str(self.config.get("bos_token"))
    self.source_dir: str | None = None
    self.generation_eos: tuple[int, ...] = ()  # generation_config.json's eos_token_id

  @classmethod
  def from_dir(cls, path: str) -> "Tokenizer":
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
      raise ConfigError(f"{tj}: file not found (a tokenizer.json is required)")
    try:
      tok = HFTokenizer.from_file(tj)
    except Exception as e:  # tokenizers raises a bare Exception on bad files
      raise ConfigError(f"{tj}: cannot parse tokenizer ({e})") from None
    cfg_path = os.path.join(path, "tokenizer_config.json")
    config = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    template = None
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
      with open(jinja_path) as f:
        template = f.read()
    out = cls(tok, config, template)
    out.source_dir = path
    gen_path = os.path.join(path, "generation_config.json")
    eos = read_json(gen_path).get("eos_token_id") if os.path.isfile(gen_path) else None
    eos = eos if isinstance(eos, list) else [eos]
    out.generation_eos = tuple(i for i in eos if isinstance(i, int) and not isinstance(i, bool))
    return out

  def save(self, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    if self.source_dir and os.path.realpath(self.source_dir) != os.path.realpath(path):
      copy_tokenizer_files(self.source_dir, path)  # then its own two files over them
    self.hf.save(os.path.join(path, "tokenizer.json"))
    config = dict(self.config)
    if self.chat_templates:
      config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_templates.items()]
    elif self.chat_template:
      config["chat_template"] = self.chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)

  @property
  def vocab_size(self) -> int:
    return self.hf.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self.hf.token_to_id(token)

  @property
  def eos_id(self) -> int | None:
    return None if self.eos_token is None else self.token_to_id(self.eos_token)

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every id that ends a message: the tokenizer's EOS and generation_config.json's (Qwen2.5
    Instruct ends on <|im_end|> and on <|endoftext|>, as HF `generate` does)."""
    own = () if self.eos_id is None else (self.eos_id,)
    return tuple(dict.fromkeys(own + self.generation_eos))

  @property
  def pad_id(self) -> int | None:
    return None if self.pad_token is None else self.token_to_id(self.pad_token)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_bytes(self, token_id: int) -> bytes:
    """The exact bytes one token stands for (OpenAI's log-prob `bytes`). A byte-level BPE piece
    may hold part of a multi-byte character, which `decode([id])` shows as U+FFFD."""
    piece = self.hf.id_to_token(token_id)
    if piece is None:
      return b""
    if token_id not in self._added_ids:
      if self._byte_level and all(c in _UNICODE_TO_BYTE for c in piece):
        return bytes(_UNICODE_TO_BYTE[c] for c in piece)
      if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
        try:
          return bytes([int(piece[3:5], 16)])
        except ValueError:
          pass
    return self.decode([token_id]).encode()

  @functools.cached_property
  def _byte_level(self) -> bool:
    decoder = json.loads(self.hf.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds

  @functools.cached_property
  def _added_ids(self) -> frozenset[int]:
    return frozenset(self.hf.get_added_tokens_decoder())

  def apply_chat_template(self, messages: list[dict[str, Any]], *,
                          add_generation_prompt: bool = True, tools: list | None = None,
                          **kwargs) -> str:
    if not self.chat_template:
      named = f" (its named templates {sorted(self.chat_templates)} have no 'default')" if (
          self.chat_templates) else ""
      raise ConfigError("this tokenizer has no chat template (tokenizer_config.json "
                        f"'chat_template' or chat_template.jinja){named}")
    template = self.chat_templates.get("tool_use") if tools else None
    return _compile(template or self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
        bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)


def _token_str(tok) -> str | None:
  if isinstance(tok, dict):  # AddedToken serialisation
    return tok.get("content")
  return tok


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}
_TEMPLATES: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
  if source not in _TEMPLATES:

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
      return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                        sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    _TEMPLATES[source] = env.from_string(source)
  return _TEMPLATES[source]


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512,
                    special_tokens: Sequence[str] = QWEN_SPECIAL_TOKENS) -> Tokenizer:
  """A byte-level BPE tokenizer in Qwen's style (ChatML specials and template).

  With `texts`, merges are learned up to `vocab_size`; without, it is the
  256-byte alphabet alone. Either way every string round-trips exactly.
  """
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  if texts is None:
    model = models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[])
  else:
    model = models.BPE()
  tok = HFTokenizer(model)
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  if texts is not None:
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
  tok.add_special_tokens(list(special_tokens))
  config = {"eos_token": special_tokens[-1] if special_tokens else None,
            "pad_token": special_tokens[0] if special_tokens else None,
            "bos_token": None, "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 131072}
  return Tokenizer(tok, config, CHATML_TEMPLATE)


# Where a policy checkpoint (models/pretrained.py) keeps its tokenizer files.
TOKENIZER_SUBDIR = "tokenizer"


def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def tokenizer_dir(path: str) -> str | None:
  """Where the tokenizer files of an HF directory or a policy checkpoint are (None: a policy
  checkpoint saved without them). Reads no checkpoint, so a JAX-free client can use it."""
  if is_hf_dir(path):
    return path
  tok = os.path.join(os.path.abspath(path), TOKENIZER_SUBDIR)
  return tok if os.path.isdir(tok) else None


def policy_tokenizer(model, override: str | None = None, *, required: bool = True
                     ) -> Tokenizer | None:
  """The tokenizer of the policy a `model:` section names: `override` (e.g. `eval.tokenizer`),
  else model.path's, else (a random `model.arch`, as `asearcher serve` runs it) the byte-level
  default; when not `required` (an OpenAI backend: the agent can work in text) None instead of
  that default."""
  path = override
  if path is None and model.path:
    path = tokenizer_dir(model.path)
    if path is None and required:  # a default tokenizer would not be the policy's
      raise ConfigError(f"{model.path}: no tokenizer (neither an HF directory nor a policy "
                        f"checkpoint with a {TOKENIZER_SUBDIR}/ folder)")
  if path:
    return Tokenizer.from_dir(path)
  return None if not required or model.path else build_tokenizer()
