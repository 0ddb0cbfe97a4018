"""Family-specific guarantees of the natively-GQA families, beyond the generic ones of `test_families.py`:
Gemma2's sliding-window cache layers, Phi-3's fused `qkv_proj` layout, per-layer KV head counts, and the refusal
of OLMo2's cross-head key norm."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Olmo2Config
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import hf_gqa
from hf_gqa.cache import GQACache

from .cases import TINY, FamilyCase, all_cases

CASES = {c.name: c for c in all_cases()}


def logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def per_layer_reference(case: FamilyCase, groups: list[int]) -> torch.nn.Module:
    """The original model with layer `i`'s K/V heads mean-pooled down to `groups[i]` (in its own layout)."""
    reference = case.make()
    for layer, g in zip(reference.model.layers, groups):
        case.mean_reference(layer, g)
    return reference


# -- Gemma2: sliding-window layers ----------------------------------------------------------------------------
def test_gemma2_window_and_softcap_are_in_effect(ids):
    """The tiny Gemma2 really exercises the sliding window and the soft-capping (else the tests below say little)."""
    case = CASES["gemma2-mha"]
    model = case.make()
    base = logits(model, ids)
    model.config.sliding_window = 64
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 64 if layer.self_attn.sliding_window else None
    assert (logits(model, ids) - base).abs().max() > 1e-3
    model = case.make()
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert (logits(model, ids) - base).abs().max() > 1e-2


@pytest.mark.parametrize("groups", [2, 1])
def test_gemma2_sliding_window_cache_in_generate(groups, padded):
    case = CASES["gemma2-mha"]
    ids, mask = padded
    window = case.make().config.sliding_window
    assert ids.shape[1] > window
    model = hf_gqa.patch(case.make(), groups=groups)
    reference = case.make()
    case.mean_reference(reference, groups)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, return_dict_in_generate=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
        expected = reference.generate(ids, **kw)
    cache = cached.past_key_values
    assert isinstance(cache, GQACache)
    assert [type(layer) for layer in cache.layers] == [DynamicSlidingWindowLayer, DynamicLayer]
    assert cache.kv_heads() == [groups, groups]
    sliding, full = cache.layer_shapes()
    assert sliding[2] == window - 1
    assert full[2] == cached.sequences.shape[1] - 1
    assert torch.equal(cached.sequences, uncached)
    assert torch.equal(cached.sequences, expected)


# -- Phi-3: the fused qkv_proj ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,groups", [("phi3-mha", 2), ("phi3-gqa-partial-rotary", 1)])
def test_phi3_fused_layout(name, groups):
    case = CASES[name]
    original = case.make()
    model = hf_gqa.patch(case.make(), groups=groups)
    config = original.config
    d = config.hidden_size // config.num_attention_heads
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    assert model.config.num_key_value_heads == groups
    for before, after in zip(original.model.layers, model.model.layers):
        w_before, w_after = before.self_attn.qkv_proj.weight, after.self_attn.qkv_proj.weight
        assert w_after.shape == ((heads + 2 * groups) * d, config.hidden_size)
        q, k, v = w_before.split([heads * d, kv * d, kv * d])
        q_new, k_new, v_new = w_after.split([heads * d, groups * d, groups * d])
        assert torch.equal(q_new, q)
        expected_k = k.reshape(groups, kv // groups, d, -1).mean(1).reshape(groups * d, -1)
        expected_v = v.reshape(groups, kv // groups, d, -1).mean(1).reshape(groups * d, -1)
        torch.testing.assert_close(k_new, expected_k, atol=1e-7, rtol=0)
        torch.testing.assert_close(v_new, expected_v, atol=1e-7, rtol=0)
        assert torch.equal(after.self_attn.o_proj.weight, before.self_attn.o_proj.weight)
        assert after.self_attn.num_key_value_heads == groups
        assert after.self_attn.num_key_value_groups == heads // groups
        assert before.self_attn.num_key_value_heads == kv  # the original module is untouched
    assert not hf_gqa.needs_hf_gqa_to_load(model)


def test_phi3_keeps_partial_rotary_in_canonical_weights():
    model = CASES["phi3-gqa-partial-rotary"].make()
    adapter = hf_gqa.get_adapter(model)
    weights = adapter.read(model.model.layers[0].self_attn)
    d = model.config.hidden_size // model.config.num_attention_heads
    assert (weights.num_heads, weights.num_kv_heads, weights.head_dim) == (8, 4, d)
    assert weights.rotary.rotary_dim == d // 2


# -- per-layer KV head counts ---------------------------------------------------------------------------------
PER_LAYER = [("llama-mha", [2, 1]), ("qwen2-gqa", [2, 1]), ("phi3-mha", [4, 1]), ("gemma2-mha", [2, 1])]


@pytest.mark.parametrize("name,groups", PER_LAYER, ids=[n for n, _ in PER_LAYER])
def test_per_layer_groups(name, groups, padded, tmp_path):
    case = CASES[name]
    ids, mask = padded
    model = hf_gqa.patch(case.make(), groups=groups)
    expected = logits(per_layer_reference(case, groups), ids, mask)
    torch.testing.assert_close(logits(model, ids, mask), expected, atol=1e-5, rtol=0)
    assert [layer.kv_heads_after for layer in hf_gqa.describe(model).layers] == groups

    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, return_dict_in_generate=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert isinstance(cached.past_key_values, GQACache)
    assert cached.past_key_values.kv_heads() == groups
    assert torch.equal(cached.sequences, uncached)

    assert hf_gqa.needs_hf_gqa_to_load(model)
    model.save_pretrained(tmp_path)
    assert hf_gqa.needs_hf_gqa_to_load(AutoConfig.from_pretrained(tmp_path))
    loaded = hf_gqa.from_pretrained(tmp_path)
    assert isinstance(loaded, type(model))
    torch.testing.assert_close(logits(loaded, ids, mask), logits(model, ids, mask), atol=0, rtol=0)
    assert hf_gqa.describe(loaded).to_dict() == hf_gqa.describe(model).to_dict()
    with torch.no_grad():
        assert torch.equal(loaded.generate(ids, **kw), cached.sequences)


# -- OLMo2 -----------------------------------------------------------------------------------------------------
def test_olmo2_cross_head_key_norm_is_refused():
    """OLMo2's `k_norm` spans all KV heads (weight `[K * d]`): refused, with the model left as it was."""
    torch.manual_seed(0)
    config = Olmo2Config(**TINY, intermediate_size=128, num_attention_heads=8, num_key_value_heads=8)
    model = AutoModelForCausalLM.from_config(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(hf_gqa.UnsupportedArchitectureError, match="olmo2"):
        hf_gqa.patch(model, groups=2)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.config.num_key_value_heads == 8
    assert not hf_gqa.is_patched(model)
