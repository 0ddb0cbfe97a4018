"""The `hf-gqa` command: convert, evaluate and benchmark grouped-query attention conversions.

    hf-gqa convert --model path/or/id --groups 4 --out converted/
    hf-gqa eval    --model path/or/id --groups 12,4,1 --tasks hf_gqa_wikipedia,hf_gqa_hellaswag --limit 200 --out report/
    hf-gqa bench   --model path/or/id --groups 12,4,1 --batch 1,8 --context 512,2048 --new-tokens 128
    hf-gqa uptrain --model path/or/id --groups 4 --data corpus.txt --method lora --steps 500 --out out/

Also `python -m hf_gqa.cli ...`. `--model smollm2` is the packaged SmolLM2-135M-Instruct GGUF.

Adding a subcommand takes one function that adds its parser and sets `func`:

    @subcommand("uptrain")
    def add_uptrain(subparsers):
        p = subparsers.add_parser("uptrain", help="...")
        p.add_argument(...)
        p.set_defaults(func=run_uptrain)        # run_uptrain(args) -> exit code

Adding options to `convert` (e.g. calibration data for a data-aware merge) takes one function that adds the
arguments and one that turns them into keyword arguments for `hf_gqa.patch`:

    def add_calibration_arguments(parser): parser.add_argument("--calibration", ...)

    @convert_option(add_calibration_arguments)
    def calibration_patch_kwargs(args, model, tokenizer) -> dict:
        return {"stats": ...} if args.calibration else {}
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import GQAError

#: name -> function adding the subcommand's parser to the subparsers object (and setting `func`).
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = {}
#: (add arguments to the convert parser, turn parsed arguments into extra `hf_gqa.patch` keyword arguments).
ConvertOption = tuple[
    Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, Any, Any], dict]
]
CONVERT_OPTIONS: list[ConvertOption] = []


class CLIError(Exception):
    """A user error the command reports in one line (exit status 2)."""


def subcommand(name: str):
    """Register a function `(subparsers) -> parser` that adds the subcommand `name`."""

    def decorator(fn: Callable[[argparse._SubParsersAction], argparse.ArgumentParser]):
        SUBCOMMANDS[name] = fn
        return fn

    return decorator


def convert_option(add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register extra `convert` options: `add_arguments(parser)` and the decorated `(args, model, tokenizer) -> dict`
    of extra `hf_gqa.patch` keyword arguments."""

    def decorator(fn: Callable[[argparse.Namespace, Any, Any], dict]):
        CONVERT_OPTIONS.append((add_arguments, fn))
        return fn

    return decorator


# -- argument types ------------------------------------------------------------------------------------------------
def _groups_type(text: str):
    """`--groups` of `convert`: one KV head count, one per layer separated by commas, or `auto`."""
    if text == "auto":
        return text
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() and int(item) > 0 for item in items):
        raise argparse.ArgumentTypeError(
            f"invalid groups {text!r}: expected a positive KV head count such as 4, or one per layer separated by "
            "commas such as 4,4,2,2"
        )
    numbers = [int(item) for item in items]
    return numbers[0] if len(numbers) == 1 else numbers


def _variants_type(text: str):
    """`--groups` of `eval` and `bench`: a comma-separated list of variants (`12,4,1`)."""
    from .evaluation.options import parse_variants

    try:
        return parse_variants(text)
    except GQAError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _int_list_type(what: str):
    def parse(text: str) -> list[int]:
        from .evaluation.options import parse_int_list

        try:
            return parse_int_list(text, what)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _tasks_type(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError("expected task names separated by commas")
    return tasks


def _limit_type(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid limit {text!r}: a number of documents (or a fraction < 1)"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: must be positive")
    return int(value) if value >= 1 and value.is_integer() else value


# -- shared options and loading -------------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--gguf-file`, `--dtype`, `--device`: what `load_model_from_args` reads."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        help="a local model folder, a Hugging Face Hub id, a folder saved by hf_gqa, or 'smollm2' (the packaged "
        "SmolLM2-135M-Instruct GGUF)",
    )
    group.add_argument(
        "--gguf-file",
        "--gguf",
        dest="gguf_file",
        help="load from a GGUF file: a file name inside --model, or a path to the file (then --model may be left out)",
    )
    group.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (default: as saved; float32 for GGUF)",
    )
    group.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)"
    )


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model_from_args(args: argparse.Namespace, tokenizer: bool = True):
    """`(model, tokenizer or None)` from the model arguments."""
    from .evaluation.common import load_model, load_tokenizer, split_gguf

    path, gguf_file = split_gguf(args.model, args.gguf_file)
    model = load_model(path, gguf_file=gguf_file, dtype=args.dtype, device=_device(args))
    return model, (load_tokenizer(path, gguf_file) if tokenizer else None)


def _command_line(argv: Sequence[str] | None) -> str:
    return shlex.join(["hf-gqa", *(sys.argv[1:] if argv is None else argv)])


# -- convert ---------------------------------------------------------------------------------------------------------
@subcommand("convert")
def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="load a model, convert its attention to GQA, save model and tokenizer",
        description="Load a causal LM, convert its attention to grouped-query attention with hf_gqa.patch, and save "
        "the converted model and its tokenizer. Llama-family models converted with one KV head count for every "
        "layer load back with plain transformers; the others with hf_gqa.from_pretrained.",
    )
    add_model_arguments(p)
    p.add_argument(
        "--groups",
        required=True,
        type=_groups_type,
        help="KV heads after conversion: one number for every layer (4), or one per layer (4,4,2,2)",
    )
    p.add_argument(
        "--merge",
        default=None,
        help="how a group's K/V heads become one: mean, first, pca, score, procrustes, refine "
        "(default: refine with --calibration, mean without)",
    )
    p.add_argument(
        "--grouping", default="consecutive", help="which KV heads share a group (default: consecutive)"
    )
    p.add_argument("--out", required=True, help="folder to save the converted model and tokenizer into")
    for add_arguments, _ in CONVERT_OPTIONS:
        add_arguments(p)
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    from .describe import describe
    from .io import needs_hf_gqa_to_load
    from .merging import MERGE_METHODS
    from .patch import patch

    if isinstance(args.merge, str) and args.merge not in {*MERGE_METHODS, "refine"}:
        available = ", ".join(sorted({*MERGE_METHODS, "refine"}))
        raise CLIError(f"unknown merge {args.merge!r}; available: {available}")
    model, tokenizer = load_model_from_args(args)
    extra: dict = {}
    for _, patch_kwargs in CONVERT_OPTIONS:
        extra.update(patch_kwargs(args, model, tokenizer))
    patch(model, groups=args.groups, merge=args.merge, grouping=args.grouping, **extra)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(describe(model))
    how = (
        "hf_gqa.from_pretrained(path)"
        if needs_hf_gqa_to_load(model)
        else "AutoModelForCausalLM.from_pretrained(path) or hf_gqa.from_pretrained(path)"
    )
    print(f"saved to {out} (load with {how})")
    return 0


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calibration",
        default=None,
        help="calibration text for the data-aware merges: a .txt file, a folder of .txt files, or "
        "text shipped with hf_gqa: 'builtin' (Austen and 10 Wikipedia articles interleaved; the measured "
        "best), 'builtin:austen' or 'builtin:wikipedia'",
    )
    parser.add_argument(
        "--calibration-tokens", type=int, default=8192, help="calibration tokens (default 8192)"
    )
    parser.add_argument("--refine-steps", type=int, default=None, help="refine steps per layer (default 100)")
    parser.add_argument(
        "--refine-scope",
        choices=["attention", "layer"],
        default=None,
        help="refine the attention block alone, or the whole decoder layer around it (MLP included)",
    )
    parser.add_argument(
        "--kv-budget", type=float, default=None, help="with --groups auto: KV bytes to keep (0-1]"
    )
    parser.add_argument("--seed", type=int, default=0, help="calibration and refinement seed")


def _calibration_text(source: str) -> str:
    from .data import calibration_text

    if source == "builtin" or source.startswith("builtin:"):
        corpus = source.partition(":")[2] or "mixed"
        try:
            return calibration_text(corpus)
        except ValueError as e:
            raise CLIError(f"--calibration {source}: {e}") from None
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise CLIError(f"no .txt files in calibration folder {source}")
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    if not path.is_file():
        raise CLIError(f"no such calibration file: {source}")
    return path.read_text(encoding="utf-8")


@convert_option(add_calibration_arguments)
def calibration_patch_kwargs(args: argparse.Namespace, model, tokenizer) -> dict:
    """`--calibration` and friends as `hf_gqa.patch` keyword arguments."""
    if args.groups == "auto" and (args.kv_budget is None or args.calibration is None):
        raise CLIError("--groups auto needs --kv-budget and --calibration")
    if args.calibration is None:
        return {}
    kwargs = {
        "calibration": _calibration_text(args.calibration),
        "tokenizer": tokenizer,
        "calibration_tokens": args.calibration_tokens,
        "refine_steps": args.refine_steps,
        "seed": args.seed,
    }
    if args.refine_scope is not None:
        kwargs["refine_scope"] = args.refine_scope
    if args.kv_budget is not None:
        kwargs["kv_budget"] = args.kv_budget
    return kwargs


# -- eval ------------------------------------------------------------------------------------------------------------
@subcommand("eval")
def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .evaluation.tasks import BUNDLED_TASKS

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
        type=_variants_type,
        help="the variants, as KV head counts separated by commas (12,4,1); the model's own KV head count means "
        "the original, which is always evaluated; a per-layer variant is written 4:4:2:2",
    )
    p.add_argument("--merge", default="mean", help="merge method for every variant (default: mean)")
    p.add_argument(
        "--tasks",
        type=_tasks_type,
        default=["hf_gqa_wikipedia", "hf_gqa_hellaswag", "hf_gqa_arc_easy"],
        help="lm-eval task names separated by commas (default: hf_gqa_wikipedia,hf_gqa_hellaswag,hf_gqa_arc_easy)",
    )
    p.add_argument("--limit", type=_limit_type, default=None, help="documents per task (a fraction if < 1)")
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
    p.set_defaults(func=run_eval)
    return p


def run_eval(args: argparse.Namespace) -> int:
    from .evaluation.common import kv_layout
    from .evaluation.compare import SpeedSettings, check_tasks, compare

    manager = check_tasks(args.tasks)  # an unknown task, or one without data, fails before the model loads
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
        merge=args.merge,
        num_fewshot=args.num_fewshot,
        batch_size=batch_size,
        bootstrap_iters=args.bootstrap_iters,
        seed=args.seed,
        speed=speed,
        fidelity_tokens=args.fidelity_tokens,
        verbose=args.verbose,
        task_manager=manager,
    )
    report.settings["model"] = args.model or args.gguf_file
    report.settings["command"] = args.command_line
    print(report)
    if args.out:
        paths = report.save(args.out)
        print("\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    return 0


# -- bench -----------------------------------------------------------------------------------------------------------
@subcommand("bench")
def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
        type=_variants_type,
        help="the variants, as KV head counts separated by commas (12,4,1); the model's own count is the original",
    )
    p.add_argument("--merge", default="mean")
    p.add_argument("--batch", type=_int_list_type("batch sizes"), default=[1, 8], help="batch sizes (1,8)")
    p.add_argument(
        "--context", type=_int_list_type("context lengths"), default=[512, 2048], help="(512,2048)"
    )
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
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    from .evaluation.bench import bench

    model, _ = load_model_from_args(args, tokenizer=False)
    report = bench(
        model,
        groups=args.groups,
        batch=args.batch,
        context=args.context,
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        repeats=args.repeats,
        prefill_repeats=args.prefill_repeats,
        merge=args.merge,
        native=not args.no_native,
        interleave=not args.sequential,
        lockstep=args.lockstep,
    )
    report.settings["model"] = args.model or args.gguf_file
    report.settings["command"] = args.command_line
    print(report)
    if args.out:
        paths = report.save(args.out, name=args.name)
        print("\n" + "\n".join(f"wrote {p}" for p in paths.values()))
    return 0


from .training_cli import add_uptrain_parser  # noqa: E402  (hf-gqa uptrain; owned by hf_gqa/training_cli.py)

SUBCOMMANDS["uptrain"] = add_uptrain_parser


# -- uptrain (hf_gqa/training_cli.py) ------------------------------------------------------------------------------
@subcommand("uptrain")
def add_uptrain_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .training_cli import add_uptrain_parser as add

    return add(subparsers)


# -- main ------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-gqa",
        description="Convert Hugging Face causal LMs to grouped-query attention, and measure what it costs in "
        "quality and buys in speed and memory.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    for add_parser in SUBCOMMANDS.values():
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-gqa` console script; returns the exit status."""
    from .evaluation.common import ModelLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = _command_line(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, GQAError, ModelLoadError) as err:
        parser.exit(2, f"hf-gqa {args.command}: error: {err}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
