"""Streamed data-free conversion of checkpoints on disk (`hf_gqa.convert_checkpoint`): the result equals `patch`
of the loaded model tensor for tensor, on every family, from a checkpoint saved in many small shards."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_gqa
import hf_gqa.streaming

from .cases import FamilyCase, all_cases
from .tiny import logits, tiny_llama

CASES = all_cases()
IDS = [c.name for c in CASES]


def assert_same_state(model, expected) -> None:
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_streamed_equals_patch_bit_for_bit(case: FamilyCase, tmp_path, ids):
    src, dst = tmp_path / "src", tmp_path / "dst"
    case.make().save_pretrained(src, max_shard_size="40KB")
    assert len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]) > 4
    groups = case.groups[-1]
    report = hf_gqa.convert_checkpoint(src, dst, groups=groups, max_shard_size="60KB", show_progress=False)
    assert report.shards > 1 and report.layers == 2
    expected = hf_gqa.patch(case.make(), groups=groups)
    loaded = hf_gqa.from_pretrained(dst)
    assert_same_state(loaded, expected)
    assert loaded.config.hf_gqa == expected.config.hf_gqa
    torch.testing.assert_close(logits(loaded, ids), logits(expected, ids), atol=0, rtol=0)
    if case.native_gqa and not hf_gqa.needs_hf_gqa_to_load(loaded):
        plain = AutoModelForCausalLM.from_pretrained(dst)
        torch.testing.assert_close(logits(plain, ids), logits(expected, ids), atol=0, rtol=0)


def test_bf16_checkpoint_stays_bf16_and_per_layer_groups(tmp_path, ids):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tiny_llama().to(torch.bfloat16).save_pretrained(src, max_shard_size="30KB")
    hf_gqa.convert_checkpoint(src, dst, groups=[4, 1], show_progress=False)
    files = sorted(dst.glob("*.safetensors"))
    dtypes = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            dtypes |= {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}
    expected = hf_gqa.patch(AutoModelForCausalLM.from_pretrained(src, dtype="auto"), groups=[4, 1])
    assert_same_state(hf_gqa.from_pretrained(dst), expected)


def test_a_converted_checkpoint_converts_further(tmp_path, ids):
    src, mid, dst = tmp_path / "src", tmp_path / "mid", tmp_path / "dst"
    from .cases.mha_shared import gpt2_config, make_model

    make_model(gpt2_config)().save_pretrained(src)
    hf_gqa.convert_checkpoint(src, mid, groups=4, show_progress=False)
    hf_gqa.convert_checkpoint(mid, dst, groups=2, show_progress=False)
    twice = hf_gqa.patch(hf_gqa.patch(make_model(gpt2_config)(), groups=4), groups=2)
    loaded = hf_gqa.from_pretrained(dst)
    assert_same_state(loaded, twice)
    assert loaded.config.hf_gqa["original_kv_heads"] == [8, 8]


def test_calibrated_methods_and_bad_groups_are_refused_before_writing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tiny_llama().save_pretrained(src)
    with pytest.raises(hf_gqa.GQAError, match="calibration"):
        hf_gqa.convert_checkpoint(src, dst, groups=2, method="refine")
    with pytest.raises(hf_gqa.GroupsError, match="divide"):
        hf_gqa.convert_checkpoint(src, dst, groups=3)
    with pytest.raises(hf_gqa.GQAError, match="safetensors"):
        hf_gqa.convert_checkpoint(tmp_path, dst, groups=2)
    assert not dst.exists()


def test_the_plan_sizes_output_and_memory_before_reading_weights(tmp_path):
    src = tmp_path / "src"
    tiny_llama().to(torch.bfloat16).save_pretrained(src, max_shard_size="30KB")
    plan = hf_gqa.streaming.plan_checkpoint(src, groups=2, max_shard_size="50KB")
    source = 0
    for file in src.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            source += sum(f.get_tensor(k).numel() * 2 for k in f.keys())
    assert plan.source_bytes == source
    # k_proj and v_proj shrink from 8 to 2 heads: 2 * 2 layers * 6 * d * hidden bf16 values fewer
    assert plan.source_bytes - plan.output_bytes == 2 * 2 * 6 * 8 * 64 * 2
    assert plan.largest_shard_bytes <= 50_000 and plan.largest_module_bytes == 4 * 64 * 64 * 2
    assert "weights in memory at most about" in str(plan)
    dst = tmp_path / "dst"
    hf_gqa.convert_checkpoint(src, dst, groups=2, max_shard_size="50KB", show_progress=False)
    written = sorted(dst.glob("*.safetensors"))
    assert len(written) == len(plan.layout.filename_to_tensors)
