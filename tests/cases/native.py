"""Natively-GQA families with separate q/k/v projections: Llama-style and Phi."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from . import TINY, FamilyCase, group_mean_heads


def _separate_reference(k_name: str = "k_proj", v_name: str = "v_proj"):
    def reference(model, groups: int) -> None:
        for module in model.modules():
            if hasattr(module, k_name) and hasattr(module, "head_dim") and hasattr(module, v_name):
                for name in (k_name, v_name):
                    linear = getattr(module, name)
                    heads = linear.out_features // module.head_dim
                    with torch.no_grad():
                        linear.weight.copy_(group_mean_heads(linear.weight, heads, groups))
                        if linear.bias is not None:
                            linear.bias.copy_(group_mean_heads(linear.bias, heads, groups))

    return reference


def _make(config_cls, **kw):
    def make():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config_cls(**kw), attn_implementation="sdpa")
        return model.eval()

    return make


CASES = [
    FamilyCase(
        "llama-mha",
        _make(LlamaConfig, **TINY, intermediate_size=128, num_attention_heads=8, num_key_value_heads=8),
        _separate_reference(),
        groups=[4, 2, 1],
        kv_heads=8,
        num_heads=8,
        native_gqa=True,
    ),
    FamilyCase(
        "llama-gqa",
        _make(
            LlamaConfig,
            **TINY,
            intermediate_size=128,
            num_attention_heads=8,
            num_key_value_heads=4,
            attention_bias=True,
        ),
        _separate_reference(),
        groups=[2, 1],
        kv_heads=4,
        num_heads=8,
        native_gqa=True,
    ),
]
