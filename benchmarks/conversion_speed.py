"""Conversion speed against quality: SmolLM2-135M-Instruct 3 -> 1 KV heads, calibrated settings side by side.

What the main job (`examples/quickstart.py`) trades: conversion CPU-seconds against held-out perplexity. Each
setting is one `hf_gqa.patch` call on a fresh copy of the same loaded model, in this process, one after another
(so the rows of one run share the machine's state); per row it records wall seconds and CPU-seconds of the
conversion (`time.process_time`, all threads), the held-out perplexity on the main job's paragraph
(`hf_gqa.data.heldout_paragraph()`) and on the first `--windows` windows of 512 tokens of the held-out Wikipedia
articles, both never used for calibration:

    python benchmarks/conversion_speed.py                        # the old and new main-job settings
    python benchmarks/conversion_speed.py --settings "steps=100,tokens=8192" "steps=40,tokens=2048,block=128"

A setting is `key=value` pairs joined by commas: `steps` (refine steps per layer), `tokens` (calibration
tokens), `block` (tokens per calibration block), `lr` (refine rate), `pos` (token positions each refine step is
scored on, `Refine(positions=...)`; all of them when absent), `train` (`layer` or `attention`: which parameters
a layer-scope refine trains, `Refine(train=...)`), `warmup` (steps over which the rate rises to `lr`,
`Refine(warmup=...)`). Results:
`benchmarks/results/conversion_speed.{md,json}` (rows of a run replace those of earlier runs with the same
setting).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
OLD = "steps=100,tokens=8192,block=512"
NEW = "steps=100,tokens=2048,block=128"
DEFAULT_SETTINGS = (OLD, NEW)


def parse_setting(text: str) -> dict[str, float | int | str]:
    """`"steps=20,tokens=4096"` -> `{"steps": 20, "tokens": 4096}` (ints where they parse, else floats; `train`
    stays a string)."""
    out: dict[str, float | int | str] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in {"steps", "tokens", "block", "lr", "pos", "train", "warmup"}:
            raise SystemExit(f"unknown setting {key!r} in {text!r}")
        if key == "train":
            out[key] = value
            continue
        out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    return out


def convert(model, tokenizer, setting: dict) -> tuple[float, float]:
    """Convert `model` in place with `setting`; returns `(wall s, CPU s)` of the conversion."""
    import hf_gqa
    from hf_gqa import data

    method = hf_gqa.Refine(
        steps=int(setting.get("steps", 100)),
        lr=float(setting.get("lr", 3e-4)),
        positions=int(setting["pos"]) if "pos" in setting else None,
        train=str(setting.get("train", "layer")),
        warmup=int(setting.get("warmup", 0)),
    )
    wall, cpu = time.perf_counter(), time.process_time()
    hf_gqa.patch(
        model,
        groups=1,
        method=method,
        calibration=data.calibration_text(),
        tokenizer=tokenizer,
        calibration_tokens=int(setting.get("tokens", 8192)),
        block_size=int(setting.get("block", 512)),
        show_progress=False,
    )
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(model, tokenizer, windows: int) -> dict[str, float]:
    """Held-out perplexity on the main job's paragraph and on `windows` windows of 512 tokens."""
    from strategies import windowed_perplexity  # benchmarks/ is on sys.path when this script runs

    from hf_gqa import data
    from hf_gqa.perplexity import perplexity

    paragraph = tokenizer(data.heldout_paragraph(), return_tensors="pt").input_ids
    ids = tokenizer(data.read_text(data.HELDOUT_TEXT), return_tensors="pt").input_ids[0]
    return {
        "paragraph_perplexity": perplexity(model, paragraph, batch_size=1),
        "windows_perplexity": windowed_perplexity(model, ids, windows, 512),
    }


def write_report(rows: list[dict], env: dict, command: str, threads: int) -> None:
    """Merge `rows` into `results/conversion_speed.json` (a row replaces the earlier one of its setting; each row
    notes its command, threads, date and load) and rewrite the table of `conversion_speed.md`, keeping the
    hand-written findings after its "What this shows:" line."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "conversion_speed.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    load = env["machine"]["load_average"]
    for r in rows:
        r.update(threads=threads, note=f"`{command}`, {env['date'][:10]}, load before {load[0]}")
    names = {r["setting"] for r in rows}
    kept = [r for r in old.get("rows", []) if r["setting"] not in names]
    merged = {**old, "environment": env, "rows": kept + rows}
    path.write_text(json.dumps(merged, indent=1) + "\n")
    base = next(r for r in merged["rows"] if r["setting"].startswith("original"))
    md = RESULTS / "conversion_speed.md"
    findings = md.read_text().partition("\nWhat this shows:")[2] if md.exists() else ""
    lines = [
        "# Conversion speed against quality: SmolLM2-135M-Instruct, 3 -> 1 KV heads, calibrated "
        "(benchmarks/conversion_speed.py)",
        "",
        "Each row: `python benchmarks/conversion_speed.py --windows 4 --threads <threads> --settings <setting>` "
        '(`pos=N` is `Refine(positions=N)`, `train=attention` is `Refine(train="attention")`), one `hf_gqa.patch('
        "model, groups=1, method=Refine(...), calibration=hf_gqa.data.calibration_text(), ...)` per setting on a "
        "fresh copy of the loaded model; the note says when and how (rows with 1 thread were made by the script's "
        "scratch predecessors, the same call and measures, on a machine shared with 2-3 other jobs). CPU s is "
        "`time.process_time()` of the `patch` call: compare rows of the same thread count.",
        "",
        f"Machine: {env['machine']['cpu']}, {env['machine']['cpu_cores']} cores. Versions (newest run): "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "",
        "Held-out: the main job's paragraph (`hf_gqa.data.heldout_paragraph()`, ~350 tokens: what "
        "`examples/quickstart.py` prints) and the first 4 windows of 512 tokens of the held-out Wikipedia articles; "
        "neither is used for calibration. Both are small samples: differences under ~10% between rows are within "
        "the spread of one conversion to the next.",
        "",
        "| setting | convert CPU s | convert wall s | paragraph perplexity | x original | 4 windows perplexity | "
        "x original | threads | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    for r in merged["rows"]:
        para, windows = r["paragraph_perplexity"], r["windows_perplexity"]
        lines.append(
            f"| `{r['setting']}` | {number(r['cpu_s'], 0)} | {number(r['wall_s'], 0)} | {number(para, 2)} | "
            f"{number(para / base['paragraph_perplexity'], 2)} | {number(windows, 2)} | "
            f"{number(windows and windows / base['windows_perplexity'], 2)} | {r.get('threads', '-')} | "
            f"{r.get('note', '')} |"
        )
    if findings:
        lines += ["", "What this shows:" + findings.rstrip("\n")]
    md.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS))
    parser.add_argument("--windows", type=int, default=6, help="held-out windows of 512 tokens")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    settings = [(s, parse_setting(s)) for s in args.settings]

    from hf_gqa import default_model
    from hf_gqa.evaluation.common import environment

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    original, tokenizer = default_model.load()
    rows = [
        {
            "setting": "original (no conversion)",
            "wall_s": 0.0,
            "cpu_s": 0.0,
            **measure(original, tokenizer, args.windows),
        }
    ]
    print(json.dumps(rows[-1]), flush=True)
    for text, setting in settings:
        model = copy.deepcopy(original)
        torch.manual_seed(0)
        wall, cpu = convert(model, tokenizer, setting)
        rows.append(
            {"setting": text, "wall_s": wall, "cpu_s": cpu, **measure(model, tokenizer, args.windows)}
        )
        print(json.dumps(rows[-1]), flush=True)
        del model
    command = "python benchmarks/conversion_speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_report(rows, environment(), command.strip(), args.threads)


if __name__ == "__main__":
    main()
