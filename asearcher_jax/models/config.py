"""Architecture of the Qwen2 / Qwen2.5 / Qwen3 family, and its HF config.json mapping.

One frozen (hashable) dataclass serves as the jit-static model description, the
`model.arch` section of our YAML configs, and the bridge to Hugging Face's
config.json, so the three can never disagree.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

from pydantic import ConfigDict, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from asearcher_jax.errors import ConfigError
from asearcher_jax.section import DType, Section

# How attention runs (models/attention.py) and what the backward pass recomputes (models/qwen.py);
# named here, JAX-free, because the config validates them.
AttentionImpl = Literal["auto", "xla", "cudnn", "blockwise", "pallas", "splash", "reference"]
RematPolicy = Literal["none", "full", "attention", "dots", "dots_no_batch"]
# `auto`: the first of these whose learner plan fits a device (memory_plan.resolve_remat);
# fastest first, each keeping less of the forward pass for the backward pass.
REMAT_BY_MEMORY: tuple[RematPolicy, ...] = ("none", "dots", "dots_no_batch", "attention", "full")

_STRICT = ConfigDict(extra="forbid")

# HF architecture name -> family. Qwen2.5 checkpoints declare Qwen2ForCausalLM.
ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_FAMILY_ARCH = {v: k for k, v in ARCHITECTURES.items()}


@dataclass(frozen=True, config=_STRICT)
class RopeScaling:
  """RoPE frequency scaling as in HF `rope_scaling` / `rope_parameters` (linear, yarn)."""

  type: Literal["linear", "yarn"]
  factor: float
  original_max_position_embeddings: int | None = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True


@dataclass(frozen=True, config=_STRICT)
class QwenConfig:
  """Shapes and numerics of one Qwen-family decoder."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # defaults to hidden_size // num_heads
  family: Literal["qwen2", "qwen3"] = "qwen3"
  rope_theta: float = 1_000_000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool | None = None  # Qwen2: True; Qwen3: attention_bias (False)
  o_bias: bool = False  # Qwen3 with attention_bias=True also biases o_proj
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None

  def __post_init__(self):
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ConfigError(
            f"hidden_size {self.hidden_size} is not divisible by num_heads "
            f"{self.num_heads}; set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.qkv_bias is None:
      object.__setattr__(self, "qkv_bias", self.family == "qwen2")
    # Only shapes an HF architecture has: a model that could never be exported is refused
    # here, not after an SFT run at its export (or at the first RL publish).
    if self.family == "qwen2" and (not self.qkv_bias or self.o_bias):
      raise ConfigError("qwen2 checkpoints always have q/k/v bias and no o_proj bias")
    if self.family == "qwen3" and self.qkv_bias != self.o_bias:
      raise ConfigError("qwen3 attention_bias covers q/k/v and o_proj together: set qkv_bias "
                        "and o_bias alike")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads {self.num_heads} is not a multiple of "
                        f"num_kv_heads {self.num_kv_heads}")
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

  @property
  def qk_norm(self) -> bool:
    return self.family == "qwen3"

  def num_params(self, include_embeddings: bool = True) -> int:
    e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
    q, k = self.num_heads * d, self.num_kv_heads * d
    attn = e * q + 2 * e * k + q * e
    attn += (q + 2 * k) * self.qkv_bias + e * self.o_bias
    attn += 2 * d * self.qk_norm
    layer = attn + 3 * e * f + 2 * e
    total = self.num_layers * layer + e
    if include_embeddings:
      total += self.vocab_size * e * (1 if self.tie_embeddings else 2)
    return total

  # -- Hugging Face config.json -------------------------------------------------

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "QwenConfig":
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    family = None
    for a in archs:
      family = ARCHITECTURES.get(a, family)
    if family is None and model_type in ("qwen2", "qwen3"):
      family = model_type
    if family is None:
      raise ConfigError(
          f"{source}: unsupported architecture {archs or model_type!r}; "
          f"expected one of {sorted(ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported "
                        "(Qwen uses 'silu')")
    if hf.get("use_sliding_window"):
      raise ConfigError(f"{source}: use_sliding_window=true is not supported")
    rope = dict(hf.get("rope_parameters") or {})  # transformers>=5 layout
    legacy = hf.get("rope_scaling") or {}
    kind = lambda d: d.get("rope_type") or d.get("type") or "default"
    if rope and legacy and kind(rope) != kind(legacy):
      raise ConfigError(f"{source}: rope_parameters ({kind(rope)}) and rope_scaling "
                        f"({kind(legacy)}) disagree")
    rope.update({k: v for k, v in legacy.items() if k not in rope})
    theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    scaling = None
    if rope_type != "default":
      if rope_type not in ("linear", "yarn"):
        raise ConfigError(f"{source}: rope scaling type {rope_type!r} is not supported "
                          "(default, linear, yarn)")
      try:
        scaling = RopeScaling(type=rope_type, **rope)
      except ValidationError as e:
        raise ConfigError(f"{source}: bad rope scaling: {_first_error(e)}") from None
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
      raise ConfigError(f"{source}: missing required field(s) {missing}")
    attention_bias = hf.get("attention_bias", False)
    try:
      return cls(
          vocab_size=hf["vocab_size"],
          hidden_size=hf["hidden_size"],
          intermediate_size=hf["intermediate_size"],
          num_layers=hf["num_hidden_layers"],
          num_heads=hf["num_attention_heads"],
          num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
          head_dim=hf.get("head_dim"),
          family=family,
          rope_theta=theta,
          rope_scaling=scaling,
          rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
          tie_embeddings=hf.get("tie_word_embeddings", False),
          qkv_bias=True if family == "qwen2" else attention_bias,
          o_bias=family == "qwen3" and attention_bias,
          max_position_embeddings=hf.get("max_position_embeddings", 32768),
          bos_token_id=hf.get("bos_token_id"),
          eos_token_id=hf.get("eos_token_id"),
      )
    except ValidationError as e:
      raise ConfigError(f"{source}: {_first_error(e)}") from None

  def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
    hf = {
        "architectures": [_FAMILY_ARCH[self.family]],
        "model_type": self.family,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                         else self.eos_token_id),
        "torch_dtype": torch_dtype,
    }
    if self.family == "qwen3":
      hf["attention_bias"] = bool(self.qkv_bias)
    if self.rope_scaling is not None:
      s = {k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if v is not None}
      s["rope_type"] = s.pop("type")
      if s["rope_type"] == "linear":  # YaRN's fields are not linear scaling's (HF warns)
        s = {"rope_type": "linear", "factor": s["factor"]}
      hf["rope_scaling"] = s
    return hf

  @classmethod
  def from_hf_dir(cls, path: str) -> "QwenConfig":
    return cls.from_hf_dict(read_json(os.path.join(path, "config.json")),
                            source=os.path.join(path, "config.json"))


def read_json(path: str) -> dict[str, Any]:
  """Reads a JSON object, with errors that name the file."""
  if not os.path.isfile(path):
    raise ConfigError(f"{path}: file not found")
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: malformed JSON ({e})") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def _first_error(e: ValidationError) -> str:
  err = e.errors()[0]
  loc = ".".join(str(x) for x in err["loc"])
  return f"{loc}: {err['msg']}" if loc else err["msg"]


class ModelSection(Section):
  """The policy: an HF/orbax directory, or an inline architecture initialised at random."""

  path: str | None = None
  arch: QwenConfig | None = None
  param_dtype: DType = "float32"
  dtype: DType = "bfloat16"
  attention: AttentionImpl = "auto"
  remat: RematPolicy | Literal["auto"] = "auto"
  seed: int = 0

  @model_validator(mode="after")
  def _one_source(self):
    if (self.path is None) == (self.arch is None):
      raise ValueError("set exactly one of model.path (a checkpoint) or model.arch "
                       "(an architecture to initialise at random)")
    return self
