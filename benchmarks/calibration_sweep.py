"""Quick sweep of calibration settings: SmolLM2-135M 3 -> 1 KV heads, held-out perplexity on a few windows.

A cheaper companion of `strategies.py` (no lm-eval, fewer held-out windows) for choosing calibration corpus,
token count and refine settings before a full strategies run. One conversion per call; the row is appended to
`benchmarks/results/calibration_sweep.jsonl` and the markdown table beside it is rewritten:

    python benchmarks/calibration_sweep.py --corpus mixed --tokens 8192 refine refine_steps=300
    python benchmarks/calibration_sweep.py --corpus austen score

Held-out text: the first `--windows` windows of 512 tokens of hf_gqa/data/text/wikipedia_heldout.txt (never
used for calibration); calibration: `hf_gqa.data.calibration_text(corpus)`, its first `--tokens` tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from pathlib import Path

import torch
from strategies import windowed_perplexity  # benchmarks/ is on sys.path when this script runs

RESULTS = Path(__file__).resolve().parent / "results"


def value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("merge", help="merge method, or 'none' for the original model")
    parser.add_argument("options", nargs="*", help="more hf_gqa.patch keywords as key=value")
    parser.add_argument("--corpus", default="mixed", help="austen, wikipedia or mixed")
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens")
    parser.add_argument("--windows", type=int, default=6, help="held-out windows of 512 tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-dir", default=None, help="a saved fp32 SmolLM2 (default: the GGUF package)")
    parser.add_argument("--save", default=None, help="save the converted model here")
    args = parser.parse_args()

    import hf_gqa
    from hf_gqa import data, default_model
    from hf_gqa.evaluation.common import environment

    torch.set_num_threads(args.threads)
    if args.model_dir:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    else:
        model, tokenizer = default_model.load(dtype=torch.float32)
    kwargs = {"merge": args.merge} | dict(
        (k, value(v)) for k, v in (option.split("=", 1) for option in args.options)
    )
    groups = kwargs.pop("groups", 1)
    start = time.perf_counter()
    if args.merge != "none":
        hf_gqa.patch(
            model,
            groups=groups,
            calibration=data.calibration_text(args.corpus),
            tokenizer=tokenizer,
            calibration_tokens=args.tokens,
            show_progress=False,
            **kwargs,
        )
    seconds = time.perf_counter() - start
    ids = tokenizer(data.read_text(data.HELDOUT_TEXT), return_tensors="pt").input_ids[0]
    held_out = windowed_perplexity(model, ids, args.windows, 512)  # the strategies benchmark's measure
    row = {
        "command": "python benchmarks/calibration_sweep.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "patch": kwargs | {"groups": groups},
        "corpus": args.corpus if args.merge != "none" else "",
        "tokens": args.tokens if args.merge != "none" else 0,
        "windows": args.windows,
        "perplexity": held_out,
        "convert_s": seconds,
        "threads": args.threads,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "environment": environment(),
    }
    print(json.dumps({k: v for k, v in row.items() if k != "environment"}), flush=True)
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "calibration_sweep.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")
    write_markdown(RESULTS / "calibration_sweep.jsonl", RESULTS / "calibration_sweep.md")


def write_markdown(jsonl: Path, out: Path) -> None:
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    env = rows[-1]["environment"]
    lines = [
        "# Calibration sweep: SmolLM2-135M-Instruct, 3 -> 1 KV heads (benchmarks/calibration_sweep.py)",
        "",
        "Held-out perplexity on the first windows of 512 tokens of the held-out Wikipedia articles "
        "(`hf_gqa/data/text/wikipedia_heldout.txt`, never used for calibration); fewer windows than "
        "strategies.md, so compare rows here with each other. Corpora: `hf_gqa.data.calibration_text(corpus)`. "
        f"Machine: {env['machine']['cpu']}, {env['machine']['cpu_cores']} cores, shared with other jobs (times "
        "are indicative). Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        "",
        "| command | windows | perplexity | convert s | threads | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        note = r["environment"].get("note")
        if note and note not in notes:
            notes.append(note)
        mark = "*" * (notes.index(note) + 1) if note else ""
        lines.append(
            f"| `{r['command']}`{mark} | {r['windows']} | {r['perplexity']:.2f} | {r['convert_s']:.0f} "
            f"| {r['threads']} | {r['peak_rss_mib']:,.0f} |"
        )
    lines += [""] + [f"{'*' * (i + 1)} {note}" for i, note in enumerate(notes)]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
