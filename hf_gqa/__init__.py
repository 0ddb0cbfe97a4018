"""hf_gqa: convert pretrained Hugging Face causal LMs to grouped-query attention in one call.

import hf_gqa
model = hf_gqa.patch(model, groups=8)   # 8 key/value heads after conversion
"""

from . import evaluation  # noqa: F401  (registers the lm-eval model "hf-gqa")
from .architectures import get_adapter, register_adapter, supported_model_types
from .cache import GQACache, install_cache, kv_bytes_per_token
from .canonical import AttentionWeights, RotarySpec
from .describe import describe
from .errors import GQAError, GroupsError, UnconvertibleWeightsError, UnsupportedArchitectureError
from .grouping import register_grouping
from .io import from_pretrained, needs_hf_gqa_to_load
from .merging import register_merge
from .patch import is_patched, patch

__version__ = "0.1.0"


def __getattr__(name: str):
    # Uptraining imports the transformers Trainer (slow): load it on first use of `hf_gqa.uptrain`.
    if name in ("uptrain", "evaluate_perplexity"):
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'hf_gqa' has no attribute {name!r}")


__all__ = [
    "AttentionWeights",
    "GQACache",
    "GQAError",
    "GroupsError",
    "RotarySpec",
    "UnconvertibleWeightsError",
    "UnsupportedArchitectureError",
    "describe",
    "evaluate_perplexity",
    "from_pretrained",
    "get_adapter",
    "install_cache",
    "is_patched",
    "kv_bytes_per_token",
    "needs_hf_gqa_to_load",
    "patch",
    "register_adapter",
    "register_grouping",
    "register_merge",
    "supported_model_types",
    "uptrain",
]
