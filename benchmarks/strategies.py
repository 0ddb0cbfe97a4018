"""Conversion strategies on a real model: SmolLM2-135M-Instruct, 3 -> 1 KV heads, no end-to-end training.

For the original and every grouping x merging (and the per-layer budget), this measures held-out perplexity,
lm-eval accuracy on the bundled offline hellaswag / arc_easy / winogrande tasks, conversion time and the peak
memory of the converting process. Each variant converts in its own process (clean peak memory).

Texts (both shipped in hf_gqa/data, see SOURCES.md): calibration on Austen, *Pride and Prejudice*
(`austen_calibration.txt`); perplexity on 12 held-out Wikipedia articles (`wikipedia_heldout.txt`): the first
`--windows` windows of `--window` tokens of their concatenation, perplexity = exp(mean token loss).

    python benchmarks/strategies.py                      # writes benchmarks/results/strategies.{json,md}
    python benchmarks/strategies.py --variants mean,refine --limit 100 --windows 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("hf_gqa_hellaswag", "hf_gqa_arc_easy", "hf_gqa_winogrande")

# name -> patch() keyword arguments ("calibrated": True adds the bundled Austen calibration text; "wikipedia" or
# "mixed" the other bundled calibration corpora, see hf_gqa.data.calibration_text)
VARIANTS: dict[str, dict] = {
    "original": {},
    "mean": {"merge": "mean"},
    "refine (default)": {"merge": "refine", "calibrated": True},
    "refine (attention only, 200 steps, lr 3e-4)": {
        "merge": "refine",
        "calibrated": True,
        "refine_scope": "attention",
        "refine_steps": 200,
        "refine_lr": 3e-4,
    },
    "score": {"merge": "score", "calibrated": True},
    "procrustes": {"merge": "procrustes", "calibrated": True},
    "pca": {"merge": "pca", "calibrated": True},
    "first": {"merge": "first"},
    "score (not sequential)": {"merge": "score", "calibrated": True, "sequential": False},
    "refine (local target)": {"merge": "refine", "calibrated": True, "refine_target": "local"},
    "auto budget 0.5 (refine)": {"merge": "refine", "calibrated": True, "groups": "auto", "kv_budget": 0.5},
    "refine (mixed calibration)": {"merge": "refine", "calibrated": "mixed"},
    "refine 300 steps (mixed calibration)": {"merge": "refine", "calibrated": "mixed", "refine_steps": 300},
}


def split_names(text: str) -> list[str]:
    """Comma-separated variant names; commas inside parentheses belong to the name."""
    names, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            names.append(current.strip())
            current = ""
        else:
            current += char
    return [n for n in names + [current.strip()] if n]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def heldout_windows(ids, windows: int, window: int):
    """The first `windows` windows of `window` tokens of `ids` `[tokens]`, as `[windows, window]` blocks."""
    needed = windows * window
    if ids.numel() < needed:
        raise ValueError(f"The held-out text has {ids.numel()} tokens, fewer than {windows} x {window}.")
    return ids[:needed].reshape(windows, window)


def windowed_perplexity(model, ids, windows: int, window: int) -> float:
    """Held-out perplexity as the strategies table measures it: exp(mean token loss) over the first `windows`
    windows of `window` tokens of `ids` `[tokens]`, each window scored on its own from its first token."""
    from hf_gqa.perplexity import perplexity

    return perplexity(model, heldout_windows(ids, windows, window), batch_size=1)


def run_variant(name: str, args) -> dict:
    """Runs in a child process: load, convert, measure."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_gqa
    from hf_gqa import data
    from hf_gqa.evaluation.compare import evaluate_quality
    from hf_gqa.evaluation.tasks import task_manager

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    loaded_mib = rss_mib()
    spec = dict(VARIANTS[name])
    result: dict = {"variant": name, "patch_kwargs": {k: v for k, v in spec.items() if k != "calibrated"}}
    start = time.perf_counter()
    if name != "original":
        calibrated = spec.pop("calibrated", False)
        groups = spec.pop("groups", 1)
        if calibrated:
            corpus = "austen" if calibrated is True else calibrated
            result["calibration_corpus"] = corpus
            spec.update(calibration=data.calibration_text(corpus), tokenizer=tokenizer, show_progress=False)
            spec.setdefault("calibration_tokens", args.calibration_tokens)
            result["calibration_tokens"] = spec["calibration_tokens"]
        hf_gqa.patch(model, groups=groups, **spec)
    result["convert_s"] = time.perf_counter() - start
    result["threads"] = args.threads
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["loaded_rss_mib"] = loaded_mib
    result["kv_heads"] = [layer.kv_heads_after for layer in hf_gqa.describe(model).layers]
    result["kv_bytes_fraction"] = (
        hf_gqa.describe(model).bytes_per_token_after / hf_gqa.describe(model).bytes_per_token_before
    )
    ids = tokenizer(data.read_text(data.HELDOUT_TEXT), return_tensors="pt").input_ids[0]
    result["perplexity"] = windowed_perplexity(model, ids, args.windows, args.window)
    if name in args.lm_eval_variants and args.limit > 0:
        out = evaluate_quality(
            model,
            tokenizer,
            TASKS,
            args.limit,
            task_manager(TASKS),
            batch_size=args.batch_size,
            bootstrap_iters=0,
        )
        result["lm_eval"] = {
            task: {k.split(",")[0]: v for k, v in metrics.items() if k.split(",")[0] in ("acc", "acc_norm")}
            for task, metrics in out["results"].items()
        }
    return result


def calibration(result: dict) -> str:
    """`corpus, N tokens` for a calibrated variant, empty for one converted without data."""
    if "calibration_corpus" not in result:
        return ""
    return f"{result['calibration_corpus']}, {result['calibration_tokens']:,}"


def markdown(results: list[dict], env: dict, command: str, args) -> str:
    base = next(r for r in results if r["variant"] == "original")
    lines = [
        "# Conversion strategies: SmolLM2-135M-Instruct, 3 -> 1 KV heads, no end-to-end training",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {env['machine']['cpu']}, {env['machine']['cpu_cores']} cores (shared with other jobs; torch threads "
        "per row); "
        f"{env['date']}. Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        "",
        "Calibration: Austen, *Pride and Prejudice* (`hf_gqa/data/text/austen_calibration.txt`) unless the row "
        "names another corpus: Wikipedia = 10 other Wikipedia articles (`hf_gqa/data/text/wikipedia_calibration.txt`,"
        " disjoint from the held-out ones), mixed = both interleaved in blocks of about 4,000 characters; "
        f"the first N tokens of the corpus (column calibration). Held-out perplexity: the first {args.windows} windows of "
        f"{args.window} tokens of 12 Wikipedia articles (`hf_gqa/data/text/wikipedia_heldout.txt`), never used "
        f"for calibration. lm-eval {args.limit} examples per task (bundled offline tasks, lm-eval's own prompts), "
        "batch size "
        f"{args.batch_size}. With 3 KV heads and 9 query heads, the only uniform reduction is 3 -> 1, which puts all "
        "three KV heads of a layer in one group, so `grouping` (consecutive or similarity) cannot differ here; "
        "per-layer budgets choose 1 or 3 heads per layer.",
        "",
        "| variant | calibration | KV bytes | perplexity | x original | hellaswag acc_norm | arc_easy acc | winogrande acc "
        "| convert s | threads | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ev = r.get("lm_eval", {})

        def acc(task: str, metric: str, ev=ev) -> str:
            value = ev.get(task, {}).get(metric)
            return "" if value is None else f"{value:.3f}"

        lines.append(
            f"| {r['variant']} | {calibration(r)} | {r['kv_bytes_fraction']:.0%} | {r['perplexity']:,.2f} "
            f"| {r['perplexity'] / base['perplexity']:,.2f} | {acc('hf_gqa_hellaswag', 'acc_norm')} "
            f"| {acc('hf_gqa_arc_easy', 'acc')} | {acc('hf_gqa_winogrande', 'acc')} "
            f"| {r['convert_s']:.0f} | {r.get('threads', 2)} | {r['peak_rss_mib']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variant names")
    parser.add_argument(
        "--lm-eval-variants", default="original,mean,score,refine (default),auto budget 0.5 (refine)"
    )
    parser.add_argument("--limit", type=int, default=500, help="lm-eval examples per task (0 skips lm-eval)")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="strategies")
    parser.add_argument(
        "--model-dir", default=None, help="a saved fp32 SmolLM2 (default: from the GGUF package)"
    )
    parser.add_argument("--resume", action="store_true", help="keep the variants already in the results JSON")
    parser.add_argument(
        "--redo", action="store_true", help="with --resume: run the --variants again, replacing their rows"
    )
    parser.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.lm_eval_variants = set(split_names(args.lm_eval_variants))
    unknown = [n for n in args.lm_eval_variants | set(split_names(args.variants)) if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown} (names are comma-separated; known: {list(VARIANTS)})")
    if args._variant:
        Path(args._out).write_text(json.dumps(run_variant(args._variant, args)))
        return

    from hf_gqa.evaluation.common import environment

    command = "python benchmarks/strategies.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is None:
            from hf_gqa import default_model

            model, tokenizer = default_model.load()
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del model
            args.model_dir = tmp
        results = []
        previous = RESULTS / f"{args.name}.json"
        if args.resume and previous.exists():
            saved = json.loads(previous.read_text())
            results = saved["results"]
            command = saved["command"] + " && " + command
        wanted = split_names(args.variants)
        if args.redo:
            results = [r for r in results if r["variant"] not in wanted]
        done = {r["variant"] for r in results}
        names = [n for n in wanted if n not in done]
        for name in names:
            out = Path(tmp) / "result.json"
            child = [sys.executable, __file__, "--_variant", name, "--_out", str(out)]
            for flag in (
                "limit",
                "windows",
                "window",
                "calibration_tokens",
                "batch_size",
                "threads",
                "model_dir",
            ):
                child += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            child += ["--lm-eval-variants", ",".join(sorted(args.lm_eval_variants))]
            subprocess.run(child, check=True)
            results.append(json.loads(out.read_text()))
            print(json.dumps(results[-1]), flush=True)
            env = environment()
            RESULTS.mkdir(exist_ok=True)
            payload = {
                "command": command,
                "environment": env,
                "settings": vars(args) | {"lm_eval_variants": sorted(args.lm_eval_variants)},
                "results": results,
            }
            (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2, default=str))
            if any(r["variant"] == "original" for r in results):
                (RESULTS / f"{args.name}.md").write_text(markdown(results, env, command, args))


if __name__ == "__main__":
    main()
