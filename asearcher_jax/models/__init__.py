"""The policy: Qwen2 / Qwen2.5 / Qwen3 in Flax NNX, its checkpoints and tokenizer.

The architecture config and the tokenizer are JAX-free (a client or a config loader imports
them); the model and its checkpoints load JAX on first use.
"""

from asearcher_jax.lazy import attach
from asearcher_jax.models.config import QwenConfig, RopeScaling
from asearcher_jax.models.tokenizer import Tokenizer, build_tokenizer

__getattr__, __dir__ = attach(__name__, {
    "KVCache": "qwen", "Qwen": "qwen",
    **{name: "pretrained" for name in (
        "abstract_model", "create_model", "from_pretrained", "load_policy", "save_pretrained")},
    **{name: "params" for name in ("flat_params", "param_shardings", "with_params")},
})

__all__ = [
    "KVCache", "Qwen", "QwenConfig", "RopeScaling", "Tokenizer", "abstract_model",
    "build_tokenizer", "create_model", "flat_params", "from_pretrained", "load_policy",
    "param_shardings", "save_pretrained", "with_params",
]
