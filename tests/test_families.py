"""The core guarantees of `hf_gqa.patch`, checked on a tiny random model of every supported family."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_gqa
from hf_gqa.cache import GQACache

from .cases import FamilyCase, all_cases

CASES = all_cases()
IDS = [c.name for c in CASES]


def logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, state) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert now[k].shape == state[k].shape, k
        assert torch.equal(now[k], state[k]), k


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identity_reproduces_original(case: FamilyCase, ids, padded):
    model = case.make()
    before, before_padded = logits(model, ids), logits(model, *padded)
    hf_gqa.patch(model, groups=case.kv_heads)
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, *padded), before_padded, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mean_pooling_equals_reference(case: FamilyCase, attn, ids, padded):
    for groups in case.groups:
        reference = case.make()
        case.mean_reference(reference, groups)
        model = hf_gqa.patch(case.make(), groups=groups)
        if attn == "eager":
            reference.set_attn_implementation("eager")
            model.set_attn_implementation("eager")
        torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(logits(model, *padded), logits(reference, *padded), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eager_equals_sdpa(case: FamilyCase, padded):
    model = hf_gqa.patch(case.make(), groups=case.groups[0])
    real = padded[1].bool()  # fully masked pad rows differ between kernels and are never used
    out_sdpa = logits(model, *padded)[real]
    model.set_attn_implementation("eager")
    torch.testing.assert_close(logits(model, *padded)[real], out_sdpa, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cache_holds_grouped_heads(case: FamilyCase, ids):
    original = case.make()
    cache_before = GQACache(config=original.config)
    with torch.no_grad():
        original(input_ids=ids, past_key_values=cache_before, use_cache=True)
    for groups in case.groups:
        model = hf_gqa.patch(case.make(), groups=groups)
        cache = GQACache(config=model.config)
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        assert cache.kv_heads() == [groups] * len(cache.layers)
        before_heads = case.extra.get("original_cache_kv_heads", case.kv_heads)
        assert cache_before.kv_heads() == [before_heads] * len(cache_before.layers)
        assert cache.nbytes() * before_heads == cache_before.nbytes() * groups


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_generate_uses_gqa_cache_and_matches_uncached(case: FamilyCase, padded):
    ids, mask = padded
    model = hf_gqa.patch(case.make(), groups=case.groups[-1])
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, return_dict_in_generate=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert isinstance(cached.past_key_values, GQACache)
    assert cached.past_key_values.kv_heads() == [case.groups[-1]] * len(cached.past_key_values.layers)
    assert torch.equal(cached.sequences, uncached)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_round_trip(case: FamilyCase, ids, tmp_path):
    model = hf_gqa.patch(case.make(), groups=case.groups[0])
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = hf_gqa.from_pretrained(tmp_path)
    assert isinstance(loaded, type(model))
    torch.testing.assert_close(logits(loaded, ids), expected, atol=0, rtol=0)
    assert hf_gqa.describe(loaded).to_dict() == hf_gqa.describe(model).to_dict()
    if case.native_gqa:
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(tmp_path)
        torch.testing.assert_close(logits(plain, ids), expected, atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_repatch_further_down(case: FamilyCase, ids):
    first, second = case.groups[0], case.groups[-1]
    if first == second:
        pytest.skip("one reduction only")
    twice = hf_gqa.patch(hf_gqa.patch(case.make(), groups=first), groups=second)
    once = hf_gqa.patch(case.make(), groups=second)
    torch.testing.assert_close(logits(twice, ids), logits(once, ids), atol=1e-5, rtol=0)
    assert hf_gqa.describe(twice).layers[0].kv_heads_before == case.kv_heads


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_groups_raise_and_leave_model_unchanged(case: FamilyCase):
    model = case.make()
    state, classes = snapshot(model), [type(m) for m in model.modules()]
    config = model.config.to_dict()
    bad = [case.kv_heads + 1, 0, case.kv_heads * 2]
    bad += [g for g in range(2, case.kv_heads) if case.kv_heads % g][:1]
    for groups in bad:
        with pytest.raises(hf_gqa.GroupsError, match="groups"):
            hf_gqa.patch(model, groups=groups)
    with pytest.raises(hf_gqa.GroupsError):
        hf_gqa.patch(model, groups=[1])  # wrong number of layers
    assert_same_state(model, state)
    assert [type(m) for m in model.modules()] == classes
    assert model.config.to_dict() == config
    assert not hf_gqa.is_patched(model)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_repatch_that_does_not_divide_raises(case: FamilyCase):
    model = hf_gqa.patch(case.make(), groups=case.groups[0])
    state = snapshot(model)
    bad = case.groups[0] + 1
    with pytest.raises(hf_gqa.GroupsError, match="already"):
        hf_gqa.patch(model, groups=bad)
    assert_same_state(model, state)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_is_kept(case: FamilyCase, dtype, ids):
    model = case.make().to(dtype)
    reference = copy.deepcopy(model).float()
    case.mean_reference(reference, case.groups[-1])
    hf_gqa.patch(model, groups=case.groups[-1])
    assert {p.dtype for p in model.parameters()} == {dtype}
    out = logits(model, ids)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), logits(reference, ids), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_meta_weights_refused(case: FamilyCase):
    model = case.make()
    adapter = hf_gqa.get_adapter(model)
    name, module = adapter.attention_modules(model)[-1]
    param_name, param = next(iter(module.named_parameters()))
    owner = module.get_submodule(param_name.rpartition(".")[0]) if "." in param_name else module
    setattr(owner, param_name.rpartition(".")[2], torch.nn.Parameter(torch.empty_like(param, device="meta")))
    state = snapshot(model)
    with pytest.raises(hf_gqa.UnconvertibleWeightsError, match="meta"):
        hf_gqa.patch(model, groups=case.groups[-1])
    assert state.keys() == model.state_dict().keys()
    assert not hf_gqa.is_patched(model)
