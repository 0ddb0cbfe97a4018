"""Refine steps scored on a few token positions: the decoder layer computes only those positions (keys and values
excepted), and must give exactly the full layer's outputs and gradients there, on every family."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import hf_gqa
from hf_gqa.errors import GQAError
from hf_gqa.methods import Refine
from hf_gqa.patch import _adapter_for
from hf_gqa.pipeline import capture_all_layer_calls
from hf_gqa.refine import (
    ROWS_ATTENTION,
    PositionSubset,
    _grouped_sdpa,
    _schedule,
    _scored_positions,
    call_output,
)

from .cases import all_cases
from .test_strategies import blocks_folding

CASES = all_cases()
IDS = [c.name for c in CASES]


def _first_layer_call(model):
    """The first decoder layer, its attention module, the family adapter and one captured call (one sequence)."""
    adapter = _adapter_for(model)
    name, attention = adapter.attention_modules(model)[0]
    layer = model.get_submodule(name.rpartition(".")[0])
    blocks = torch.randint(3, 200, (1, 48), generator=torch.Generator().manual_seed(1))
    hidden, calls = capture_all_layer_calls(model, [layer], blocks, batch_size=1)
    args, kwargs = calls[0][0]
    if args:
        return adapter, layer, attention, (hidden[0], *args[1:]), kwargs
    return adapter, layer, attention, args, {**kwargs, "hidden_states": hidden[0]}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_subset_layer_is_exact_at_the_scored_positions(case):
    model = case.make()
    adapter, layer, attention, args, kwargs = _first_layer_call(model)
    rows = torch.tensor([0, 5, 6, 17, 30, 47])
    subset = PositionSubset.of(layer, attention, adapter.key_value_inputs)
    implementation = getattr(getattr(attention, "config", None), "_attn_implementation", None)
    assert subset.modules, "the MLP's linear maps at least"

    def scored(use_subset: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        layer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for p in layer.parameters():
                p.requires_grad_(True)
            if use_subset:
                with subset.only(rows):
                    out = call_output(layer, args, kwargs)
            else:
                out = call_output(layer, args, kwargs)
            picked = out.index_select(-2, rows)
            (picked**2).mean().backward()
        return picked.detach(), [p.grad.clone() for p in layer.parameters() if p.grad is not None]

    full, full_grads = scored(False)
    part, part_grads = scored(True)
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)
    assert len(part_grads) == len(full_grads)
    for a, b in zip(part_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if implementation is not None:  # the attention implementation is put back
        assert attention.config._attn_implementation == implementation != ROWS_ATTENTION
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in subset.modules)


def test_subset_attends_from_the_scored_queries_only_on_sdpa():
    """On SDPA a Llama layer's attention runs through the rows function (queries at the scored positions only)."""
    case = next(c for c in CASES if c.name.startswith("llama"))
    model = case.make()
    adapter, layer, attention, args, kwargs = _first_layer_call(model)
    assert attention.config._attn_implementation == "sdpa"
    subset = PositionSubset.of(layer, attention, adapter.key_value_inputs)
    assert subset.attention is attention
    names = {n for n, m in layer.named_modules() if any(m is s for s in subset.modules)}
    assert not any(n.endswith(("k_proj", "v_proj")) for n in names)
    assert any(n.endswith("q_proj") for n in names) and any(n.endswith("o_proj") for n in names)
    # the MLP is restricted as one block (its activations on the scored rows only), not projection by projection
    assert "mlp" in names and not any(n.startswith("mlp.") for n in names)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_refine_on_positions_is_exact_at_equal_heads_and_fits(case):
    original = case.make()
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(2))
    calibration = torch.randint(3, 200, (512,), generator=torch.Generator().manual_seed(5))
    kw = dict(calibration=calibration, calibration_tokens=256, block_size=64, show_progress=False)
    merge = "mean" if blocks_folding(original) else "score"
    method = Refine(steps=20, positions=32, init=merge)
    with torch.no_grad():
        expected = original(input_ids=ids).logits
    same = hf_gqa.patch(copy.deepcopy(original), groups=case.kv_heads, method=method, **kw)
    with torch.no_grad():
        torch.testing.assert_close(same(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    if min(case.groups) == case.kv_heads:
        return
    model = hf_gqa.patch(copy.deepcopy(original), groups=min(case.groups), method=method, **kw)
    log = model._hf_gqa_conversion_log
    assert all(e["after"] <= e["before"] for e in log) and any(e["after"] < e["before"] for e in log), log


def test_refined_layers_share_the_model_config():
    """A refined decoder layer is a copy; its modules keep the model's config object, so the attention
    implementation `patch` sets afterwards (`hf_gqa_sdpa`) reaches them too."""
    case = next(c for c in CASES if c.name == "llama-mha")
    model = case.make()
    calibration = torch.randint(3, 200, (512,), generator=torch.Generator().manual_seed(5))
    hf_gqa.patch(
        model,
        groups=2,
        calibration=calibration,
        calibration_tokens=128,
        block_size=64,
        refine_steps=2,
        show_progress=False,
    )
    for layer in model.model.layers:
        assert layer.self_attn.config is model.config
        assert layer.self_attn.config._attn_implementation == "hf_gqa_sdpa"


def test_scored_positions_keep_the_first_and_estimate_the_whole_sequence():
    """The first position is always scored; the others are drawn without repeats and weighted by the inverse of
    their chance of being drawn, so that the weighted error of a step is unbiased for the whole sequence's."""
    length, positions, draws = 16, 5, 4000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(length)
    error = torch.rand(length, generator=torch.Generator().manual_seed(1))  # one fixed error per position
    estimate = 0.0
    for _ in range(draws):
        picked, weights = _scored_positions(length, positions, g)
        assert picked[0] == 0 and torch.equal(picked, picked.unique(sorted=True)) and len(picked) == positions
        assert weights[0] == 1 and torch.allclose(weights[1:], torch.tensor((length - 1) / (positions - 1)))
        counts[picked] += 1
        estimate += float((error[picked] * weights).sum()) / draws
    assert counts[0] == draws
    single = torch.zeros(length)
    for _ in range(draws):  # one position: drawn at random (the first alone would leave the others unscored)
        picked, weights = _scored_positions(length, 1, g)
        assert len(picked) == 1 and weights.tolist() == [float(length)]
        single[picked] += 1
    assert single.min() > 0 and single[0] < draws / 4
    torch.testing.assert_close(counts[1:] / draws, torch.full((length - 1,), 4 / 15), atol=0.03, rtol=0)
    assert abs(estimate - float(error.sum())) < 0.02 * float(error.sum())


@pytest.mark.parametrize("kv_heads", [1, 3, 9])
@pytest.mark.parametrize("mask_dims", [2, 4])
def test_grouped_sdpa_equals_sdpa_with_gqa(kv_heads, mask_dims):
    """Stacking the query heads of a key head into one is the same attention, outputs and gradients."""
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 3, 4, 9, 15])
    query = torch.randn(2, 9, len(rows), 8, generator=g, requires_grad=True)
    key = torch.randn(2, kv_heads, 16, 8, generator=g, requires_grad=True)
    value = torch.randn(2, kv_heads, 16, 8, generator=g, requires_grad=True)
    mask = torch.arange(16)[None, :] <= rows[:, None]
    if mask_dims == 4:
        mask = mask[None, None].expand(2, 1, -1, -1)

    def run(fn):
        for t in (query, key, value):
            t.grad = None
        out = fn()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [t.grad.clone() for t in (query, key, value)]

    expected = run(
        lambda: torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=0.3, enable_gqa=True
        )
    )
    got = run(lambda: _grouped_sdpa(query, key, value, mask, 0.3))
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=1e-5)
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_warmup_schedule_rises_then_follows_the_cosine():
    def rates(steps: int, warmup: int) -> list[float]:
        optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = _schedule(optimizer, steps, warmup)
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return out

    cosine = [0.5 * (1 + math.cos(math.pi * t / 20)) for t in range(20)]
    torch.testing.assert_close(torch.tensor(rates(20, 0)), torch.tensor(cosine), atol=1e-9, rtol=0)
    warm = rates(20, 4)
    torch.testing.assert_close(
        torch.tensor(warm),
        torch.tensor([min(1, (t + 1) / 4) * c for t, c in enumerate(cosine)]),
        atol=1e-9,
        rtol=0,
    )
    assert warm[0] == pytest.approx(0.25) and max(warm) == warm[3]


@pytest.mark.parametrize("warmup", [-1, 11, 2.5, True])
def test_refine_refuses_a_warmup_outside_its_steps(warmup):
    with pytest.raises(GQAError, match="warmup"):
        Refine(steps=10, warmup=warmup)


def _refined_logits(**options) -> torch.Tensor:
    """Logits of the tiny Llama (`llama-mha`, built afresh: `make` is seeded) converted to 2 KV heads by
    `hf_gqa.patch` with a short calibration and `options`; the same calibration data and input every call."""
    original = next(c for c in CASES if c.name == "llama-mha").make()
    calibration = torch.randint(3, 200, (512,), generator=torch.Generator().manual_seed(5))
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(2))
    model = hf_gqa.patch(
        original,
        groups=2,
        calibration=calibration,
        calibration_tokens=256,
        block_size=64,
        show_progress=False,
        **options,
    )
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_refine_warmup_reaches_the_fit_from_patch_keywords():
    """`refine_warmup=` / `refine_lr=` are `Refine(warmup=, lr=)`, and a warmup changes the fit (it is not ignored)."""
    by_keywords = _refined_logits(refine_steps=6, refine_warmup=3, refine_lr=1e-3, refine_positions=16)
    by_method = _refined_logits(method=Refine(steps=6, warmup=3, lr=1e-3, positions=16))
    assert torch.equal(by_keywords, by_method)
    assert not torch.equal(by_keywords, _refined_logits(method=Refine(steps=6, lr=1e-3, positions=16)))


def test_attention_scope_refine_takes_its_warmup():
    warm = _refined_logits(method=Refine(steps=6, lr=1e-3, warmup=3, scope="attention"))
    assert not torch.equal(warm, _refined_logits(method=Refine(steps=6, lr=1e-3, scope="attention")))
