"""An SDPA attention function that never materialises repeated K/V where torch can do GQA natively.

transformers' stock `sdpa` path passes `enable_gqa=True` only without a mask; a padded (masked) prefill falls
back to `repeat_kv`, which copies K/V `num_heads / kv_heads` times. On CPU torch's SDPA supports `enable_gqa`
together with a mask (checked: identical outputs), so this function uses it there; elsewhere, and for
decode steps, it defers to the stock function (which packs a single query token onto the KV heads).

Registered as `"hf_gqa_sdpa"` together with its mask function (without the mask function, transformers would
silently skip the padding mask).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "hf_gqa_sdpa"


def gqa_sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over `query [b, H, q, d]` and grouped `key`/`value` `[b, K, k, d]`; returns `[b, q, H, d]`."""
    groups = query.shape[1] // key.shape[1]
    masked_prefill = attention_mask is not None and query.shape[2] > 1
    if (
        groups == 1
        or not masked_prefill
        or query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    if attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask[..., : key.shape[-2]],
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


def set_attention(model: PreTrainedModel, attn_implementation: str | None = None) -> None:
    """Set a (validated) attention implementation on a patched model; by default move `"sdpa"` to
    `"hf_gqa_sdpa"`. Families whose own attention code our modules replaced (Falcon, Bloom, GPT-J on 5.23) read
    `config._attn_implementation` directly, so it is set there."""
    current = getattr(model.config, "_attn_implementation", None)
    settable = type(model)._can_set_attn_implementation()
    target = attn_implementation or (ATTN_IMPLEMENTATION if current == "sdpa" and settable else None)
    if not target or target == current:
        return
    if settable:
        model.set_attn_implementation(target)
    else:
        model.config._attn_implementation = target


def register() -> None:
    """Register `"hf_gqa_sdpa"` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, gqa_sdpa_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


register()
