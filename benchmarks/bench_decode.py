"""Decode speed of a Llama-shaped model before and after GQA conversion, against a natively-GQA twin.

A random-weight Llama (default: hidden 768, 12 layers, 12 heads, vocab 32000, ~110M parameters) is converted
with `hf_gqa.patch` to each `--groups` KV head count; `hf_gqa.evaluation.bench` then times, interleaved, the
original, each converted model and a plain transformers model whose config has `num_key_value_heads=G` holding the
converted weights. The results (with the exact command, versions, machine and date) go to
`benchmarks/results/<name>.md` and `.json`.

    python benchmarks/bench_decode.py                                    # the CPU reference: batch 4, context 1024
    python benchmarks/bench_decode.py --preset 7b --device cuda --name gpu_llama7b_bf16   # 7B shape, bf16, 4k/16k
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_gqa.evaluation.bench import bench

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.97  # patched decode tokens/sec must be at least this fraction of the native GQA model's

PRESETS = {
    "100m": dict(hidden=768, intermediate=2048, layers=12, heads=12, vocab=32000, groups="4,1", batch="4",
                 context="1024", dtype="float32"),
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000, groups="8,1", batch="1",
               context="4096,16384", dtype="bfloat16"),
}  # fmt: skip


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A random-weight multi-head Llama of the requested shape, in eval mode, on `args.device`."""
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(int(c) for c in args.context.split(",")) + args.new_tokens,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, args.dtype), attn_implementation="sdpa"
        )
    return model.eval()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="100m")
    for key in ("hidden", "intermediate", "layers", "heads", "vocab"):
        p.add_argument(f"--{key}", type=int, default=None)
    for key in ("groups", "batch", "context", "dtype"):
        p.add_argument(f"--{key}", default=None)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill-repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--sequential", action="store_true", help="one converted variant in memory at a time")
    p.add_argument(
        "--lockstep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode the variants step by step, each step timed on its own (default: on CPU only)",
    )
    p.add_argument("--name", default=None, help="results file stem (default: <device>_llama<preset>_<dtype>)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.name = args.name or f"{args.device.split(':')[0]}_llama{args.preset}_{args.dtype}"
    return args


def verdict_lines(report) -> list[str]:
    lines = ["", "## Verdict", ""]
    for s in report.summary():
        ratio, paired = s["decode_patched_over_native"], s["decode_patched_over_native_paired"]
        status = "meets" if ratio is not None and min(ratio, paired) >= TARGET else "MISSES"
        lines.append(
            f"- {s['groups']} KV heads, batch {s['batch']}, context {s['context']}: patched / native decode = "
            f"{ratio:.3f} (paired {paired:.3f}; {status} the {TARGET} target); speedup over the original: "
            f"decode x{s['decode_speedup_over_original']:.2f}, prefill x{s['prefill_speedup_over_original']:.2f}; "
            f"KV cache x{s['kv_bytes']['patched'] / s['kv_bytes']['original']:.3f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/bench_decode.py", *(sys.argv[1:] if argv is None else argv)])
    load_before = [round(x, 2) for x in os.getloadavg()]
    model = build_model(args)
    parameters = sum(p.numel() for p in model.parameters())
    report = bench(
        model,
        groups=[int(g) for g in args.groups.split(",")],
        batch=[int(b) for b in args.batch.split(",")],
        context=[int(c) for c in args.context.split(",")],
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        repeats=args.repeats,
        prefill_repeats=args.prefill_repeats,
        interleave=not args.sequential,
        lockstep=args.lockstep,
    )
    report.settings.update(
        command=command,
        model=f"random Llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate "
        f"{args.intermediate}, vocab {args.vocab}, tied embeddings, {parameters / 1e6:.1f}M parameters, sdpa",
        load_average_before=load_before,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = report.save(RESULTS, name=args.name)
    with open(paths["markdown"], "a") as f:
        f.write("\n".join(verdict_lines(report)) + "\n")
        f.write(f"\nLoad average (1, 5, 15 min) before: {load_before}, after: "
                f"{report.environment['machine'].get('load_average')}\n")  # fmt: skip
    print(report)
    print("\n".join(verdict_lines(report)))
    print("\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
