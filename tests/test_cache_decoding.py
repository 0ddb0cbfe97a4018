"""The KV cache is really used, on every family: decoding with it computes what a full forward computes.

These tests fail when a GQA module silently ignores the cache (each decode step would attend to the current token
alone) or when `generate()` builds some other cache than `hf_gqa.GQACache`.
"""

from __future__ import annotations

import pickle

import pytest
import torch

import hf_gqa
from hf_gqa import compat
from hf_gqa.cache import GQACache

from .cases import FamilyCase, all_cases

CASES = all_cases()
IDS = [c.name for c in CASES]


def reductions(case: FamilyCase) -> list[int]:
    """`groups == KV heads` (nothing merged) and the strongest reduction."""
    return sorted({case.kv_heads, case.groups[-1]}, reverse=True)


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def cached_logits(model, ids: torch.Tensor, prefill: int) -> tuple[torch.Tensor, GQACache]:
    """Logits of `ids [b, s]`: the first `prefill` tokens in one call, then one token per call through a cache."""
    cache = GQACache(config=model.config)
    outputs = []
    with torch.no_grad():
        for start, end in [(0, prefill), *((i, i + 1) for i in range(prefill, ids.shape[1]))]:
            out = model(input_ids=ids[:, start:end], use_cache=True, **compat.cache_kwargs(cache))
            assert compat.output_cache(out) is cache
            outputs.append(out.logits)
    return torch.cat(outputs, dim=1), cache


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_token_by_token_decoding_equals_full_forward(case: FamilyCase, ids):
    for groups in reductions(case):
        model = hf_gqa.patch(case.make(), groups=groups)
        expected = full_logits(model, ids)
        for prefill in (1, 5):
            got, cache = cached_logits(model, ids, prefill)
            torch.testing.assert_close(
                got, expected, atol=1e-5, rtol=0, msg=f"groups={groups}, prefill={prefill}"
            )
            assert cache.kv_heads() == [groups] * len(cache.layers)
            assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identity_decoding_equals_the_original(case: FamilyCase, ids):
    """At `groups == KV heads` the patched model decodes exactly as the unpatched one does."""
    original = case.make()
    model = hf_gqa.patch(case.make(), groups=case.kv_heads)
    got, _ = cached_logits(model, ids, prefill=3)
    torch.testing.assert_close(got, full_logits(original, ids), atol=1e-5, rtol=0)


def greedy(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **kw
        )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_generate_with_cache_equals_without(case: FamilyCase, padded):
    ids, mask = padded
    for groups in reductions(case):
        model = hf_gqa.patch(case.make(), groups=groups)
        cached = greedy(model, ids, mask, return_dict_in_generate=True)
        cache = compat.output_cache(cached)
        assert type(cache) is GQACache
        assert cache.kv_heads() == [groups] * len(cache.layers)
        assert torch.equal(cached.sequences, greedy(model, ids, mask, use_cache=False))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_beam_search_with_cache_equals_without(case: FamilyCase, padded):
    ids, mask = padded
    model = hf_gqa.patch(case.make(), groups=case.groups[-1])
    beams = dict(num_beams=3, num_return_sequences=2)
    with_cache = greedy(model, ids, mask, **beams)
    assert torch.equal(with_cache, greedy(model, ids, mask, use_cache=False, **beams))


def _static_cache_supported(model, ids, mask) -> bool:
    try:
        greedy(model, ids, mask, cache_implementation="static")
    except (ValueError, NotImplementedError, TypeError, AttributeError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_static_cache_where_the_family_offers_one(case: FamilyCase, padded):
    ids, mask = padded
    if not _static_cache_supported(case.make(), ids, mask):
        pytest.skip(f"transformers offers no static cache for {case.name}")
    model = hf_gqa.patch(case.make(), groups=case.groups[-1])
    static = greedy(model, ids, mask, cache_implementation="static", return_dict_in_generate=True)
    assert torch.equal(static.sequences, greedy(model, ids, mask, use_cache=False))
    cache = compat.output_cache(static)
    assert [layer.keys.shape[1] for layer in cache.layers] == [case.groups[-1]] * len(cache.layers)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_patched_model_pickles_and_keeps_its_cache(case: FamilyCase, ids, tmp_path):
    """`torch.save(model)` of a patched model loads back with its weights and its GQA cache hook."""
    model = hf_gqa.patch(case.make(), groups=case.groups[-1])
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    torch.testing.assert_close(full_logits(loaded, ids), full_logits(model, ids), atol=0, rtol=0)
    out = greedy(loaded, ids, torch.ones_like(ids), return_dict_in_generate=True)
    assert type(compat.output_cache(out)) is GQACache
    assert pickle.loads(pickle.dumps(model))._prepare_cache_for_generation.model is not model
