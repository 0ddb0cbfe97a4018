"""Inputs that used to go wrong after weights were touched (or silently): each is now refused before any weight
is touched, with a message that says what to do, or gives the right result."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen3Config

import hf_gqa
from hf_gqa.calibration import calibration_blocks

from .cases import TINY
from .cases.mha_shared import gpt2_config, make_model
from .cases.own_attention import CASES as OWN_ATTENTION_CASES
from .tiny import calibration_ids, logits, tiny_llama
from .tokenizer_fixture import load_tokenizer

OWN_ATTENTION = {c.name: c for c in OWN_ATTENTION_CASES}
CALIB = dict(calibration_tokens=128, block_size=32, batch_size=2, show_progress=False)


def snapshot(model) -> tuple[dict[str, torch.Tensor], list[type], dict]:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [type(m) for m in model.modules()],
        model.config.to_dict(),
    )


def assert_unchanged(model, before) -> None:
    state, classes, config = before
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [type(m) for m in model.modules()] == classes
    assert model.config.to_dict() == config
    assert not hf_gqa.is_patched(model)


# -- attn_implementation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_llama, make_model(gpt2_config), OWN_ATTENTION["falcon-new-mha"].make])
@pytest.mark.parametrize(
    "value, match",
    [("bogus", "bogus"), ("flash_attention_2", "flash_attention_2"), (123, "must be a string")],
)
def test_attn_implementation_is_validated_before_conversion(make, value, match):
    model = make()
    before = snapshot(model)
    with pytest.raises(hf_gqa.GQAError, match=match):
        hf_gqa.patch(model, groups=2, attn_implementation=value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("make", [tiny_llama, OWN_ATTENTION["bloom"].make])
def test_attn_implementation_eager_is_applied(make, ids):
    model = hf_gqa.patch(make(), groups=2, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    reference = hf_gqa.patch(make(), groups=2)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)


# -- PEFT adapters ------------------------------------------------------------------------------------------------
def test_lora_wrapped_base_model_is_refused_not_stripped():
    base = tiny_llama()
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["k_proj", "v_proj"], init_lora_weights=False)
    )
    inner = peft_model.get_base_model()
    before = snapshot(inner)
    with pytest.raises(hf_gqa.UnconvertibleWeightsError, match="merge_and_unload"):
        hf_gqa.patch(inner, groups=8)
    assert_unchanged(inner, before)
    merged = peft_model.merge_and_unload()
    expected = logits(merged, torch.arange(3, 15)[None])
    hf_gqa.patch(merged, groups=8)
    torch.testing.assert_close(logits(merged, torch.arange(3, 15)[None]), expected, atol=1e-5, rtol=0)


# -- train mode ---------------------------------------------------------------------------------------------------
def test_calibration_runs_without_dropout_and_the_mode_is_restored(ids):
    """Same seed, same result, though the caller's model is in train() mode with dropout on."""
    config = dict(resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    results = []
    for rng_state in range(2):
        model = make_model(gpt2_config, **config)().train()
        torch.manual_seed(rng_state)  # dropout, if it ran, would draw different masks in the two conversions
        hf_gqa.patch(model, groups=2, calibration=calibration_ids(), merge="refine", refine_steps=3, **CALIB)
        assert model.training and all(m.training for m in model.modules())
        results.append(logits(model.eval(), ids))
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)


def test_eval_mode_model_stays_in_eval_mode():
    model = hf_gqa.patch(tiny_llama(), groups=2, calibration=calibration_ids(), merge="score", **CALIB)
    assert not any(m.training for m in model.modules())


# -- weights hf_gqa cannot convert ---------------------------------------------------------------------------------
def test_dynamically_quantized_model_is_refused():
    model = torch.ao.quantization.quantize_dynamic(tiny_llama(), {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(hf_gqa.UnconvertibleWeightsError, match="quantized"):
        hf_gqa.patch(model, groups=2)
    assert not hf_gqa.is_patched(model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[3, 5] = bad
    before = snapshot(model)
    with pytest.raises(hf_gqa.UnconvertibleWeightsError, match="NaN or infinite"):
        hf_gqa.patch(model, groups=2)
    state, classes, config = before
    assert [type(m) for m in model.modules()] == classes and not hf_gqa.is_patched(model)


# -- calibration data and options ---------------------------------------------------------------------------------
def test_numpy_token_ids_are_ids_even_with_a_tokenizer():
    tokenizer = load_tokenizer()
    ids = np.random.default_rng(0).integers(3, 200, size=(4, 64))
    expected = calibration_blocks(torch.from_numpy(ids), None, num_tokens=128, block_size=32)
    torch.testing.assert_close(calibration_blocks(ids, tokenizer, num_tokens=128, block_size=32), expected)


@pytest.mark.parametrize("bad_id", [-1, 256, 10_000])
def test_calibration_ids_outside_the_vocabulary_are_refused(bad_id):
    model = tiny_llama()
    data = calibration_ids()
    data[17] = bad_id
    before = snapshot(model)
    with pytest.raises(hf_gqa.GQAError, match=r"\[0, 256\)"):
        hf_gqa.patch(model, groups=2, calibration=data, merge="score", **CALIB)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(block_size=0), "block_size"),
        (dict(batch_size=0), "batch_size"),
        (dict(calibration_tokens=-5), "calibration_tokens"),
        (dict(refine_steps=-1), "refine_steps"),
    ],
)
def test_bad_numeric_options_are_refused_early(options, match):
    model = tiny_llama()
    before = snapshot(model)
    kw = {**CALIB, **options}
    with pytest.raises(hf_gqa.GQAError, match=match):
        hf_gqa.patch(model, groups=2, calibration=calibration_ids(), **kw)
    assert_unchanged(model, before)


@pytest.mark.parametrize("budget", ["0.5", 0, 1.5, True])
def test_bad_kv_budget_is_refused_before_the_sensitivity_pass(budget):
    model = tiny_llama()
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(hf_gqa.GroupsError, match="kv_budget"):
        hf_gqa.patch(model, groups="auto", kv_budget=budget, calibration=calibration_ids(), **CALIB)
    assert not calls, "a forward pass ran before kv_budget was checked"


# -- configs shared between models --------------------------------------------------------------------------------
SHARED_CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, intermediate_size=128, num_attention_heads=8, num_key_value_heads=8),
    "gpt2": lambda: GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=8, n_positions=256),
}


@pytest.mark.parametrize("family", SHARED_CONFIGS)
def test_patch_never_writes_into_a_config_another_model_shares(family, ids, tmp_path):
    config = SHARED_CONFIGS[family]()
    torch.manual_seed(0)
    first = AutoModelForCausalLM.from_config(config).eval()
    torch.manual_seed(1)
    second = AutoModelForCausalLM.from_config(config).eval()
    assert first.config is second.config
    before = second.config.to_dict()
    expected = logits(second, ids)

    hf_gqa.patch(first, groups=2)
    assert second.config.to_dict() == before and not hf_gqa.is_patched(second)
    assert config.to_dict() == before
    assert hf_gqa.describe(first).layers[0].kv_heads_after == 2

    second.save_pretrained(tmp_path / "second")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "second")
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=0, rtol=0)
    first_logits = logits(first, ids)
    first.save_pretrained(tmp_path / "first")
    torch.testing.assert_close(
        logits(hf_gqa.from_pretrained(tmp_path / "first"), ids), first_logits, atol=0, rtol=0
    )


def test_modules_of_a_patched_model_share_its_own_config():
    config = LlamaConfig(**TINY, intermediate_size=128, num_attention_heads=8, num_key_value_heads=8)
    model = AutoModelForCausalLM.from_config(config)
    hf_gqa.patch(model, groups=2)
    assert model.config is not config
    attention = model.model.layers[0].self_attn
    assert attention.config is model.config
    model.set_attn_implementation("eager")
    assert attention.config._attn_implementation == "eager"


# -- methods a family cannot run ----------------------------------------------------------------------------------
def tiny_qwen3():
    torch.manual_seed(0)
    config = Qwen3Config(
        **TINY, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=8
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_qwen3_calibrated_default_converts_by_refining_mean_pooling(ids):
    model = tiny_qwen3()
    mean = hf_gqa.patch(copy.deepcopy(model), groups=1)
    hf_gqa.patch(model, groups=1, calibration=calibration_ids(), refine_steps=5, **CALIB)
    assert model.config.hf_gqa["merge"] == "mean+refine"
    assert not torch.equal(logits(model, ids), logits(mean, ids))


@pytest.mark.parametrize("merge", ["refine", "score", "pca"])
def test_qwen3_explicit_folding_merge_names_what_was_asked(merge):
    model = tiny_qwen3()
    before = snapshot(model)
    with pytest.raises(
        hf_gqa.GQAError, match=rf"merge='{merge}' cannot fold .*key normalisation.*merge='mean'"
    ):
        hf_gqa.patch(model, groups=1, merge=merge, calibration=calibration_ids(), **CALIB)
    assert_unchanged(model, before)
