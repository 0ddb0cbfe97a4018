"""hf_gqa: convert pretrained Hugging Face causal LMs to grouped-query attention in one call.

import hf_gqa
model = hf_gqa.patch(model, groups=8)   # 8 key/value heads after conversion
"""

from .architectures import get_adapter, register_adapter, supported_model_types
from .cache import GQACache, install_cache, kv_bytes_per_token
from .canonical import AttentionWeights, RotarySpec
from .describe import describe
from .errors import GQAError, GroupsError, UnconvertibleWeightsError, UnsupportedArchitectureError
from .grouping import register_grouping
from .io import from_pretrained, needs_hf_gqa_to_load
from .methods import ConversionMethod, Refine, get_method, register_merge, register_method
from .patch import is_patched, patch
from .streaming import convert_checkpoint, plan_checkpoint

__version__ = "0.1.0"


#: Loaded on first use: uptraining imports the transformers Trainer, evaluation imports lm-eval and matplotlib.
_LAZY_MODULES = ("evaluation", "training", "data", "perplexity")
_LAZY_NAMES = {"uptrain": "training", "UptrainConfig": "training", "evaluate_perplexity": "training"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module 'hf_gqa' has no attribute {name!r}")


__all__ = [
    "AttentionWeights",
    "ConversionMethod",
    "Refine",
    "UptrainConfig",
    "get_method",
    "register_method",
    "GQACache",
    "GQAError",
    "GroupsError",
    "RotarySpec",
    "UnconvertibleWeightsError",
    "UnsupportedArchitectureError",
    "convert_checkpoint",
    "describe",
    "evaluate_perplexity",
    "from_pretrained",
    "get_adapter",
    "install_cache",
    "is_patched",
    "kv_bytes_per_token",
    "needs_hf_gqa_to_load",
    "patch",
    "plan_checkpoint",
    "register_adapter",
    "register_grouping",
    "register_merge",
    "supported_model_types",
    "uptrain",
]
