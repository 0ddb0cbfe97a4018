"""The options several `hf-gqa` subcommands share, each parsed in one place with one spelling: the model to load,
`--groups`, the conversion (method, grouping, calibration text, refine settings), and text sources."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..errors import GQAError

#: name -> function adding the subcommand's parser to the subparsers object (and setting `func`).
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = {}


class CLIError(Exception):
    """A user error the command reports in one line (exit status 2)."""


def subcommand(name: str):
    """Register a function `(subparsers) -> parser` that adds the subcommand `name` and sets its `func`."""

    def decorator(fn: Callable[[argparse._SubParsersAction], argparse.ArgumentParser]):
        SUBCOMMANDS[name] = fn
        return fn

    return decorator


def note(message: str) -> None:
    """A one-line note on standard error (old spellings that still work)."""
    print(f"hf-gqa: note: {message}", file=sys.stderr)


# -- --groups --------------------------------------------------------------------------------------------------------
def groups_variants(text: str) -> list:
    """`--groups` of `eval` and `bench`: variants separated by commas, each a KV head count, `auto` or a per-layer
    list `4:4:2:2` (`hf_gqa.groups.parse_variants`)."""
    from ..groups import parse_variants

    try:
        return parse_variants(text)
    except GQAError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def groups_one(text: str):
    """`--groups` of `convert` and `uptrain`: one variant, spelled as in `eval` (`4`, `auto`, `4:4:2:2`).

    The older spelling of a per-layer list with commas (`4,4,2,2`) still works, with a note: commas now separate
    the variants of `eval` and `bench`.
    """
    variants = groups_variants(text)
    if len(variants) > 1 and all(isinstance(v, int) for v in variants):
        note(f"--groups {text}: a per-layer list is now written {':'.join(map(str, variants))} (as in eval).")
        return variants
    if len(variants) > 1:
        raise argparse.ArgumentTypeError(f"--groups {text!r}: this command converts to one variant")
    return variants[0]


def int_list(what: str) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        from ..groups import parse_int_list

        try:
            return parse_int_list(text, what)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


# -- the model -------------------------------------------------------------------------------------------------------
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


def device_of(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_groups_before_loading(args: argparse.Namespace, variants: list) -> None:
    """Refuse `--groups` values that do not fit the model, from its config alone (the model built on the meta
    device), before minutes of loading weights. Models that are neither a local folder nor `smollm2` (Hub ids)
    are checked after loading, by `patch`."""
    from pathlib import Path

    from ..loading import DEFAULT_MODEL, split_gguf

    if args.model is None or not (Path(args.model).exists() or args.model == DEFAULT_MODEL):
        return
    from transformers import AutoConfig

    from ..architectures import get_adapter
    from ..io import empty_model
    from ..planning import plan_layers

    path, gguf_file = split_gguf(args.model, args.gguf_file)
    if gguf_file:
        model = empty_model(AutoConfig.from_pretrained(path, gguf_file=gguf_file))
    elif (Path(path) / "config.json").exists():
        model = empty_model(AutoConfig.from_pretrained(path))
    else:
        return  # not a transformers folder: loading says so
    adapter = get_adapter(model)
    for groups in variants:
        if groups not in ("auto", None):
            plan_layers(model, adapter, groups, check=False)


def load_model_from_args(args: argparse.Namespace, tokenizer: bool = True):
    """`(model, tokenizer or None)` from the model arguments, through `hf_gqa.loading`."""
    from ..loading import load_model, load_tokenizer

    model = load_model(args.model, args.gguf_file, dtype=args.dtype, device=device_of(args))
    return model, (load_tokenizer(args.model, args.gguf_file) if tokenizer else None)


# -- the conversion --------------------------------------------------------------------------------------------------
#: The `--refine-*` options `add_conversion_arguments` defines, as `argparse` destinations; each one given is passed
#: on under the same name (`hf_gqa.patch`, `hf_gqa.convert_checkpoint`).
REFINE_FLAGS = (
    "refine_steps",
    "refine_lr",
    "refine_scope",
    "refine_positions",
    "refine_train",
    "refine_warmup",
)


def add_conversion_arguments(parser: argparse.ArgumentParser, merge_default: str | None = None) -> None:
    """How variants are converted, the same in every subcommand: `--merge`, `--grouping`,
    `--calibration` and what refines with it, `--kv-budget`."""
    group = parser.add_argument_group("conversion")
    group.add_argument(
        "--merge",
        dest="merge",
        default=merge_default,
        help="how a group's K/V heads become one: mean, first, pca, score, procrustes, refine "
        "(default: refine with --calibration, mean without)",
    )
    group.add_argument(
        "--grouping", default="consecutive", help="which KV heads share a group (default: consecutive)"
    )
    group.add_argument(
        "--calibration",
        nargs="+",
        default=None,
        help="calibration text for the data-aware methods: .txt files, folders of .txt files, or text shipped "
        "with hf_gqa: builtin (= builtin:calibration, Austen and 10 Wikipedia articles interleaved; the measured "
        "best), builtin:calibration-austen, builtin:calibration-wikipedia",
    )
    group.add_argument(
        "--calibration-tokens", type=int, default=8192, help="calibration tokens (default 8192)"
    )
    group.add_argument(
        "--conversion-seed", type=int, default=0, help="calibration sampling and refinement seed (default 0)"
    )
    group.add_argument("--refine-steps", type=int, default=None, help="refine steps per layer (default 100)")
    group.add_argument("--refine-lr", type=float, default=None, help="refine's peak Adam rate (default 3e-4)")
    group.add_argument(
        "--refine-positions",
        type=int,
        default=None,
        help="score each refine step on this many token positions of its block, computing only those "
        "(default: all; 256 of 512 converts about a third faster, slightly worse)",
    )
    group.add_argument(
        "--refine-scope",
        choices=["attention", "layer"],
        default=None,
        help="refine the attention block alone, or the whole decoder layer around it (MLP included)",
    )
    group.add_argument(
        "--refine-train",
        choices=["layer", "attention"],
        default=None,
        help="with layer scope, train every parameter of the layer (default) or only the converted attention, "
        "the MLP frozen: less memory (no optimizer state for the MLP) and cheaper steps",
    )
    group.add_argument(
        "--refine-warmup",
        type=int,
        default=None,
        help="refine steps over which the rate rises linearly to its peak before the cosine decay (default 0; "
        "fewer steps converge with a warmup, see examples/quickstart.py)",
    )
    group.add_argument(
        "--kv-budget", type=float, default=None, help="with --groups auto: KV bytes to keep (0-1]"
    )


def check_conversion_arguments(args: argparse.Namespace, variants: list) -> None:
    """What can be refused before any weight is loaded: an unknown method or grouping, missing calibration files,
    `--groups auto` without its budget and data, and `variants` (the `groups` values) that do not fit the model."""
    from ..grouping import GROUPING_METHODS
    from ..methods import METHODS

    if args.merge is not None and args.merge not in METHODS:
        raise CLIError(f"unknown merge {args.merge!r}; available: {', '.join(sorted(METHODS))}")
    if args.grouping not in GROUPING_METHODS:
        raise CLIError(
            f"unknown grouping {args.grouping!r}; available: {', '.join(sorted(GROUPING_METHODS))}"
        )
    if getattr(args, "groups", None) == "auto" and (args.kv_budget is None or args.calibration is None):
        raise CLIError("--groups auto needs --kv-budget and --calibration")
    from ..grouping import CALIBRATED_GROUPINGS
    from ..methods import get_method

    needs = (args.merge is not None and get_method(args.merge).needs_calibration) or args.refine_steps
    if args.calibration is None and (needs or args.grouping in CALIBRATED_GROUPINGS):
        asked = f"--merge {args.merge}" if args.merge else f"--grouping {args.grouping}"
        if args.refine_steps and not args.merge:
            asked = "--refine-steps"
        raise CLIError(
            f"{asked} needs calibration text: add --calibration builtin (the shipped text), a .txt file or a folder"
        )
    for source in args.calibration or []:
        text_source(source, "calibration")  # a missing file fails here, before the model loads
    check_groups_before_loading(args, variants)


def conversion_kwargs(args: argparse.Namespace, tokenizer) -> dict[str, Any]:
    """The conversion arguments as `hf_gqa.patch` keyword arguments (also for `compare` and `bench`)."""
    kwargs: dict[str, Any] = {"merge": args.merge, "grouping": args.grouping}
    if args.calibration:
        kwargs.update(
            calibration=read_sources(args.calibration, "calibration"),
            tokenizer=tokenizer,
            calibration_tokens=args.calibration_tokens,
            seed=args.conversion_seed,
        )
    for name in (*REFINE_FLAGS, "kv_budget"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


# -- text sources ----------------------------------------------------------------------------------------------------
def text_source(name: str, purpose: str) -> list[str]:
    """One source (`hf_gqa.data.text_source`): a builtin name or a path; an unknown one is a one-line error."""
    import warnings

    from ..data import text_source as resolve

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        try:
            found = resolve(name, purpose)
        except FileNotFoundError as err:
            raise CLIError(str(err)) from None
    for warning in caught:
        note(str(warning.message))
    return found


def read_sources(names: list[str], purpose: str) -> list[str]:
    """The documents of every source in `names`, in order."""
    return [text for name in names for text in text_source(name, purpose)]
