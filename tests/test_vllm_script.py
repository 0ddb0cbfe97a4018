"""benchmarks/vllm_serve.py: its parsing and reporting pieces (no vLLM needed), and the whole run where vLLM's own
environment exists (`bash scripts/setup_vllm.sh`; slow: two engine starts)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


serve = _load("vllm_serve")

# What vLLM 0.32 logs once the engine core has allocated its KV cache (vllm/v1/core/kv_cache_utils.py).
LOG = """\
INFO 12-01 18:40:02 [cpu_worker.py:101] Using 1.0 GiB of memory for the KV cache
(EngineCore pid=1234) INFO 12-01 18:40:03 [kv_cache_utils.py:2327] CPU KV cache size: 23,296 tokens, \
Maximum concurrency for 2,048 tokens per request: 11.38x
INFO 12-01 18:40:09 [llm.py:380] Supported tasks: ['generate']
"""


def test_parse_kv_cache_tokens():
    assert serve.parse_kv_cache_tokens(LOG) == 23296
    assert serve.parse_kv_cache_tokens("GPU KV cache size: 1,234,567 tokens, Maximum concurrency") == 1234567
    assert serve.parse_kv_cache_tokens("GPU + host KV cache size: 512 tokens") == 512
    # the last line wins (an engine that logs twice); no line at all is None, not 0
    assert serve.parse_kv_cache_tokens(LOG + "CPU KV cache size: 69,888 tokens\n") == 69888
    assert serve.parse_kv_cache_tokens("INFO nothing about the cache") is None


def test_parse_worker_cores():
    log = (
        "(EngineCore pid=3) INFO [ompmultiprocessing.py:185] \tlocal_world_size=1, reserve_cpu_num=1\n"
        "(EngineCore pid=3) INFO [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]\n"
    )
    assert serve.parse_worker_cores(log) == [0]
    assert serve.parse_worker_cores("local_rank=0, core ids=[0, 1, 2]") == [0, 1, 2]
    assert serve.parse_worker_cores("nothing") is None


def test_compile_cache_state():
    assert (
        serve.compile_cache_state("[backbone] saved AOT compiled function to /root/.cache/vllm/x")
        == "compiled"
    )
    assert (
        serve.compile_cache_state("[backbone] Directly load AOT compilation from path /root/.cache/x")
        == "loaded"
    )
    assert serve.compile_cache_state("Enforce eager set, disabling torch.compile") is None


def test_uses_transformers_backend():
    assert serve.uses_transformers_backend(
        "(Worker pid=9855) INFO 12-01 22:45:20 [base.py:123] Using Transformers modeling backend."
    )
    assert not serve.uses_transformers_backend("INFO [model.py:733] Resolved architecture: GPT2LMHeadModel")


def test_error_line():
    log = (
        "(EngineCore pid=9) ERROR 12-01 [core.py:1] EngineCore failed to start.\n"
        "(EngineCore pid=9) ValueError: Layer 0 does not dispatch through the Transformers attention interface\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    # the engine core's root cause, not the front end's wrapper that points at it
    assert serve.error_line(log) == (
        "ValueError: Layer 0 does not dispatch through the Transformers attention interface"
    )
    assert serve.error_line("INFO all fine") is None


def test_compare_tokens():
    same = serve.compare_tokens([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]])
    assert same == {"identical": 2, "prompts": 2, "tokens_compared": [3, 2], "first_divergence": [None, None]}
    differ = serve.compare_tokens([[1, 2, 3, 4], [7, 8, 9]], [[1, 2, 9, 4], [7, 8, 9]])
    assert differ["identical"] == 1 and differ["first_divergence"] == [2, None]
    # one continuation stopped early (an end-of-sequence token the other did not pick): diverges where it stopped
    early = serve.compare_tokens([[1, 2, 3]], [[1, 2]])
    assert early["identical"] == 0 and early["first_divergence"] == [2]
    with pytest.raises(ValueError):
        serve.compare_tokens([[1]], [[1], [2]])


def test_agreement_text():
    assert serve.agreement_text(serve.compare_tokens([[1], [2]], [[1], [2]])) == "2/2 identical"
    text = serve.agreement_text(serve.compare_tokens([[1, 2], [3, 4]], [[1, 2], [3, 5]]))
    assert text == "1/2 identical (first difference: prompt 2 at new token 1)"


def test_kv_bytes_per_token_matches_the_logged_capacity():
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 x (K and V) x 4 bytes = 46,080 bytes per token; 1 GiB holds 23,301
    # tokens, which vLLM rounds down to whole blocks (128 tokens on CPU): the 23,296 it logs. One KV head: 69,888.
    original = serve.kv_bytes_per_token([3] * 30, 64, 4)
    converted = serve.kv_bytes_per_token([1] * 30, 64, 4)
    assert original == 46080 and converted == 15360
    assert (2**30 // original) // 128 * 128 == 23296
    assert (2**30 // converted) // 128 * 128 == 69888


def _report(rows):
    return {
        "command": "python benchmarks/vllm_serve.py --modes eager",
        "settings": {
            "checkpoints": {"original": "SmolLM2", "mean": "mean pooling"},
            "dtype": "float32",
            "max_model_len": 2048,
            "seed": 0,
            "kv_cache_gib": 1,
            "check_tokens": 32,
            "decode_prompts": 4,
            "decode_tokens": 64,
        },
        "environment": {
            "date": "2026-12-01T00:00:00+00:00",
            "versions": {"torch": "2.13.0+cpu", "transformers": "5.24.0"},
            "machine": {
                "cpu": "AMD EPYC",
                "cpu_cores": 2,
                "platform": "Linux",
                "load_average": [1.0, 1.0, 1.0],
            },
        },
        "prompts": ["a", "b", "c"],
        "rows": rows,
    }


def _row(name, tokens, heads, agreement):
    return {
        "checkpoint": name,
        "mode": "eager",
        "vllm_versions": {"vllm": "0.32.0", "torch": "2.13.0+cpu", "transformers": "5.19.0"},
        "kv_heads_per_layer": [heads] * 30,
        "kv_bytes_per_token": serve.kv_bytes_per_token([heads] * 30, 64, 4),
        "kv_cache_size_tokens": tokens,
        "log_agrees": True,
        "engine_start_s": 61.5,
        "throughput": {"decode_tokens_per_s": 40.1, "generate_tokens_per_s": 35.2},
        "agreement": agreement,
    }


def test_capacity_ratio_and_markdown():
    same = serve.compare_tokens([[1, 2]] * 3, [[1, 2]] * 3)
    differ = serve.compare_tokens([[1, 2]] * 3, [[1, 2], [1, 3], [1, 2]])
    rows = [
        _row("original", 23296, 3, same),
        _row("mean", 69888, 1, differ),
        {"checkpoint": "original", "mode": "compile", "error": "worker exit status 1: boom"},
    ]
    assert serve.capacity_ratios(rows, "eager") == {"mean": 3.0}
    assert serve.capacity_ratios(rows, "compile") == {}
    md = serve.render_markdown(_report(rows))
    assert "Command: `python benchmarks/vllm_serve.py --modes eager`" in md
    assert "vllm 0.32.0" in md and "transformers 5.19.0" in md and "transformers 5.24.0" in md
    assert "| original | eager | 3 | 46,080 | 23,296 | yes | 61.5 | 40.1 | 35.2 | 3/3 identical |" in md
    assert "2/3 identical (first difference: prompt 2 at new token 1)" in md
    assert "KV capacity ratio mean / original (eager): **3.0x**." in md
    assert "`mean` = mean pooling" in md
    assert "failed: worker exit status 1: boom" in md
    # identical shapes (`mean`, `calibrated`): their decode-speed gap is reported as the machine's noise
    calibrated = {**_row("calibrated", 69888, 1, same), "throughput": {"decode_tokens_per_s": 50.0}}
    assert "differ by 25% (eager)" in serve.same_shape_spread(rows + [calibrated])
    assert serve.same_shape_spread(rows) == ""
    assert "## Multi-head-only families" in md


def test_worker_imports_without_vllm():
    """The engine process re-imports the worker: its module level must not need vLLM, torch or hf_gqa."""
    code = (
        "import sys, importlib.util; sys.modules['vllm'] = None; sys.modules['torch'] = None; "
        f"s = importlib.util.spec_from_file_location('w', {str(ROOT / 'benchmarks' / '_vllm_worker.py')!r}); "
        "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print(callable(m.run))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_setup_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup_vllm.sh")], check=True)


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm: bash scripts/setup_vllm.sh")
def test_serve_original_and_converted(tmp_path):
    """Both checkpoints through vLLM (eager engines, a few minutes on 2 cores): capacity 3x, greedy tokens as
    transformers' for the original."""
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "vllm_serve.py"),
        "--modes",
        "eager",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
        "--check-tokens",
        "16",
        "--decode-tokens",
        "16",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    report = json.loads((tmp_path / "out" / "vllm.json").read_text())
    rows = {r["checkpoint"]: r for r in report["rows"]}
    assert rows["original"]["kv_cache_size_tokens"] == 23296
    assert rows["mean"]["kv_cache_size_tokens"] == 69888
    assert all(r["log_agrees"] for r in rows.values())
    assert rows["mean"]["kv_heads_per_layer"] == [1] * 30
    assert report["capacity_ratio"]["eager"] == {"mean": 3.0}
    assert rows["original"]["agreement"]["identical"] == rows["original"]["agreement"]["prompts"]


def _mh_row(family, checkpoint, saved, served, tokens, identical=True):
    reference = [[5, 6, 7], [8, 9, 9], [1, 2, 3]]
    served_tokens = reference if identical else [[5, 6, 7], [8, 9, 1], [1, 2, 3]]
    return {
        "family": family,
        "checkpoint": checkpoint,
        "transformers_class": "transformers_modules.GPT2GQALMHeadModel"
        if saved
        else "transformers.GPT2LMHeadModel",
        "reference_tokens": reference,
        "kv_heads_converted": saved,
        "vllm_versions": {"vllm": "0.32.0", "torch": "2.13.0+cpu", "transformers": "5.19.0"},
        "architecture": "TransformersForCausalLM" if saved else "GPT2LMHeadModel",
        "transformers_backend": bool(saved),
        "kv_heads_per_layer": served,
        "kv_cache_size_tokens": tokens,
        "log_agrees": True,
        "engine_start_s": 30.5,
        "agreement": serve.compare_tokens(reference, served_tokens),
    }


def _multi_head_section(rows):
    return {
        "command": "python benchmarks/vllm_serve.py --checkpoints '' --multi-head gpt2",
        "environment": {
            "date": "2026-12-02T00:00:00+00:00",
            "versions": {"torch": "2.13.0+cpu", "transformers": "5.24.0", "hf-gqa": "0.1.0"},
            "machine": {
                "cpu": "AMD EPYC",
                "cpu_cores": 2,
                "platform": "Linux",
                "load_average": [2.0, 2.0, 2.0],
            },
        },
        "settings": {
            "configs": {"gpt2": {"n_layer": 4, "n_head": 4, "eos_token_id": None}},
            "groups": {"uniform-2": [2, 2, 2, 2], "per-layer": [2, 1, 2, 1]},
            "prompts": {"count": 3, "length": 8, "seed": 3},
            "check_tokens": 32,
            "kv_cache_gib": 1,
            "max_model_len": 256,
            "seed": 0,
        },
        "rows": rows,
    }


def test_multi_head_capacity_ratios():
    assert serve.expected_capacity_ratio([4] * 4, [2, 1, 2, 1]) == 2.667
    rows = [
        _mh_row("gpt2", "original", None, [4] * 4, 262144),
        _mh_row("gpt2", "uniform-2", [2] * 4, [2] * 4, 524288),
        _mh_row("gpt2", "per-layer", [2, 1, 2, 1], [2, 1, 2, 1], 699040),
        {"family": "gpt2", "checkpoint": "uniform-1", "error": "worker exit status 1: boom"},
    ]
    serve.add_capacity_ratios(rows)
    assert (rows[1]["capacity_ratio"], rows[1]["expected_ratio"]) == (2.0, 2.0)
    assert (rows[2]["capacity_ratio"], rows[2]["expected_ratio"]) == (2.667, 2.667)
    assert "capacity_ratio" not in rows[0] and "capacity_ratio" not in rows[3]


def test_multi_head_section_renders_and_merges_into_an_earlier_report():
    rows = [
        _mh_row("gpt2", "original", None, [4] * 4, 262144),
        _mh_row("gpt2", "per-layer", [2, 1, 2, 1], [2, 1, 2, 1], 699040, identical=False),
        {
            "family": "gpt2",
            "checkpoint": "uniform-1",
            "transformers_class": "transformers_modules.GPT2GQALMHeadModel",
            "kv_heads_converted": [1] * 4,
            "error": "worker exit status 1: boom",
        },
    ]
    serve.add_capacity_ratios(rows)
    earlier = {**_report([_row("original", 23296, 3, serve.compare_tokens([[1]], [[1]]))]), "probe_gpt2": {}}
    run = {**_report([]), "multi_head": _multi_head_section(rows)}
    merged = serve.merged_report(earlier, run)
    assert merged["rows"] == earlier["rows"] and "probe_gpt2" not in merged
    assert merged["multi_head"] == run["multi_head"]
    md = serve.render_markdown(merged)
    assert "| original | eager | 3 | 46,080 | 23,296 |" in md  # the earlier rows stay
    assert "### Multi-head-only families served from hf_gqa's remote code" in md
    assert "Command: `python benchmarks/vllm_serve.py --checkpoints '' --multi-head gpt2`" in md
    assert (
        "| gpt2 | original | all (multi-head) | transformers.GPT2LMHeadModel | GPT2LMHeadModel | 4, 4, 4, 4 | "
        "262,144 | yes |  | 30.5 | 3/3 identical | 8 of 9 |" in md
    )
    assert (
        "| gpt2 | per-layer | 2, 1, 2, 1 | transformers_modules.GPT2GQALMHeadModel | TransformersForCausalLM "
        "(Transformers backend) | 2, 1, 2, 1 | 699,040 | yes | 2.667x (2.667x) | 30.5 | 2/3 identical (first difference: prompt 2 at new "
        "token 2) | 8 of 9 |" in md
    )
    assert (
        "| gpt2 | uniform-1 | 1, 1, 1, 1 | transformers_modules.GPT2GQALMHeadModel | | | | | | | failed: "
        in md
    )
    assert "`per-layer` = [2, 1, 2, 1]" in md and "n_layer=4" in md and "eos_token_id" not in md


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm: bash scripts/setup_vllm.sh")
def test_serve_converted_gpt2_from_its_remote_code(tmp_path):
    """Tiny GPT-2, original and converted (uniform and per-layer KV heads), through vLLM from what
    `save_pretrained` writes (4 eager engines, about 3 minutes on 2 cores): the converted ones on the Transformers
    backend with the saved KV heads per layer, capacity in the ratio of KV heads, greedy tokens as transformers'."""
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "vllm_serve.py"),
        "--checkpoints",
        "",
        "--multi-head",
        "gpt2",
        "--check-tokens",
        "16",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    rows = json.loads((tmp_path / "out" / "vllm.json").read_text())["multi_head"]["rows"]
    assert [r["checkpoint"] for r in rows] == ["original", *serve.MULTI_HEAD_GROUPS]
    for r in rows:
        assert not r.get("error"), r.get("error")
        assert r["agreement"]["identical"] == r["agreement"]["prompts"], r["checkpoint"]
        assert r["log_agrees"]
        if r["checkpoint"] != "original":
            assert r["architecture"] == "TransformersForCausalLM" and r["transformers_backend"]
            assert r["kv_heads_per_layer"] == r["kv_heads_converted"]
            assert r["capacity_ratio"] == pytest.approx(r["expected_ratio"], rel=0.01)
