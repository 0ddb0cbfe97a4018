"""`hf-gqa eval`: lm-eval quality, speed and KV memory of the original and each converted variant; a report."""

from __future__ import annotations

import argparse

from .options import (
    add_conversion_arguments,
    add_model_arguments,
    check_conversion_arguments,
    conversion_kwargs,
    groups_variants,
    load_model_from_args,
    subcommand,
)


def tasks_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError("expected task names separated by commas")
    return tasks


def limit_value(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid limit {text!r}: a number of documents (or a fraction < 1)"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: must be positive")
    return int(value) if value >= 1 and value.is_integer() else value


@subcommand("eval")
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..evaluation.tasks import BUNDLED_TASKS

    p = subparsers.add_parser(
        "eval",
        help="evaluate the original and converted variants with lm-eval; save a report",
        description="Evaluate the original model and each converted variant on the same lm-eval tasks, limit and "
        "seeds (variants are converted from an in-memory copy, never re-read from disk), measure prefill and "
        "decode speed and KV-cache size, and save report.json, report.md and quality_vs_speed.png. Offline tasks "
        f"shipped with hf_gqa: {', '.join(BUNDLED_TASKS)}; the standard lm-eval tasks (hellaswag, arc_easy, "
        "wikitext, ...) work where the Hugging Face Hub is reachable.",
    )
    add_model_arguments(p)
    p.add_argument(
        "--groups",
        required=True,
        type=groups_variants,
        help="the variants, as KV head counts separated by commas (12,4,1); the model's own KV head count means "
        "the original, which is always evaluated; a per-layer variant is written 4:4:2:2",
    )
    p.add_argument(
        "--tasks",
        type=tasks_list,
        default=["hf_gqa_wikipedia", "hf_gqa_hellaswag", "hf_gqa_arc_easy"],
        help="lm-eval task names separated by commas (default: hf_gqa_wikipedia,hf_gqa_hellaswag,hf_gqa_arc_easy)",
    )
    p.add_argument("--limit", type=limit_value, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", default="1", help="lm-eval batch size (an int or 'auto')")
    p.add_argument("--seed", type=int, default=1234, help="every lm-eval seed, the same for each variant")
    p.add_argument("--bootstrap-iters", type=int, default=1000)
    speed = p.add_argument_group("speed measurement")
    speed.add_argument("--no-speed", action="store_true", help="skip the prefill/decode speed measurement")
    speed.add_argument("--speed-batch", type=int, default=1)
    speed.add_argument("--speed-context", type=int, default=512)
    speed.add_argument("--speed-new-tokens", type=int, default=32)
    speed.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument(
        "--fidelity-tokens", type=int, default=512, help="held-out tokens for agreement/KL (0: skip)"
    )
    p.add_argument("--out", default=None, help="folder for report.json, report.md and quality_vs_speed.png")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's log")
    add_conversion_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..evaluation.common import kv_layout
    from ..evaluation.compare import SpeedSettings, check_tasks, compare

    manager = check_tasks(args.tasks)  # an unknown task, or one without data, fails before the model loads
    check_conversion_arguments(args, args.groups)
    model, tokenizer = load_model_from_args(args)
    layout = kv_layout(model)
    variants = [g for g in args.groups if not layout.is_unchanged_by(g)]
    speed = (
        False
        if args.no_speed
        else SpeedSettings(
            batch=args.speed_batch,
            context=args.speed_context,
            new_tokens=args.speed_new_tokens,
            repeats=args.speed_repeats,
        )
    )
    batch_size = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
    report = compare(
        model,
        tokenizer,
        groups=variants,
        tasks=args.tasks,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=batch_size,
        bootstrap_iters=args.bootstrap_iters,
        seed=args.seed,
        speed=speed,
        fidelity_tokens=args.fidelity_tokens,
        verbose=args.verbose,
        task_manager=manager,
        **conversion_kwargs(args, tokenizer),
    )
    report.settings["model"] = args.model or args.gguf_file
    report.settings["command"] = args.command_line
    print(report)
    if args.out:
        paths = report.save(args.out)
        print("\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    return 0
