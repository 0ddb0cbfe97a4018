"""`hf-gqa uptrain`: convert (optionally) and uptrain a model from the command line.

    hf-gqa uptrain --model path --groups 4 --data corpus.txt --method lora --steps 500 --out out/
    accelerate launch --multi_gpu --num_processes 2 -m hf_gqa.cli uptrain ...   # the same command, data parallel

On a machine without a GPU, `accelerate launch --multi_gpu --num_processes N` (or `torchrun --nproc_per_node N`)
starts N CPU processes and training runs data parallel on gloo; `accelerate launch --cpu` starts several processes
only through MPI (`--mpirun_hostfile`), otherwise one.

`add_uptrain_parser(subparsers)` adds the subcommand to the `hf-gqa` parser; `run_uptrain(args)` runs it. The
module also runs on its own: `python -m hf_gqa.training_cli uptrain ...`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("hf_gqa")

DEFAULT_MODEL = "smollm2"


def _builtin_texts() -> dict[str, Callable[[], list[str]]]:
    from . import data

    return {
        "builtin:austen": lambda: [data.train_text("austen")],
        "builtin:wikipedia-train": lambda: [data.train_text("wikipedia")],
        "builtin:wikipedia": data.heldout_documents,
        "builtin:calibration": lambda: [data.calibration_text("mixed")],
        "builtin:calibration-austen": lambda: [data.calibration_text("austen")],
        "builtin:calibration-wikipedia": lambda: [data.calibration_text("wikipedia")],
    }


def add_uptrain_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `uptrain` subcommand to `subparsers` (the result of `parser.add_subparsers()`)."""
    p = subparsers.add_parser(
        "uptrain",
        help="convert a model (optionally) and uptrain it with LoRA, K/V-only, attention-only or full training",
        description=(
            "Uptrain a GQA-converted model on text with the transformers Trainer. Works under "
            "`accelerate launch` (data parallel) unchanged. Text arguments take files, folders of *.txt, "
            "text shipped with hf_gqa (builtin:austen and builtin:wikipedia-train for training, builtin:wikipedia "
            "for the held-out articles, builtin:calibration (Austen and Wikipedia interleaved), "
            "builtin:calibration-austen and builtin:calibration-wikipedia; see hf_gqa/data/SOURCES.md), or a "
            "datasets name loaded with datasets.load_dataset."
        ),
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a local folder, a Hub id, a folder saved by hf_gqa, or 'smollm2' (the packaged SmolLM2-135M GGUF)",
    )
    model.add_argument("--gguf", help="GGUF file name inside --model to load from")
    model.add_argument("--tokenizer", help="tokenizer path or id (default: the model's)")
    model.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    convert = p.add_argument_group("conversion (skipped without --groups)")
    convert.add_argument("--groups", help="KV heads after conversion: N, a comma list per layer, or 'auto'")
    convert.add_argument("--merge", help="merge method passed to hf_gqa.patch (default: patch's default)")
    convert.add_argument("--grouping", help="grouping method passed to hf_gqa.patch")
    convert.add_argument(
        "--calibration",
        nargs="+",
        help="calibration text for hf_gqa.patch (passed as calibration=, tokenizer=)",
    )
    convert.add_argument("--patch-kwargs", default="{}", help="other hf_gqa.patch keywords, as a JSON object")
    data = p.add_argument_group("data")
    data.add_argument("--data", nargs="+", required=True, help="training text")
    data.add_argument("--data-split", default="train", help="split for a datasets name (default: train)")
    data.add_argument("--text-column", default="text")
    data.add_argument("--eval-data", nargs="+", help="held-out text for perplexity during training")
    data.add_argument(
        "--eval-fraction",
        type=float,
        default=0.0,
        help="without --eval-data, hold out this fraction of --data",
    )
    data.add_argument("--max-eval-blocks", type=int, help="evaluate on at most this many blocks")
    data.add_argument("--block-size", type=int, default=512, help="tokens per packed training block")
    train = p.add_argument_group("training")
    # hf_gqa.training.METHODS, spelled out so that building the parser does not import the Trainer (a test
    # keeps the two equal)
    train.add_argument("--method", default="lora", choices=["lora", "kv", "attention", "full"])
    train.add_argument("--steps", type=int, default=100, help="optimiser steps")
    train.add_argument(
        "--max-minutes",
        type=float,
        help="stop after this much training time (evaluation excluded); linear and cosine schedules decay over it",
    )
    train.add_argument("--lr", type=float, help="learning rate (default depends on --method)")
    train.add_argument("--batch-size", type=int, default=4, help="blocks per device per step")
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--warmup-steps", type=int)
    train.add_argument(
        "--scheduler",
        dest="lr_scheduler_type",
        help="lr_scheduler_type of transformers (default cosine; linear, constant, constant_with_warmup, ...)",
    )
    train.add_argument("--eval-steps", type=int)
    train.add_argument("--logging-steps", type=int)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=16)
    lora.add_argument("--lora-alpha", type=float, help="default 2 * r")
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument(
        "--target-modules", help="comma-separated LoRA targets (default: the family's attention projections)"
    )
    distill = p.add_argument_group("distillation")
    distill.add_argument(
        "--teacher",
        nargs="?",
        const="original",
        help="distil from a teacher: the model as loaded, before conversion (no value), or a model path",
    )
    distill.add_argument("--distill-weight", type=float, default=1.0, help="weight of the KL term")
    distill.add_argument("--temperature", type=float, default=1.0)
    distill.add_argument(
        "--lm-weight",
        type=float,
        default=1.0,
        help="weight of the next-token loss beside the KL (0: distil only)",
    )
    distill.add_argument(
        "--hidden-weight",
        type=float,
        default=0.0,
        help="also match every layer's output to the teacher's, with this weight",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--out", required=True, help="output folder: model or adapter, tokenizer, loss_log.jsonl"
    )
    out.add_argument(
        "--save-merged", action="store_true", help="LoRA: save the merged model instead of the adapter"
    )
    p.set_defaults(func=run_uptrain)
    return p


# -- loading ---------------------------------------------------------------------------------------------------
def load_model(spec: str, gguf: str | None = None, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer_source)` for `--model`: 'smollm2', a GGUF, a folder saved by hf_gqa, or a Hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .io import from_pretrained
    from .patch import META_KEY

    if spec == DEFAULT_MODEL and gguf is None and not Path(spec).exists():
        from . import default_model

        model, _ = default_model.load(dtype=dtype)
        return dequantized(model), (str(default_model.gguf_dir()), default_model.GGUF_FILE)
    if gguf:
        model = AutoModelForCausalLM.from_pretrained(spec, gguf_file=gguf, dtype=dtype)
        return dequantized(model), (spec, gguf)
    config = AutoConfig.from_pretrained(spec)
    if getattr(config.get_text_config(decoder=True), META_KEY, None):
        return from_pretrained(spec, dtype=dtype), (spec, None)
    return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype), (spec, None)


def dequantized(model):
    """Mark a model loaded from GGUF (de-quantized to floats by transformers) as the plain float model it is, so
    that `patch` converts it and the Trainer trains it."""
    from . import patch as patch_module

    forget = getattr(patch_module, "forget_gguf_quantizer", None)
    if forget is not None:
        forget(model)
    if getattr(model, "hf_quantizer", None) is None and model.__dict__.get("is_quantized"):
        model.is_quantized = False
    return model


def load_tokenizer(source: tuple[str, str | None]):
    from transformers import AutoTokenizer

    path, gguf = source
    return (
        AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    )


def resolve_texts(items: list[str], split: str = "train", text_column: str = "text") -> Any:
    """Text for `uptrain` from CLI arguments: paths, builtin names, or one datasets name."""
    builtin = _builtin_texts()
    texts: list[Any] = []
    for item in items:
        if item in builtin:
            texts.extend(builtin[item]())
        elif Path(item).exists():
            texts.append(Path(item))
        else:
            import datasets

            if len(items) > 1:
                raise FileNotFoundError(f"{item} is not a file, a folder or a builtin text.")
            return datasets.load_dataset(item, split=split)
    return texts


def _groups(value: str | None) -> int | list[int] | str | None:
    if value is None or value == "auto":
        return value
    parts = [int(v) for v in value.split(",")]
    return parts[0] if len(parts) == 1 else parts


def convert(model, tokenizer, args: argparse.Namespace):
    """Apply `hf_gqa.patch` with the CLI's conversion options (no-op without `--groups`)."""
    import hf_gqa

    if args.groups is None:
        return model
    kwargs: dict[str, Any] = json.loads(args.patch_kwargs)
    if args.merge:
        kwargs["merge"] = args.merge
    if args.grouping:
        kwargs["grouping"] = args.grouping
    if args.calibration:
        from .training import read_texts

        kwargs["calibration"] = read_texts(resolve_texts(args.calibration))
        kwargs["tokenizer"] = tokenizer
    try:
        return hf_gqa.patch(model, groups=_groups(args.groups), **kwargs)
    except TypeError as err:
        raise SystemExit(
            f"hf_gqa.patch does not accept these options ({err}); check --patch-kwargs."
        ) from err


def _training_args(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        weight_decay=args.weight_decay,
        seed=args.seed,
        bf16=args.bf16,
        disable_tqdm=args.no_progress,
    )
    if args.gradient_checkpointing:
        values["gradient_checkpointing"] = True
    for name in ("warmup_steps", "eval_steps", "logging_steps", "lr_scheduler_type"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return values


# -- the command -----------------------------------------------------------------------------------------------
def run_uptrain(args: argparse.Namespace) -> int:
    """Load, convert, uptrain and save, as `hf-gqa uptrain` does; returns the exit status."""
    from accelerate import PartialState

    import hf_gqa

    from .training import LOSS_LOG, uptrain

    dtype = getattr(torch, args.dtype)
    model, tokenizer_source = load_model(args.model, args.gguf, dtype)
    tokenizer = load_tokenizer((args.tokenizer, None) if args.tokenizer else tokenizer_source)

    teacher = None
    if args.teacher == "original":
        if hf_gqa.is_patched(model) and args.groups is None:
            raise SystemExit(
                "--teacher without a path needs the unconverted model: pass --groups, or a teacher path."
            )
        teacher = copy.deepcopy(model).eval()
    elif args.teacher:
        teacher = load_model(args.teacher, None, dtype)[0].eval()
    model = convert(model, tokenizer, args)
    if not hf_gqa.is_patched(model):
        logger.warning("hf-gqa uptrain: the model is not converted (no --groups); training it as it is.")

    train_data = resolve_texts(args.data, args.data_split, args.text_column)
    eval_data = resolve_texts(args.eval_data, args.data_split, args.text_column) if args.eval_data else None
    targets = args.target_modules.split(",") if args.target_modules else None
    trained = uptrain(
        model,
        tokenizer,
        train_data,
        method=args.method,
        max_steps=args.steps,
        teacher=teacher,
        distill_weight=args.distill_weight,
        temperature=args.temperature,
        lm_weight=args.lm_weight,
        hidden_weight=args.hidden_weight,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        eval_data=eval_data,
        eval_fraction=args.eval_fraction,
        max_eval_blocks=args.max_eval_blocks,
        block_size=args.block_size,
        learning_rate=args.lr,
        output_dir=args.out,
        merge=args.save_merged and args.method == "lora",
        text_column=args.text_column,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        **_training_args(args),
    )

    state = PartialState()
    if state.is_main_process:
        out = Path(args.out)
        trained.save_pretrained(out)
        tokenizer.save_pretrained(out)
        summary: dict[str, Any] = {"method": args.method, "steps": args.steps, "loss_log": LOSS_LOG}
        rows = [json.loads(line) for line in (out / LOSS_LOG).read_text().splitlines() if line.strip()]
        evals = [r for r in rows if "eval_perplexity" in r]
        if evals:
            summary["eval_perplexity"] = evals[-1]["eval_perplexity"]
            summary["eval_step"] = evals[-1]["step"]
            print(f"held-out perplexity after uptraining: {evals[-1]['eval_perplexity']:.3f}")
        (out / "uptrain_summary.json").write_text(json.dumps(summary, indent=2))
        kind = "LoRA adapter" if args.method == "lora" and not args.save_merged else "model"
        print(f"saved the {kind} to {out}")
    state.wait_for_everyone()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-gqa")
    sub = parser.add_subparsers(dest="command", required=True)
    add_uptrain_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
