"""More natively-GQA families: Mistral, Qwen2, Qwen3, Gemma, Gemma2, Phi (with and without `qk_layernorm`),
Phi-3 (fused `qkv_proj`) and OLMo.

The references below overwrite K/V heads in each family's own weight layout, without hf_gqa.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    MistralConfig,
    OlmoConfig,
    Phi3Config,
    PhiConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from . import TINY, FamilyCase, group_mean_heads

MHA = dict(num_attention_heads=8, num_key_value_heads=8)
GQA = dict(num_attention_heads=8, num_key_value_heads=4)


def _make(config_cls: type[PretrainedConfig], attn: str = "sdpa", **kw) -> Callable[[], PreTrainedModel]:
    def make() -> PreTrainedModel:
        torch.manual_seed(0)
        config = config_cls(**TINY, intermediate_size=128, **kw)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()

    return make


def _mean_rows_(linear: nn.Linear, start: int, heads: int, head_dim: int, groups: int) -> None:
    """Replace rows `[start, start + heads * head_dim)` of `linear` (weight and bias), one `head_dim` block a
    head, by the mean of their group of `heads // groups` consecutive heads, in place."""
    rows = slice(start, start + heads * head_dim)
    with torch.no_grad():
        linear.weight[rows] = group_mean_heads(linear.weight[rows], heads, groups)
        if linear.bias is not None:
            linear.bias[rows] = group_mean_heads(linear.bias[rows], heads, groups)


def separate_reference(model: nn.Module, groups: int) -> None:
    """Mean-pool the K/V heads of every attention module with separate `k_proj` / `v_proj` linears under `model`
    (a whole model or any of its submodules)."""
    for module in model.modules():
        if isinstance(getattr(module, "k_proj", None), nn.Linear) and hasattr(module, "head_dim"):
            for linear in (module.k_proj, module.v_proj):
                heads = linear.out_features // module.head_dim
                _mean_rows_(linear, 0, heads, module.head_dim, groups)


def phi3_reference(model: nn.Module, groups: int) -> None:
    """Mean-pool the K and V row blocks of every Phi-3 fused `qkv_proj` (rows `[q (H*d) | k (K*d) | v (K*d)]`)
    under `model` (a whole model or any of its submodules)."""
    for module in model.modules():
        if isinstance(getattr(module, "qkv_proj", None), nn.Linear):
            d, heads, kv_heads = (
                module.head_dim,
                module.config.num_attention_heads,
                module.num_key_value_heads,
            )
            _mean_rows_(module.qkv_proj, heads * d, kv_heads, d, groups)
            _mean_rows_(module.qkv_proj, (heads + kv_heads) * d, kv_heads, d, groups)


def _native(name: str, make: Callable[[], PreTrainedModel], kv_heads: int, reference=separate_reference):
    return FamilyCase(
        name,
        make,
        reference,
        groups=[4, 2, 1] if kv_heads == 8 else [2, 1],
        kv_heads=kv_heads,
        num_heads=8,
        native_gqa=True,
    )


GEMMA2 = dict(
    head_dim=8,
    query_pre_attn_scalar=16,
    sliding_window=4,
    attn_logit_softcapping=1.0,
    final_logit_softcapping=30.0,
    initializer_range=0.1,
)
"""Gemma2 with layers `[sliding_attention, full_attention]`, a window shorter than the test prompts, a scale that is
not `head_dim ** -0.5`, and attention logits large enough (`initializer_range`) and capped hard enough for the
soft-capping to change the logits by about 0.3. transformers runs Gemma2 on eager
attention only (`_supports_sdpa = False`: SDPA has no soft-capping)."""

CASES = [
    _native("mistral-mha", _make(MistralConfig, **MHA, head_dim=8), kv_heads=8),
    _native("mistral-gqa", _make(MistralConfig, **GQA, head_dim=8, sliding_window=6), kv_heads=4),
    _native("qwen2-mha", _make(Qwen2Config, **MHA), kv_heads=8),
    _native("qwen2-gqa", _make(Qwen2Config, **GQA), kv_heads=4),
    _native("qwen3-mha", _make(Qwen3Config, **MHA, head_dim=8), kv_heads=8),
    _native("qwen3-gqa", _make(Qwen3Config, **GQA, head_dim=16, attention_bias=True), kv_heads=4),
    _native("gemma-mha", _make(GemmaConfig, **MHA, head_dim=8), kv_heads=8),
    _native("gemma2-mha", _make(Gemma2Config, attn="eager", **MHA, **GEMMA2), kv_heads=8),
    _native("phi-mha", _make(PhiConfig, **MHA), kv_heads=8),
    _native("phi-qk-layernorm-mha", _make(PhiConfig, **MHA, qk_layernorm=True), kv_heads=8),
    _native(
        "phi3-mha",
        _make(Phi3Config, **MHA, pad_token_id=0, eos_token_id=2),
        kv_heads=8,
        reference=phi3_reference,
    ),
    _native(
        "phi3-gqa-partial-rotary",
        _make(Phi3Config, **GQA, pad_token_id=0, eos_token_id=2, partial_rotary_factor=0.5),
        kv_heads=4,
        reference=phi3_reference,
    ),
    _native("olmo-mha", _make(OlmoConfig, **MHA, clip_qkv=0.5), kv_heads=8),
]
