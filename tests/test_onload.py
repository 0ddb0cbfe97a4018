"""Calibrated conversion of checkpoints on disk, one decoder layer at a time (`hf_gqa.convert_checkpoint(...,
calibration=...)`, `hf_gqa.onload`): on every family, from a checkpoint saved in many small shards, the result
equals the in-memory calibrated conversion (`patch` of the loaded model, then `save_pretrained`).

Tolerance: on the CPU the onloaded path runs the very same per-layer step (`hf_gqa.pipeline.sequential_step`) on
the same weights, calls and hidden states, so the results are bit-identical in practice (measured: 0.0 on every
family); the tests allow `atol=1e-6, rtol=1e-5` (float32 round-off) so that a change of kernel or thread count
does not fail them, and say so when they are not exact.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import hf_gqa
import hf_gqa.data
import hf_gqa.memory
import hf_gqa.onload
import hf_gqa.streaming
from hf_gqa.cli import main
from hf_gqa.io import empty_model, to_model_keys
from hf_gqa.methods import Refine

from .cases import FamilyCase, all_cases
from .tiny import calibration_ids, logits, tiny_llama

CASES = all_cases()
IDS = [c.name for c in CASES]
CALIB = dict(calibration_tokens=128, block_size=32, batch_size=2)
TOLERANCE = dict(atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny matrices run no faster on two, and much slower on a machine that is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `folder`, by model tensor name (a name transformers renames when
    saving, such as GPT-NeoX's `lm_head.` saved as `embed_out.`, is read back under the model's name)."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return to_model_keys(empty_model(AutoConfig.from_pretrained(folder)), out)


def assert_close_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())[:5]
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        torch.testing.assert_close(got[key], want[key], **TOLERANCE, msg=key)


def in_memory(src, dst, groups, dtype=None, **kwargs):
    """The in-memory calibrated path: load, patch, save; returns the patched model."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or "auto")
    hf_gqa.patch(model, groups=groups, calibration=calibration_ids(), show_progress=False, **CALIB, **kwargs)
    model.save_pretrained(dst)
    return model


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_onloaded_equals_in_memory_calibrated(case: FamilyCase, tmp_path, ids):
    src, dst, ref = tmp_path / "src", tmp_path / "dst", tmp_path / "ref"
    case.make().save_pretrained(src, max_shard_size="40KB")
    assert len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]) > 4
    groups = case.groups[-1]
    report = hf_gqa.convert_checkpoint(
        src,
        dst,
        groups=groups,
        calibration=calibration_ids(),
        refine_steps=3,
        max_shard_size="60KB",
        show_progress=False,
        **CALIB,
    )
    assert report.shards > 1 and report.layers == 2 and report.calibration_tokens == 128
    assert len(report.seconds_per_layer) == 2 and [log["layer"] for log in report.logs] == [0, 1]
    expected = in_memory(src, ref, groups, refine_steps=3)
    assert report.logs == expected._hf_gqa_conversion_log
    # the saved checkpoints, tensor for tensor
    assert_close_states(saved_tensors(dst), saved_tensors(ref))
    loaded, reference = hf_gqa.from_pretrained(dst), hf_gqa.from_pretrained(ref)
    assert loaded.config.hf_gqa == reference.config.hf_gqa
    torch.testing.assert_close(logits(loaded, ids), logits(reference, ids), **TOLERANCE)
    if case.native_gqa and not hf_gqa.needs_hf_gqa_to_load(loaded):
        plain = AutoModelForCausalLM.from_pretrained(dst)
        torch.testing.assert_close(logits(plain, ids), logits(reference, ids), **TOLERANCE)


@pytest.mark.parametrize(
    "settings",
    [
        dict(method=Refine(steps=3, scope="attention")),
        dict(method=Refine(steps=3, target="local")),
        dict(refine_steps=3, sequential=False),
        dict(method="score"),
        dict(method="mean", refine_steps=3, grouping="similarity"),
        dict(method=Refine(steps=3, positions=8)),
        dict(refine_steps=3, refine_train="attention"),
    ],
    ids=[
        "attention-scope",
        "local-target",
        "not-sequential",
        "score",
        "mean-refine-similarity",
        "positions",
        "train-attention",
    ],
)
def test_onloaded_settings_match_patch(settings, tmp_path, ids):
    src, dst, ref = tmp_path / "src", tmp_path / "dst", tmp_path / "ref"
    tiny_llama(kv=4).save_pretrained(src, max_shard_size="30KB")
    hf_gqa.convert_checkpoint(
        src, dst, groups=2, calibration=calibration_ids(), show_progress=False, **CALIB, **settings
    )
    patch_settings = dict(settings)
    if "method" in patch_settings and "refine_steps" in patch_settings:
        patch_settings["merge"] = patch_settings.pop("method")
    in_memory(src, ref, 2, **patch_settings)
    assert_close_states(saved_tensors(dst), saved_tensors(ref))


def test_memory_mapped_activations_give_the_same_result(tmp_path):
    src, mapped, kept = tmp_path / "src", tmp_path / "mapped", tmp_path / "kept"
    tiny_llama().save_pretrained(src, max_shard_size="30KB")
    kwargs = dict(groups=1, calibration=calibration_ids(), refine_steps=2, show_progress=False, **CALIB)
    hf_gqa.convert_checkpoint(src, mapped, activations_on_disk_above=0, **kwargs)
    hf_gqa.convert_checkpoint(src, kept, **kwargs)
    got, want = saved_tensors(mapped), saved_tensors(kept)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_activation_store_maps_to_a_temp_file():
    store = hf_gqa.onload.ActivationStore(on_disk_above=0)
    batches = [torch.randn(2, 3, 4), torch.randn(1, 3, 4)]
    store.put(batches)
    assert store.on_disk and all(torch.equal(a, b) for a, b in zip(store.get("cpu"), batches))
    store.put([b + 1 for b in batches])
    assert all(torch.equal(a, b + 1) for a, b in zip(store.get("cpu"), batches))
    store.close()
    assert not store.on_disk


def test_bf16_checkpoint_computes_in_float32_and_stays_bf16(tmp_path):
    src, dst, ref = tmp_path / "src", tmp_path / "dst", tmp_path / "ref"
    tiny_llama().to(torch.bfloat16).save_pretrained(src, max_shard_size="30KB")
    hf_gqa.convert_checkpoint(
        src, dst, groups=2, calibration=calibration_ids(), refine_steps=2, show_progress=False, **CALIB
    )
    got = saved_tensors(dst)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    expected = in_memory(src, ref, 2, dtype=torch.float32, refine_steps=2)
    want = {k: v.to(torch.bfloat16) for k, v in saved_tensors(ref).items()}
    # float32 results rounded to bf16 the same way: equal up to a float32 round-off that flips a rounding
    for key in want:
        torch.testing.assert_close(got[key].float(), want[key].float(), atol=1e-2, rtol=1e-2, msg=key)
    assert expected.dtype == torch.float32


def test_compute_dtype_none_computes_in_the_checkpoint_dtype(tmp_path):
    src, dst, ref = tmp_path / "src", tmp_path / "dst", tmp_path / "ref"
    tiny_llama().to(torch.bfloat16).save_pretrained(src, max_shard_size="30KB")
    hf_gqa.convert_checkpoint(
        src,
        dst,
        groups=2,
        calibration=calibration_ids(),
        method="score",
        compute_dtype=None,
        show_progress=False,
        **CALIB,
    )
    in_memory(src, ref, 2, merge="score")  # loaded with dtype="auto": bf16
    assert_close_states(saved_tensors(dst), saved_tensors(ref))


def test_the_calibrated_plan_states_layers_tokens_and_memory(tmp_path):
    src = tmp_path / "src"
    tiny_llama().to(torch.bfloat16).save_pretrained(src, max_shard_size="30KB")
    plan = hf_gqa.streaming.plan_checkpoint(
        src, groups=2, calibrated=True, calibration_tokens=100, block_size=32, batch_size=2, refine_steps=5
    )
    estimate = plan.calibrated
    assert plan.method.label == "score+refine" and estimate.layers == 2 and estimate.tokens == 96
    layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64  # q/k/v/o, the MLP, two norms: float32 in the computation
    assert estimate.layer_bytes == layer * 4 and estimate.trained_bytes == layer * 4
    assert estimate.activation_bytes == 96 * 64 * 4 and estimate.source_layer_bytes == layer * 2
    # the trained copy, Adam's two moments and the start: 4 layers (the original freed once copied), activations
    assert (
        estimate.freed_bytes == estimate.layer_bytes and estimate.device_peak_bytes > 4 * estimate.layer_bytes
    )
    light = hf_gqa.streaming.plan_checkpoint(
        src, groups=2, calibrated=True, calibration_tokens=100, block_size=32, batch_size=2, refine_steps=5,
        refine_train="attention",
    ).calibrated  # fmt: skip
    assert light.trained_bytes == 4 * 64 * 64 * 4  # the attention's q/k/v/o as read (the plan's upper bound)
    # the MLP is shared with the original layer; the original attention is freed once copied
    assert light.freed_bytes == light.trained_bytes
    rest = estimate.refine_phase_bytes - 4 * estimate.trained_bytes  # activations and one batch: the same
    assert light.refine_phase_bytes == light.layer_bytes - light.freed_bytes + 4 * light.trained_bytes + rest
    imports = hf_gqa.onload.IMPORTS_BYTES
    for e in (estimate, light):
        # the merge holds the layer and 4 x the [D + 1, D + 1] float64 statistics; the device peaks in its largest
        # phase, and on a CPU device the host adds the imports, not also the layer as read and the output shard
        assert e.stats_bytes == 65 * 65 * 8
        assert (
            e.merge_phase_bytes
            == e.layer_bytes + e.device_activation_copies * e.activation_bytes + 4 * e.stats_bytes
        )
        assert e.device_peak_bytes == max(e.refine_phase_bytes, e.merge_phase_bytes)  # the capture is smaller
        assert e.host_peak_bytes == imports + e.device_peak_bytes
    assert estimate.host_peak_bytes > light.host_peak_bytes
    text = str(plan)
    for words in ("2 decoder layers", "96 calibration tokens", "estimated peak device memory", "host memory"):
        assert words in text, words
    data_free = hf_gqa.streaming.plan_checkpoint(src, groups=2)
    assert data_free.calibrated is None and "weights in memory at most about" in str(data_free)


def test_bad_input_fails_before_writing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tiny_llama().save_pretrained(src)
    with pytest.raises(hf_gqa.GQAError, match="tokenizer"):
        hf_gqa.convert_checkpoint(src, dst, groups=2, calibration="some text", show_progress=False)
    with pytest.raises(hf_gqa.GQAError, match="not a folder"):
        hf_gqa.convert_checkpoint(tmp_path / "missing", dst, groups=2, calibration=calibration_ids())
    with pytest.raises(hf_gqa.GroupsError, match="divide"):
        hf_gqa.convert_checkpoint(src, dst, groups=3, calibration=calibration_ids())
    with pytest.raises(hf_gqa.GQAError, match="auto"):
        hf_gqa.convert_checkpoint(src, dst, groups="auto", calibration=calibration_ids())
    with pytest.raises(hf_gqa.GQAError, match="vocabulary"):
        hf_gqa.convert_checkpoint(src, dst, groups=2, calibration=torch.arange(1000, 2000), block_size=32)
    with pytest.raises(hf_gqa.GQAError, match="calibration_tokens"):
        hf_gqa.convert_checkpoint(src, dst, groups=2, calibration=calibration_ids(), calibration_tokens=0)
    with pytest.raises(hf_gqa.GQAError, match="need calibration data"):
        hf_gqa.convert_checkpoint(src, dst, groups=2, method="refine")
    assert not dst.exists()


def test_cli_converts_a_folder_one_layer_at_a_time(tmp_path, capsys):
    from .tokenizer_fixture import load_tokenizer
    from .tokenizer_fixture import tiny_llama as tiny_llama_for_tokenizer

    src, dst, ref = tmp_path / "src", tmp_path / "dst", tmp_path / "ref"
    tokenizer = load_tokenizer()
    tiny_llama_for_tokenizer().save_pretrained(src, max_shard_size="4MB")
    tokenizer.save_pretrained(src)
    text = tmp_path / "corpus.txt"
    text.write_text(hf_gqa.data.calibration_text()[:8000])
    argv = ["convert", "--model", str(src), "--groups", "2", "--calibration", str(text)]
    argv += ["--calibration-tokens", "512", "--refine-steps", "3", "--out", str(dst)]
    assert main([*argv, "--dry-run"]) == 0
    shown = capsys.readouterr().out
    assert "512 calibration tokens" in shown and "estimated peak device memory" in shown
    assert not dst.exists()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "one at a time on cpu" in out and "AutoModelForCausalLM.from_pretrained(path)" in out
    assert main([*argv[:-1], str(ref), "--no-stream"]) == 0
    assert_close_states(saved_tensors(dst), saved_tensors(ref))
    assert (dst / "tokenizer.json").exists() or (dst / "tokenizer_config.json").exists()


def test_cli_names_remote_code_for_multi_head_families(tmp_path, capsys):
    from .cases.mha_shared import gpt2_config, make_model

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_model(gpt2_config)().save_pretrained(src)
    assert main(["convert", "--model", str(src), "--groups", "2", "--out", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "trust_remote_code=True" in out and "hf_gqa.from_pretrained(path)" in out


@pytest.mark.parametrize("train", ["layer", "attention"])
def test_the_original_layer_is_freed_while_its_copy_fits(train, tmp_path, monkeypatch):
    """Onloaded, a refine that trains a whole copy of the layer fits with the original's weights already freed
    (back on the meta device: one float32 layer less); one that trains the attention alone shares the
    original's MLP and norms, which must stay, and fits with the original attention's weights freed."""
    import hf_gqa.pipeline

    seen: list[set[str]] = []
    fit = hf_gqa.pipeline.refine_module

    def recording(original, converted, *args, **kwargs):
        seen.append({name for name, p in original.named_parameters() if p.is_meta})
        assert not any(p.is_meta for p in converted.parameters())
        return fit(original, converted, *args, **kwargs)

    monkeypatch.setattr(hf_gqa.pipeline, "refine_module", recording)
    src, dst = tmp_path / "src", tmp_path / "dst"
    tiny_llama(kv=4).save_pretrained(src, max_shard_size="30KB")
    hf_gqa.convert_checkpoint(
        src, dst, groups=2, calibration=calibration_ids(), refine_steps=2, refine_train=train,
        show_progress=False, **CALIB,
    )  # fmt: skip
    names = {name for name, _ in tiny_llama(kv=4).model.layers[0].named_parameters()}
    freed = names if train == "layer" else {n for n in names if n.startswith("self_attn.")}
    assert freed and seen == [freed] * 2


def test_large_allocations_are_mapped_only_during_the_run(monkeypatch):
    """glibc's mmap threshold is fixed low for the run and set to 32 MiB after it (a no-op without glibc)."""
    import ctypes

    calls: list[tuple[int, int]] = []
    real = ctypes.CDLL(None)
    if not hasattr(real, "mallopt"):
        pytest.skip("no glibc mallopt here")

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    with hf_gqa.memory.large_allocations_mapped():
        assert calls == [(-3, 1 << 20)]
    assert calls == [(-3, 1 << 20), (-3, 32 << 20)]
    calls.clear()
    with pytest.raises(RuntimeError), hf_gqa.memory.large_allocations_mapped():
        raise RuntimeError("a failed run")
    assert calls[-1] == (-3, 32 << 20)
    calls.clear()
    with hf_gqa.memory.large_allocations_mapped(during=1 << 20):
        with hf_gqa.memory.large_allocations_mapped(during=4 << 20):
            pass
        assert calls[-1] == (-3, 1 << 20)  # a nested block gives back the enclosing block's threshold
    assert calls[-1] == (-3, 32 << 20)


def test_building_a_meta_model_leaves_no_free_blocks_in_the_heap():
    """accelerate's empty-weight init allocates every parameter on the CPU before moving it to meta; those blocks
    must not come from glibc's heap, where they would stay as free blocks that later hold a layer's weights."""
    import ctypes

    from transformers import LlamaConfig

    class MallInfo2(ctypes.Structure):
        names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        _fields_ = [(name, ctypes.c_size_t) for name in names.split()]  # all ten: returned by value

    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        pytest.skip("no glibc mallinfo2 here")
    mallinfo2.restype = MallInfo2
    config = LlamaConfig(
        vocab_size=1000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=8
    )  # 4 MiB attention projections, 16 MiB MLP matrices: 0.5 GiB of parameters
    hf_gqa.memory.release_freed_memory()
    before = mallinfo2().arena
    empty_model(config)
    grown = mallinfo2().arena - before
    assert grown < 1 << 20, grown


@pytest.mark.parametrize("low_memory", [True, False])
def test_low_memory_chooses_the_mmap_threshold_of_the_run(low_memory, tmp_path, monkeypatch):
    """`convert_checkpoint(low_memory=...)` and `hf-gqa convert --[no-]low-memory` set glibc's mmap threshold for
    the whole run, planning included: 1 MiB (what is freed leaves at once) or 32 MiB (fewer page faults); the
    result is the same."""
    from .tokenizer_fixture import load_tokenizer
    from .tokenizer_fixture import tiny_llama as tiny_llama_for_tokenizer

    seen: list[int] = []
    events: list[str] = []
    real = hf_gqa.memory.large_allocations_mapped
    real_plan = hf_gqa.streaming.plan_checkpoint

    @contextlib.contextmanager
    def recording(during, **kwargs):
        seen.append(during)
        with real(during=during, **kwargs):
            events.append("fixed")
            yield
        events.append("released")

    def planning(*args, **kwargs):
        events.append("plan")
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(hf_gqa.memory, "large_allocations_mapped", recording)
    monkeypatch.setattr(hf_gqa.streaming, "plan_checkpoint", planning)
    src = tmp_path / "src"
    tiny_llama_for_tokenizer().save_pretrained(src, max_shard_size="4MB")
    load_tokenizer().save_pretrained(src)
    text = tmp_path / "corpus.txt"
    text.write_text(hf_gqa.data.calibration_text()[:4000])
    flag = "--low-memory" if low_memory else "--no-low-memory"
    argv = ["convert", "--model", str(src), "--groups", "2", "--calibration", str(text)]
    argv += ["--calibration-tokens", "256", "--refine-steps", "2"]
    assert main([*argv, "--out", str(tmp_path / "a"), flag]) == 0
    assert seen == [(1 << 20) if low_memory else (32 << 20)]
    # planning builds meta models: under the fixed threshold, or their blocks stay in glibc's heap for the layers
    assert events == ["fixed", "plan", "released"]
    other = "--no-low-memory" if low_memory else "--low-memory"
    assert main([*argv, "--out", str(tmp_path / "b"), other]) == 0
    assert seen[1] != seen[0]
    a, b = saved_tensors(tmp_path / "a"), saved_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
