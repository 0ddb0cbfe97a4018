"""`hf-gqa convert`: load a model, convert its attention to GQA, save the model and its tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (
    REFINE_FLAGS,
    CLIError,
    add_conversion_arguments,
    add_model_arguments,
    check_conversion_arguments,
    conversion_kwargs,
    device_of,
    groups_one,
    load_model_from_args,
    read_sources,
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
        help="convert a local safetensors folder without loading the model: shard by shard for a data-free "
        "method (peak memory about one shard), one decoder layer at a time on --device with --calibration; the "
        "default for a local safetensors folder; --no-stream loads the model",
    )
    p.add_argument(
        "--max-shard-size", default="1GB", help="largest output shard of a streamed conversion (1GB)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with a local safetensors folder: print the plan (layers, sizes, calibration tokens, estimated peak "
        "device and host memory) and write nothing",
    )
    p.add_argument(
        "--low-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --calibration on a local safetensors folder: keep the host's resident set low at some cost in "
        "time (the default); --no-low-memory is faster and may hold more (3B training the attention: 7.1 "
        "instead of 7.4 s a layer, 1.34 instead of 1.20 GiB)",
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
        return _run_on_checkpoint(args)
    if args.dry_run:
        raise CLIError(
            "--dry-run plans a conversion of a local safetensors folder (streamed data-free, or calibrated one "
            "decoder layer at a time)"
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


def _run_on_checkpoint(args: argparse.Namespace) -> int:
    """Convert the local safetensors folder without loading the model: shard by shard (data-free) or, with
    --calibration, one decoder layer at a time on --device (`hf_gqa.convert_checkpoint`)."""
    from ..streaming import convert_checkpoint, plan_checkpoint

    options: dict = {"max_shard_size": args.max_shard_size}
    calibrated = args.calibration is not None
    for name in REFINE_FLAGS:
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if calibrated:
        options.update(calibration_tokens=args.calibration_tokens, device=device_of(args))
    if args.dry_run:
        print(
            plan_checkpoint(
                args.model, args.groups, args.merge, args.grouping, calibrated=calibrated, **options
            )
        )
        return 0
    if calibrated:
        from ..loading import load_tokenizer

        options.update(
            calibration=read_sources(args.calibration, "calibration"),
            tokenizer=load_tokenizer(args.model),
            seed=args.conversion_seed,
            low_memory=args.low_memory,
        )
    print(convert_checkpoint(args.model, args.out, args.groups, args.merge, args.grouping, **options))
    print(f"saved to {args.out} (load with {_how_to_load(Path(args.out))})")
    return 0


def _streams(args: argparse.Namespace) -> bool:
    """Whether to convert the checkpoint on disk without loading the model: asked for, or by default for a local
    safetensors folder (shard by shard for a data-free method, one decoder layer at a time with --calibration;
    the result is the same tensors as loading and patching, within float tolerance for a calibrated one)."""
    from ..methods import get_method

    folder = Path(args.model) if args.model else None
    local = (
        folder is not None
        and args.gguf_file is None
        and ((folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists())
    )
    data_free = args.calibration is None and not get_method(args.merge or "mean").needs_calibration
    convertible = local and (data_free or args.calibration is not None) and args.groups != "auto"
    if args.stream and not convertible:
        raise CLIError(
            "--stream converts a local safetensors folder: with a data-free method (mean, first), or with "
            "--calibration one decoder layer at a time (not --groups auto)"
        )
    if args.stream is None:
        return convertible and args.dtype in (None, "auto")
    return args.stream


def _how_to_load(out: Path) -> str:
    from transformers import AutoConfig

    from ..io import needs_hf_gqa_to_load

    config = AutoConfig.from_pretrained(out)
    if needs_hf_gqa_to_load(config):
        if getattr(config, "auto_map", None):  # modeling code saved with it (multi-head-only families)
            return (
                "hf_gqa.from_pretrained(path), or AutoModelForCausalLM.from_pretrained(path, "
                "trust_remote_code=True) without hf_gqa"
            )
        return "hf_gqa.from_pretrained(path)"
    return "AutoModelForCausalLM.from_pretrained(path) or hf_gqa.from_pretrained(path)"
