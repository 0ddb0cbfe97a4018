"""Families with their own attention code (not on transformers' shared interface): GPT-J, Falcon (new and old
decoder architecture, rotary and ALiBi) and Bloom.

Each reference averages K/V heads in the family's own weight layout, written from the transformers modeling code
without hf_gqa:
- GPT-J: `k_proj` / `v_proj` weights `[H * d, hidden]`, head `h` at rows `h * d:(h + 1) * d`;
- Falcon new architecture: `query_key_value` rows `[K, H // K + 2, d]` (per KV group: its queries, its key, its
  value); old architecture with `multi_query=False` and Bloom: rows `[H, 3, d]` (`q_h, k_h, v_h` per head).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, BloomConfig, FalconConfig, GPTJConfig

from . import FamilyCase, group_mean_heads

TOKENS = dict(vocab_size=256, bos_token_id=1, eos_token_id=2)


def _make(config, attn_implementation: str | None = None):
    def make():
        torch.manual_seed(0)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        return AutoModelForCausalLM.from_config(config(), **kwargs).eval()

    return make


# -- GPT-J ---------------------------------------------------------------------------------------------------------
def gptj_config() -> GPTJConfig:
    return GPTJConfig(**TOKENS, n_positions=256, n_embd=64, n_layer=2, n_head=8, rotary_dim=4, n_inner=128)


def gptj_mean_reference(model, groups: int) -> None:
    """Average `groups` groups of consecutive heads of every `k_proj` and `v_proj` (`[H * d, hidden]`)."""
    for block in model.transformer.h:
        heads = block.attn.num_attention_heads
        with torch.no_grad():
            for linear in (block.attn.k_proj, block.attn.v_proj):
                linear.weight.copy_(group_mean_heads(linear.weight, heads, groups))


# -- Falcon --------------------------------------------------------------------------------------------------------
def falcon_config(**kw):
    def config() -> FalconConfig:
        return FalconConfig(**TOKENS, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, **kw)

    return config


def _mean_rows(fused: torch.Tensor, kv_heads: int, slots: int, slot_indices: tuple[int, ...], groups: int):
    """In a fused qkv weight/bias whose rows are `[kv_heads, slots, d]`, average the heads of each slot in
    `slot_indices` over `groups` groups of consecutive heads."""
    rows = fused.reshape(kv_heads, slots, -1, *fused.shape[1:]).clone()
    for slot in slot_indices:
        part = rows[:, slot].reshape(-1, *fused.shape[1:])
        rows[:, slot] = group_mean_heads(part, kv_heads, groups).reshape(rows[:, slot].shape)
    return rows.reshape(fused.shape)


def falcon_mean_reference(model, groups: int) -> None:
    """Average the key and value heads of Falcon's fused `query_key_value` in its own layout."""
    config = model.config
    heads = config.num_attention_heads
    if config.new_decoder_architecture:
        kv_heads, slots = config.num_kv_heads, heads // config.num_kv_heads + 2
        kv_slots = (slots - 2, slots - 1)
    elif config.multi_query:
        assert groups == 1, "a multi-query Falcon has one KV head"
        return
    else:
        kv_heads, slots, kv_slots = heads, 3, (1, 2)
    for layer in model.transformer.h:
        linear = layer.self_attention.query_key_value
        with torch.no_grad():
            linear.weight.copy_(_mean_rows(linear.weight, kv_heads, slots, kv_slots, groups))
            if linear.bias is not None:
                linear.bias.copy_(_mean_rows(linear.bias, kv_heads, slots, kv_slots, groups))


# -- Bloom ---------------------------------------------------------------------------------------------------------
def bloom_config() -> BloomConfig:
    return BloomConfig(**TOKENS, hidden_size=64, n_layer=2, n_head=8)


def bloom_mean_reference(model, groups: int) -> None:
    """Average the key and value heads of Bloom's fused `query_key_value` (rows `[H, 3, d]`) and their biases."""
    heads = model.config.n_head
    for block in model.transformer.h:
        linear = block.self_attention.query_key_value
        with torch.no_grad():
            linear.weight.copy_(_mean_rows(linear.weight, heads, 3, (1, 2), groups))
            linear.bias.copy_(_mean_rows(linear.bias, heads, 3, (1, 2), groups))


CASES = [
    FamilyCase("gptj", _make(gptj_config), gptj_mean_reference, groups=[4, 2, 1], kv_heads=8, num_heads=8),
    FamilyCase(
        "falcon-new-mha",
        _make(falcon_config(new_decoder_architecture=True, num_kv_heads=8), "sdpa"),
        falcon_mean_reference,
        groups=[4, 2, 1],
        kv_heads=8,
        num_heads=8,
        native_gqa=True,
    ),
    FamilyCase(
        "falcon-new-gqa",
        _make(falcon_config(new_decoder_architecture=True, num_kv_heads=4, bias=True), "sdpa"),
        falcon_mean_reference,
        groups=[2, 1],
        kv_heads=4,
        num_heads=8,
        native_gqa=True,
        # transformers' FalconAttention broadcasts the new architecture's K/V to every query head before caching.
        extra={"original_cache_kv_heads": 8},
    ),
    FamilyCase(
        "falcon-old-mha",
        _make(falcon_config(multi_query=False, parallel_attn=True), "sdpa"),
        falcon_mean_reference,
        groups=[4, 2, 1],
        kv_heads=8,
        num_heads=8,
    ),
    FamilyCase(
        "falcon-old-mqa",
        _make(falcon_config(multi_query=True, parallel_attn=True), "sdpa"),
        falcon_mean_reference,
        groups=[1],
        kv_heads=1,
        num_heads=8,
    ),
    FamilyCase(
        "falcon-old-alibi",
        _make(falcon_config(alibi=True, multi_query=False, parallel_attn=False, bias=True), "sdpa"),
        falcon_mean_reference,
        groups=[4, 2, 1],
        kv_heads=8,
        num_heads=8,
    ),
    FamilyCase("bloom", _make(bloom_config), bloom_mean_reference, groups=[4, 2, 1], kv_heads=8, num_heads=8),
]
