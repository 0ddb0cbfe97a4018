"""`hf-gqa bench`: prefill and decode tokens/sec and KV-cache memory, before and after conversion."""

from __future__ import annotations

import argparse

from .options import (
    add_conversion_arguments,
    add_model_arguments,
    check_conversion_arguments,
    conversion_kwargs,
    groups_variants,
    int_list,
    load_model_from_args,
    subcommand,
)


@subcommand("bench")
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="prefill/decode tokens per second and KV-cache memory, before and after conversion",
        description="Time prefill and greedy decode of the original model, each converted variant, and a natively "
        "GQA transformers model of the same shape holding the same weights, over a grid of batch sizes and "
        "context lengths (warm-up, repeats, medians; variants interleaved).",
    )
    add_model_arguments(p)
    p.add_argument(
        "--groups",
        required=True,
        type=groups_variants,
        help="the variants, as KV head counts separated by commas (12,4,1); the model's own count is the original",
    )
    p.add_argument("--batch", type=int_list("batch sizes"), default=[1, 8], help="batch sizes (1,8)")
    p.add_argument("--context", type=int_list("context lengths"), default=[512, 2048], help="(512,2048)")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens decoded after the prefill")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant and grid point (medians)")
    p.add_argument(
        "--prefill-repeats",
        type=int,
        default=None,
        help="timed prefills per variant (default: --repeats); the other runs decode from a copy of the cache",
    )
    p.add_argument(
        "--lockstep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode all variants step by step, each step timed on its own (default: on CPU, not on CUDA)",
    )
    p.add_argument("--no-native", action="store_true", help="do not time the natively-GQA twin")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="hold one converted variant in memory at a time instead of interleaving all (large models)",
    )
    p.add_argument("--out", default=None, help="folder to write <name>.json and <name>.md into")
    p.add_argument("--name", default="bench", help="file name stem of the results (default: bench)")
    add_conversion_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..evaluation.bench import bench

    check_conversion_arguments(args, args.groups)
    model, tokenizer = load_model_from_args(args, tokenizer=args.calibration is not None)
    report = bench(
        model,
        groups=args.groups,
        batch=args.batch,
        context=args.context,
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        repeats=args.repeats,
        prefill_repeats=args.prefill_repeats,
        native=not args.no_native,
        interleave=not args.sequential,
        lockstep=args.lockstep,
        **conversion_kwargs(args, tokenizer),
    )
    report.settings["model"] = args.model or args.gguf_file
    report.settings["command"] = args.command_line
    print(report)
    if args.out:
        paths = report.save(args.out, name=args.name)
        print("\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    return 0
