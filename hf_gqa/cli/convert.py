"""`hf-gqa convert`: load a model, convert its attention to GQA, save the model and its tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (
    CLIError,
    add_conversion_arguments,
    add_model_arguments,
    check_conversion_arguments,
    conversion_kwargs,
    groups_one,
    load_model_from_args,
    subcommand,
)


@subcommand("convert")
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
        type=groups_one,
        help="KV heads after conversion: one number for every layer (4), one per layer (4:4:2:2), or auto",
    )
    p.add_argument("--out", required=True, help="folder to save the converted model and tokenizer into")
    add_conversion_arguments(p)
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="convert the checkpoint shard by shard without building the model (peak memory about one shard): "
        "the default for data-free methods on a local safetensors folder; --no-stream loads the model",
    )
    p.add_argument(
        "--max-shard-size", default="1GB", help="largest output shard of a streamed conversion (1GB)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with a streamed conversion: print the plan (layers, sizes, peak memory) and write nothing",
    )
    p.add_argument("--seed", dest="conversion_seed", type=int, help=argparse.SUPPRESS)  # older spelling
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..describe import describe
    from ..patch import patch

    if args.conversion_seed is None:
        args.conversion_seed = 0
    check_conversion_arguments(args, [args.groups])
    if _streams(args):
        from ..streaming import convert_checkpoint, plan_checkpoint

        method = args.merge or "mean"
        if args.dry_run:
            print(
                plan_checkpoint(
                    args.model, args.groups, method, args.grouping, max_shard_size=args.max_shard_size
                )
            )
            return 0
        print(
            convert_checkpoint(
                args.model, args.out, args.groups, method, args.grouping, max_shard_size=args.max_shard_size
            )
        )
        print(f"saved to {args.out} (load with {_how_to_load(Path(args.out))})")
        return 0
    if args.dry_run:
        raise CLIError(
            "--dry-run plans a streamed conversion (a data-free method on a local safetensors folder)"
        )
    model, tokenizer = load_model_from_args(args)
    patch(model, groups=args.groups, **conversion_kwargs(args, tokenizer))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(describe(model))
    print(f"saved to {out} (load with {_how_to_load(out)})")
    return 0


def _streams(args: argparse.Namespace) -> bool:
    """Whether to convert shard by shard: asked for, or by default for a data-free method on a local safetensors
    folder (the result is the same tensors either way)."""
    from ..methods import get_method

    folder = Path(args.model) if args.model else None
    local = (
        folder is not None
        and args.gguf_file is None
        and ((folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists())
    )
    data_free = args.calibration is None and not get_method(args.merge or "mean").needs_calibration
    if args.stream and not (local and data_free):
        raise CLIError("--stream converts a local safetensors folder with a data-free method (mean, first)")
    if args.stream is None:
        return local and data_free and args.groups != "auto" and args.dtype in (None, "auto")
    return args.stream


def _how_to_load(out: Path) -> str:
    from transformers import AutoConfig

    from ..io import needs_hf_gqa_to_load

    if needs_hf_gqa_to_load(AutoConfig.from_pretrained(out)):
        return "hf_gqa.from_pretrained(path)"
    return "AutoModelForCausalLM.from_pretrained(path) or hf_gqa.from_pretrained(path)"
