"""Family-specific checks of GPT-J, Falcon and Bloom, whose attention modules hf_gqa replaces with its own.

transformers' `set_attn_implementation` leaves these families unchanged (they are not on its attention interface),
so these tests switch `config._attn_implementation` directly to run every path of the GQA modules.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.falcon.modeling_falcon import FalconAttention

import hf_gqa
from hf_gqa.architectures.bloom import BloomGQAAttention
from hf_gqa.architectures.falcon import FalconGQAAttention
from hf_gqa.architectures.gptj import GPTJGQAAttention
from hf_gqa.cache import GQACache
from hf_gqa.canonical import RotarySpec

from .cases.own_attention import CASES

BY_NAME = {c.name: c for c in CASES}
GQA_CLASSES = {"gptj": GPTJGQAAttention, "bloom": BloomGQAAttention}
IMPLEMENTATIONS = ["eager", "sdpa", "hf_gqa_sdpa"]
# Falcon's own ALiBi paths differ between eager and SDPA (see test_falcon_alibi_reproduces_each_stock_path).
AGREEING = [c.name for c in CASES if c.name != "falcon-old-alibi"]


def logits(model, ids, mask=None, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def greedy(model, ids, mask, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **kw
        )


def attention_modules(model) -> list[torch.nn.Module]:
    return [m for _, m in hf_gqa.get_adapter(model).attention_modules(model)]


def patch(model, groups):
    return hf_gqa.patch(model, groups=groups, merge="mean")


@pytest.mark.parametrize("name", AGREEING)
def test_eager_sdpa_and_hf_gqa_sdpa_agree(name, padded):
    """Every attention path of the GQA module computes the same function, on a padded prefill and in decoding."""
    case = BY_NAME[name]
    model = patch(case.make(), case.groups[0])
    real = padded[1].bool()
    outputs, sequences = {}, {}
    for implementation in IMPLEMENTATIONS:
        model.config._attn_implementation = implementation
        outputs[implementation] = logits(model, *padded)[real]
        sequences[implementation] = greedy(model, *padded)
    for implementation in IMPLEMENTATIONS[1:]:
        torch.testing.assert_close(outputs[implementation], outputs["eager"], atol=1e-5, rtol=0)
        assert torch.equal(sequences[implementation], sequences["eager"])


@pytest.mark.parametrize("name", AGREEING)
def test_unpadded_sdpa_matches_eager_reference(name, ids):
    """Without padding the SDPA paths get no mask (or an ALiBi-only one) and must still be causal."""
    case = BY_NAME[name]
    groups = case.groups[-1]
    reference = case.make()
    case.mean_reference(reference, groups)
    reference.config._attn_implementation = "eager"
    model = patch(case.make(), groups)
    for implementation in IMPLEMENTATIONS:
        model.config._attn_implementation = implementation
        torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_converted_modules_keep_names_and_shrink_kv(name):
    case = BY_NAME[name]
    original = case.make()
    model = patch(case.make(), case.groups[-1])
    keys, original_keys = model.state_dict().keys(), original.state_dict().keys()
    assert keys == original_keys
    modules = attention_modules(model)
    family = name.split("-")[0]
    assert all(isinstance(m, GQA_CLASSES.get(family, FalconGQAAttention)) for m in modules)
    kv_params = sum(p.numel() for m in modules for p in m.parameters())
    original_params = sum(p.numel() for m in attention_modules(original) for p in m.parameters())
    assert (kv_params < original_params) == (case.groups[-1] < case.kv_heads)


def test_gptj_reads_interleaved_partial_rotary():
    model = BY_NAME["gptj"].make()
    adapter = hf_gqa.get_adapter(model)
    weights = adapter.read(attention_modules(model)[0])
    assert weights.rotary == RotarySpec(4, interleaved=True)
    assert (weights.num_heads, weights.num_kv_heads, weights.head_dim) == (8, 8, 8)
    patched = patch(model, 2)
    module = attention_modules(patched)[0]
    assert module.k_proj.weight.shape == module.v_proj.weight.shape == (2 * 8, 64)
    assert adapter.read(module).rotary == RotarySpec(4, interleaved=True)


@pytest.mark.parametrize("name", ["falcon-new-mha", "falcon-new-gqa"])
def test_falcon_new_architecture_saves_standard_checkpoint(name, ids, padded, tmp_path):
    """A uniformly converted new-architecture Falcon is a stock checkpoint with `num_kv_heads = groups`;
    `hf_gqa.from_pretrained` loads it with the GQA module, whose cache holds only the grouped heads."""
    case = BY_NAME[name]
    groups = case.groups[0]
    model = patch(case.make(), groups)
    expected = logits(model, *padded)
    model.save_pretrained(tmp_path)
    assert not hf_gqa.needs_hf_gqa_to_load(model)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert plain.config.num_kv_heads == groups
    stock = plain.transformer.h[0].self_attention
    assert type(stock) is FalconAttention
    assert stock.query_key_value.weight.shape == ((8 + 2 * groups) * 8, 64)
    torch.testing.assert_close(logits(plain, *padded), expected, atol=0, rtol=0)
    stock_cache = GQACache(config=plain.config)
    logits(plain, ids, past_key_values=stock_cache, use_cache=True)
    assert stock_cache.kv_heads() == [8, 8]  # transformers repeats K/V to every query head before caching

    loaded = hf_gqa.from_pretrained(tmp_path)
    assert all(isinstance(m, FalconGQAAttention) for m in attention_modules(loaded))
    assert loaded.config.hf_gqa == model.config.hf_gqa
    torch.testing.assert_close(logits(loaded, *padded), expected, atol=0, rtol=0)
    cache = GQACache(config=loaded.config)
    logits(loaded, ids, past_key_values=cache, use_cache=True)
    assert cache.kv_heads() == [groups, groups]


def test_falcon_identity_on_a_gqa_model_shrinks_the_cache(ids):
    """Patching a natively-GQA Falcon at its own KV head count changes no weight but caches 4 heads, not 8."""
    case = BY_NAME["falcon-new-gqa"]
    original = case.make()
    model = patch(case.make(), 4)
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    caches = GQACache(config=original.config), GQACache(config=model.config)
    torch.testing.assert_close(
        logits(model, ids, past_key_values=caches[1], use_cache=True),
        logits(original, ids, past_key_values=caches[0], use_cache=True),
        atol=1e-6,
        rtol=0,
    )
    assert caches[0].kv_heads() == [8, 8] and caches[1].kv_heads() == [4, 4]
    assert caches[1].nbytes() * 2 == caches[0].nbytes()


@pytest.mark.parametrize("name", ["gptj", "falcon-new-mha", "falcon-old-mha", "falcon-old-alibi", "bloom"])
def test_per_layer_groups_round_trip(name, ids, tmp_path):
    case = BY_NAME[name]
    model = patch(case.make(), [4, 1])
    expected = logits(model, ids)
    cache = GQACache(config=model.config)
    logits(model, ids, past_key_values=cache, use_cache=True)
    assert cache.kv_heads() == [4, 1]
    model.save_pretrained(tmp_path)
    assert hf_gqa.needs_hf_gqa_to_load(model)
    loaded = hf_gqa.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=0, rtol=0)
    assert [hf_gqa.get_adapter(loaded).num_kv_heads(m) for m in attention_modules(loaded)] == [4, 1]


@pytest.mark.parametrize("name", ["gptj", "falcon-old-mha", "bloom"])
def test_multi_head_checkpoints_are_refused_by_plain_transformers(name, tmp_path):
    """A converted model of a multi-head-only family never loads silently wrong without hf_gqa."""
    model = patch(BY_NAME[name].make(), 2)
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_falcon_multi_query_allows_only_one_group(ids):
    case = BY_NAME["falcon-old-mqa"]
    model = case.make()
    with pytest.raises(hf_gqa.GroupsError, match="divide 1"):
        patch(model, 2)
    before = logits(model, ids)
    patch(model, 1)
    assert isinstance(attention_modules(model)[0], FalconGQAAttention)
    torch.testing.assert_close(logits(model, ids), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_falcon_alibi_reproduces_each_stock_path(implementation, padded):
    """Falcon's ALiBi models compute different functions in eager and SDPA (transformers 5.23 adds ALiBi twice in
    eager); the GQA module reproduces whichever path the model runs."""
    case = BY_NAME["falcon-old-alibi"]
    original = case.make()
    original.config._attn_implementation = implementation
    model = patch(case.make(), case.kv_heads)
    model.config._attn_implementation = implementation
    real = padded[1].bool()
    torch.testing.assert_close(
        logits(model, *padded)[real], logits(original, *padded)[real], atol=1e-5, rtol=0
    )

    other = "sdpa" if implementation == "eager" else "eager"
    original.config._attn_implementation = other
    gap = (logits(original, *padded)[real] - logits(model, *padded)[real]).abs().max()
    assert gap > 1e-3, "transformers' Falcon ALiBi eager and SDPA paths now agree; update falcon.py's note"


@pytest.mark.parametrize("name", ["gptj", "falcon-new-gqa", "falcon-old-alibi", "bloom"])
def test_output_attentions_gives_per_query_head_weights(name, padded):
    case = BY_NAME[name]
    model = patch(case.make(), case.groups[-1])
    real = padded[1].bool()
    with torch.no_grad():
        out = model(input_ids=padded[0], attention_mask=padded[1], output_attentions=True)
    assert [tuple(a.shape) for a in out.attentions] == [(2, 8, 10, 10)] * 2
    row_sums = out.attentions[0].sum(-1).transpose(1, 2)[real]  # [real tokens, heads]
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums))
    if name != "falcon-old-alibi":  # with ALiBi Falcon's eager path is another function (see above)
        torch.testing.assert_close(out.logits[real], logits(model, *padded)[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gptj", "falcon-new-mha", "bloom"])
def test_flash_attention_models_are_refused_unchanged(name):
    model = BY_NAME[name].make()
    model.config._attn_implementation = "flash_attention_2"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(hf_gqa.UnsupportedArchitectureError, match="flash_attention_2"):
        patch(model, 2)
    assert not hf_gqa.is_patched(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
