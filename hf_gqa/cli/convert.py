"""`hf-gqa convert`: load a model, convert its attention to GQA, save the model and its tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (
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
        "--seed", dest="conversion_seed", type=int, help=argparse.SUPPRESS
    )  # older --conversion-seed
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..describe import describe
    from ..io import needs_hf_gqa_to_load
    from ..patch import patch

    if args.conversion_seed is None:
        args.conversion_seed = 0
    check_conversion_arguments(args)
    model, tokenizer = load_model_from_args(args)
    patch(model, groups=args.groups, **conversion_kwargs(args, tokenizer))
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
