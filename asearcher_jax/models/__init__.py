"""The policy: Qwen2 / Qwen2.5 / Qwen3 in Flax NNX, its checkpoints and tokenizer."""

from asearcher_jax.models.config import QwenConfig, RopeScaling
from asearcher_jax.models.pretrained import (
                                             abstract_model,
                                             create_model,
                                             flat_params,
                                             from_pretrained,
                                             param_shardings,
                                             save_pretrained,
                                             with_params,
)
from asearcher_jax.models.qwen import KVCache, Qwen
from asearcher_jax.models.tokenizer import Tokenizer, build_tokenizer

__all__ = [
    "KVCache", "Qwen", "QwenConfig", "RopeScaling", "Tokenizer", "abstract_model",
    "build_tokenizer", "create_model", "flat_params", "from_pretrained", "param_shardings",
    "save_pretrained", "with_params",
]
