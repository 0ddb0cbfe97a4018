"""Conversion methods as registered objects, the pipeline `patch` picks from what they declare, and the older
`merge=` / `refine_*=` spellings that map onto them."""

from __future__ import annotations

import copy
import importlib
import logging
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_gqa
from hf_gqa import pipeline
from hf_gqa.methods import METHODS, Merge, Refine, get_method, register_merge

from .tiny import calibration_ids, logits, tiny_llama

PATCH_MODULE = importlib.import_module("hf_gqa.patch")  # `hf_gqa.patch` the attribute is the function
CALIB = dict(calibration_tokens=128, block_size=32, batch_size=2, show_progress=False)


def test_methods_declare_what_they_need():
    assert not get_method("mean").needs_calibration and not get_method("first").needs_calibration
    for name in ("pca", "score", "procrustes", "refine"):
        assert get_method(name).needs_calibration and get_method(name).folds_maps, name
    refine = get_method("refine", steps=7, scope="attention")
    assert refine == Refine(steps=7, scope="attention") and refine.label == "score+refine"
    assert Refine(init="mean").folds_maps is False and Refine(init="mean").label == "mean+refine"
    assert Refine(steps=0).label == "score"
    assert sorted(METHODS) == ["first", "mean", "pca", "procrustes", "refine", "score"]


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(steps=-1), "steps"),
        (dict(lr=0), "lr"),
        (dict(target="nowhere"), "target"),
        (dict(scope="model"), "scope"),
        (dict(init="refine"), "closed-form"),
        (dict(init="nope"), "Unknown method"),
        (dict(scope="attention", positions=8), "positions apply to scope='layer'"),
        (dict(train="mlp"), "train must be one of"),
    ],
)
def test_refine_settings_are_validated(settings, match):
    with pytest.raises(hf_gqa.GQAError, match=match):
        Refine(**settings)


def test_unknown_method_lists_every_method_refine_included():
    with pytest.raises(hf_gqa.GQAError, match="first, mean, pca, procrustes, refine, score"):
        hf_gqa.patch(tiny_llama(), groups=2, merge="nope")


def test_method_object_and_older_spelling_convert_identically(ids):
    data = calibration_ids()
    older = hf_gqa.patch(
        tiny_llama(),
        groups=2,
        merge="refine",
        refine_steps=4,
        refine_scope="attention",
        calibration=data,
        **CALIB,
    )
    newer = hf_gqa.patch(
        tiny_llama(), groups=2, method=Refine(steps=4, scope="attention"), calibration=data, **CALIB
    )
    torch.testing.assert_close(logits(newer, ids), logits(older, ids), atol=0, rtol=0)
    assert older.config.hf_gqa["merge"] == newer.config.hf_gqa["merge"] == "score+refine"
    from_mean = hf_gqa.patch(tiny_llama(), groups=2, merge="mean", refine_steps=4, calibration=data, **CALIB)
    assert from_mean.config.hf_gqa["merge"] == "mean+refine"
    with pytest.raises(hf_gqa.GQAError, match="not both"):
        hf_gqa.patch(tiny_llama(), groups=2, merge="mean", method="mean")


def test_the_pipeline_follows_the_declaration(monkeypatch):
    """A data-free method never runs the model; a calibrated one runs the sequential pipeline once."""
    calls = {"data_free": 0, "sequential": 0}
    data_free, sequential = pipeline.run_data_free, pipeline.run_sequential

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(PATCH_MODULE, "run_data_free", count("data_free", data_free))
    monkeypatch.setattr(PATCH_MODULE, "run_sequential", count("sequential", sequential))
    model = tiny_llama()
    forwards = []
    model.model.layers[0].register_forward_pre_hook(lambda *a: forwards.append(1))
    hf_gqa.patch(
        model, groups=4, merge="mean", calibration=calibration_ids(), **CALIB
    )  # data unused: data-free
    assert calls == {"data_free": 1, "sequential": 0} and not forwards
    hf_gqa.patch(tiny_llama(), groups=4, merge="score", calibration=calibration_ids(), **CALIB)
    assert calls == {"data_free": 1, "sequential": 1}


def test_registered_merge_with_its_declaration(ids):
    def halves(weights, groups, stats):
        merged = get_method("mean").merge(weights, groups, stats)
        return merged.replace(v=merged.v * 0.5)

    register_merge("halves", halves)
    try:
        model = hf_gqa.patch(tiny_llama(), groups=2, merge="halves")
        assert model.config.hf_gqa["merge"] == "halves"
        register_merge("halves", halves, needs_calibration=True)
        with pytest.raises(hf_gqa.GQAError, match="calibration"):
            hf_gqa.patch(tiny_llama(), groups=2, merge="halves")
    finally:
        METHODS.pop("halves")
    custom = hf_gqa.patch(tiny_llama(), groups=2, method=Merge("custom", halves))
    by_function = hf_gqa.patch(tiny_llama(), groups=2, merge=halves)
    torch.testing.assert_close(logits(custom, ids), logits(by_function, ids), atol=0, rtol=0)


def test_loading_a_converted_checkpoint_does_not_convert(tmp_path, ids, caplog):
    """`from_pretrained` rebuilds the saved layout from the adapters: no `patch`, no conversion notice."""
    from transformers import GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=8)
    ).eval()
    hf_gqa.patch(model, groups=[4, 2])
    model.save_pretrained(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained called patch")

    original_patch = PATCH_MODULE.patch
    PATCH_MODULE.patch = refuse
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger="hf_gqa"):
            loaded = hf_gqa.from_pretrained(tmp_path)
    finally:
        PATCH_MODULE.patch = original_patch
    assert "mean pooling" not in caplog.text
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)
    assert hf_gqa.describe(loaded).to_dict() == hf_gqa.describe(model).to_dict()


def test_import_loads_neither_lm_eval_nor_matplotlib():
    code = (
        "import sys, hf_gqa; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'matplotlib')]; "
        "print(bad); assert not bad, bad; "
        "assert hf_gqa.data.calibration_text().strip(); "
        "hf_gqa.evaluation.register_lm_eval_model(); assert 'lm_eval' in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_adapters_own_their_family_facts():
    for adapter in hf_gqa.architectures.ADAPTERS:
        assert adapter.lora_targets, adapter.family
    model = hf_gqa.patch(copy.deepcopy(tiny_llama(kv=4)), groups=2)
    assert model.config.num_key_value_heads == 2
