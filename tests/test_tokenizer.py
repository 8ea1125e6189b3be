"""Tokenizer files and chat templates, against transformers' own loader."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from asearcher_jax.errors import ConfigError
from asearcher_jax.models import Tokenizer, build_tokenizer

MESSAGES = [{"role": "system", "content": "You are a search agent."},
            {"role": "user", "content": "Who founded Qarth? <search> x </search> héllo"}]


def test_byte_level_tokenizer_round_trips_any_text():
  tok = build_tokenizer()
  text = "naïve café ☕ <|im_start|>user\n\tindent  two  spaces<|im_end|>"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.token_to_id("<|im_end|>") in ids and tok.eos_id == tok.token_to_id("<|im_end|>")


@pytest.mark.parametrize("trained", [False, True])
def test_token_bytes_are_exact_even_for_part_of_a_character(trained):
  """OpenAI's log-prob `bytes`: per token, the bytes it stands for; together, the text's UTF-8."""
  text = "naïve café ☕ 北京 Trenton–Mercer<|im_end|>"
  tok = build_tokenizer([text] * 20, vocab_size=300) if trained else build_tokenizer()
  ids = tok.encode(text)
  pieces = [tok.token_bytes(i) for i in ids]
  assert b"".join(pieces) == text.encode()
  if not trained:  # the byte-level alphabet splits every multi-byte character
    assert any("\ufffd" in tok.decode([i]) for i in ids)
  assert tok.token_bytes(tok.eos_id) == b"<|im_end|>"


def test_trained_bpe_compresses_its_corpus():
  corpus = ["the capital of Arvenia is Dusk Harbor"] * 40
  tok = build_tokenizer(corpus, vocab_size=320)
  assert len(tok.encode(corpus[0])) < len(build_tokenizer().encode(corpus[0])) / 2
  assert tok.decode(tok.encode(corpus[0])) == corpus[0]


# The pre_tokenizer of Qwen2 / Qwen2.5's tokenizer.json, as the checkpoints ship it.
QWEN2_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
        "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")},
     "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}


def test_trained_bpe_splits_text_as_qwen2_does(tmp_path):
  """Qwen2's split: a number is its digits however often it occurs; words still merge, with
  their leading space."""
  corpus = ["Jor Jorwyn was born in the year 1959. <search> Jorwyn </search>"] * 200
  tok = build_tokenizer(corpus, vocab_size=400)
  pieces = [tok.token_bytes(i) for i in tok.encode(corpus[0])]
  assert b"".join(pieces) == corpus[0].encode()
  assert pieces[pieces.index(b" ") + 1:][:4] == [b"1", b"9", b"5", b"9"]
  assert b" Jorwyn" in pieces and b" born" in pieces
  tok.save(str(tmp_path))
  saved = json.loads((tmp_path / "tokenizer.json").read_text())["pre_tokenizer"]
  # every field Qwen2's file sets, equal; fields a newer `tokenizers` may add are not compared
  assert {**saved, "pretokenizers": [{k: v for k, v in p.items() if k in q} for p, q in zip(
      saved["pretokenizers"], QWEN2_PRE_TOKENIZER["pretokenizers"])]} == QWEN2_PRE_TOKENIZER


def test_saved_tokenizer_matches_transformers(tmp_path):
  tok = build_tokenizer(["alpha beta gamma delta"] * 20, vocab_size=300)
  tok.save(str(tmp_path))
  ours = Tokenizer.from_dir(str(tmp_path))
  hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
  text = ours.apply_chat_template(MESSAGES, add_generation_prompt=True)
  assert text == hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
  assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
  assert text.endswith("<|im_start|>assistant\n")


def test_template_features_transformers_templates_use(tmp_path):
  template = ("{% for m in messages %}{% if m['role'] == 'bad' %}"
              "{{ raise_exception('bad role') }}{% endif %}{{ m['content'] | tojson }}"
              "{% endfor %}")
  tok = build_tokenizer()
  tok.chat_template = template
  assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '"é"'
  with pytest.raises(Exception, match="bad role"):
    tok.apply_chat_template([{"role": "bad", "content": ""}])


def test_missing_or_broken_tokenizer_json(tmp_path):
  with pytest.raises(ConfigError, match="tokenizer.json: file not found"):
    Tokenizer.from_dir(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ConfigError, match="cannot parse tokenizer"):
    Tokenizer.from_dir(str(tmp_path))


# The constructs real Qwen2.5/Qwen3 templates use: whitespace control, namespace(), loop
# variables, attribute access on dicts, tools rendered with tojson, string methods.
QWEN_STYLE_TEMPLATE = """
{%- if tools %}
  {{- '<|im_start|>system\\n' }}
  {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
  {{- '# Tools\\n<tools>' }}
  {%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
  {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
  {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{%- if m.role == 'user' %}
  {%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
  {%- if m.role == 'system' and loop.first %}
  {%- elif m.role == 'assistant' and '</think>' in m.content %}
    {{- '<|im_start|>assistant\\n' + m.content.split('</think>')[-1].lstrip('\\n')
        + '<|im_end|>\\n' }}
  {%- else %}
    {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def test_qwen_style_template_renders_like_transformers(tmp_path):
  tok = build_tokenizer()
  tok.chat_template = QWEN_STYLE_TEMPLATE
  tok.save(str(tmp_path))
  hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
  tools = [{"type": "function", "function": {"name": "search", "parameters": {"q": "str"}}}]
  conversation = MESSAGES + [{"role": "assistant", "content": "<think>hm</think>\n\nDusk"},
                             {"role": "user", "content": "Sure?"}]
  for kw in ({"tools": tools}, {}):
    ours = Tokenizer.from_dir(str(tmp_path)).apply_chat_template(conversation, **kw)
    assert ours == hf.apply_chat_template(conversation, tokenize=False,
                                          add_generation_prompt=True, **kw)
  assert "<think>" not in ours and '"name": "search"' not in ours


def test_policy_tokenizer_is_the_policys_or_says_why_not(tmp_path):
  """The one tokenizer rule: an override, else model.path's (an HF directory or a policy
  checkpoint's tokenizer/ folder), else for a random model.arch the byte-level default; a policy
  without one is an error where the tokenizer is needed, never a silent default."""
  from asearcher_jax.models.config import ModelSection, QwenConfig
  from asearcher_jax.models.tokenizer import TOKENIZER_SUBDIR, policy_tokenizer
  learned = build_tokenizer(["alpha beta gamma delta"] * 50, vocab_size=300)
  ckpt = tmp_path / "ckpt"
  learned.save(str(ckpt / TOKENIZER_SUBDIR))
  found = policy_tokenizer(ModelSection(path=str(ckpt)))
  assert found.encode("alpha beta") == learned.encode("alpha beta")
  bare = ModelSection(path=str(tmp_path / "no_tokenizer"))
  with pytest.raises(ConfigError, match="no tokenizer"):
    policy_tokenizer(bare)
  assert policy_tokenizer(bare, required=False) is None  # an OpenAI backend works in text
  assert policy_tokenizer(bare, str(ckpt / TOKENIZER_SUBDIR)).vocab_size == learned.vocab_size
  arch = QwenConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=16)
  assert policy_tokenizer(ModelSection(arch=arch)).vocab_size == build_tokenizer().vocab_size


def test_a_read_tokenizer_saves_its_generation_config_and_ends_on_its_eos_ids(tmp_path):
  """`asearcher sft` exports through `Tokenizer.save`: the source's generation_config.json
  (Qwen2.5 Instruct: eos [<|im_end|>, <|endoftext|>], its sampling defaults) was dropped, and
  serving stopped on the tokenizer's one EOS only."""
  from transformers import GenerationConfig
  src, out = tmp_path / "src", tmp_path / "out"
  build_tokenizer().save(str(src))
  tok = Tokenizer.from_dir(str(src))
  im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
  assert tok.eos_ids == (im_end,)
  (src / "generation_config.json").write_text(json.dumps(
      {"eos_token_id": [im_end, eot], "temperature": 0.7}))
  tok = Tokenizer.from_dir(str(src))
  assert tok.eos_ids == (im_end, eot)
  tok.save(str(out))
  gen = GenerationConfig.from_pretrained(str(out))
  assert gen.eos_token_id == [im_end, eot] and gen.temperature == 0.7


def test_named_chat_templates_render_as_transformers_does(tmp_path):
  tok = build_tokenizer()
  tok.save(str(tmp_path))
  cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
  cfg["chat_template"] = [{"name": "default", "template": cfg["chat_template"]},
                          {"name": "tool_use", "template": "TOOLS {{ tools | length }}"}]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
  ours = Tokenizer.from_dir(str(tmp_path))
  hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
  assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(
      MESSAGES, add_generation_prompt=True, tokenize=False)
  tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
  assert ours.apply_chat_template(MESSAGES, tools=tools) == "TOOLS 1" == hf.apply_chat_template(
      MESSAGES, tools=tools, add_generation_prompt=True, tokenize=False)


def test_named_chat_templates_without_a_default_load_and_fail_only_when_rendering(tmp_path):
  """transformers loads such a tokenizer and refuses only apply_chat_template; encoding (SFT,
  RL) never renders a template."""
  tok = build_tokenizer()
  tok.save(str(tmp_path))
  cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
  cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
  ours = Tokenizer.from_dir(str(tmp_path))
  assert ours.decode(ours.encode("hello")) == "hello"
  with pytest.raises(ConfigError, match="have no 'default'"):
    ours.apply_chat_template(MESSAGES)
