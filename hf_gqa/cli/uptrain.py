"""`hf-gqa uptrain`: convert a model (optionally) and uptrain it with LoRA, K/V-only, attention-only or full training.

    hf-gqa uptrain --model path --groups 4 --data corpus.txt --method lora --steps 500 --out out/
    accelerate launch --config_file examples/accelerate/fsdp.yaml -m hf_gqa.cli uptrain ...  # FSDP2, sharded
    accelerate launch --config_file examples/accelerate/ddp.yaml -m hf_gqa.cli uptrain ...   # data parallel

Under `accelerate launch` every process loads (and converts) the model and trains on its own `--batch-size` blocks
of each step (global batch: processes x `--batch-size` x `--grad-accum`); under FSDP each converted decoder layer
is sharded across the processes and the trained weights are gathered onto the main process at the end. Only the
main process writes `--out` and prints. The example configs run on CPU processes over gloo (`use_cpu: true`); their
comments say what to change on GPUs. On a machine without a GPU `accelerate launch --multi_gpu --num_processes N`
(or `torchrun --nproc_per_node N`) also starts N CPU processes; `accelerate launch --cpu` starts several only
through MPI (`--mpirun_hostfile`), otherwise one.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path
from typing import Any

from .options import (
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

logger = logging.getLogger("hf_gqa")


@subcommand("uptrain")
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `uptrain` subcommand to `subparsers` (the result of `parser.add_subparsers()`)."""
    p = subparsers.add_parser(
        "uptrain",
        help="convert a model (optionally) and uptrain it with LoRA, K/V-only, attention-only or full training",
        description=(
            "Uptrain a GQA-converted model on text with the transformers Trainer. Works under "
            "`accelerate launch` unchanged: data parallel (DDP) or sharded (FSDP2; see "
            "examples/accelerate/fsdp.yaml and ddp.yaml), on GPUs or CPU processes. Text arguments take files, folders of *.txt, "
            "text shipped with hf_gqa (builtin:train-austen and builtin:train-wikipedia for training, "
            "builtin:heldout for the held-out articles, builtin:calibration (Austen and Wikipedia interleaved), "
            "builtin:calibration-austen and builtin:calibration-wikipedia; see hf_gqa/data/SOURCES.md), or a "
            "datasets name loaded with datasets.load_dataset."
        ),
    )
    add_model_arguments(p)
    p.add_argument("--tokenizer", help="tokenizer path or id (default: the model's)")
    p.add_argument(
        "--groups",
        type=groups_one,
        help="convert first, to this many KV heads: N, one per layer (4:4:2:2), or auto (skipped without it)",
    )
    add_conversion_arguments(p)
    p.add_argument("--patch-kwargs", default="{}", help="other hf_gqa.patch keywords, as a JSON object")
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
    p.set_defaults(func=run, model="smollm2")
    return p


def training_texts(items: list[str], split: str = "train") -> Any:
    """Text for `uptrain`: builtin names and paths (`hf_gqa.data.text_source`), or one `datasets` name."""
    item = items[0]
    looks_local = item.startswith(("builtin", ".", "/", "~")) or Path(item).suffix or Path(item).exists()
    if len(items) == 1 and not looks_local:  # a `datasets` name (Hub or local loader script)
        import datasets

        return datasets.load_dataset(item, split=split)
    return read_sources(items, "training")


def convert(model, tokenizer, args: argparse.Namespace):
    """Apply `hf_gqa.patch` with the conversion options (no-op without `--groups`)."""
    from ..patch import patch

    if args.groups is None:
        return model
    kwargs = {**conversion_kwargs(args, tokenizer), **json.loads(args.patch_kwargs)}
    try:
        return patch(model, groups=args.groups, **kwargs)
    except TypeError as err:
        raise CLIError(f"hf_gqa.patch does not accept these options ({err}); check --patch-kwargs.") from err


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
def run(args: argparse.Namespace) -> int:
    """Load, convert, uptrain and save, as `hf-gqa uptrain` does; returns the exit status."""
    from accelerate import PartialState

    from ..loading import load_model, load_tokenizer
    from ..patch import is_patched
    from ..training import LOSS_LOG, UptrainConfig, uptrain
    from ..training.distributed import parallel_mode

    check_conversion_arguments(args, [args.groups])
    train_data = training_texts(args.data, args.data_split)
    eval_data = training_texts(args.eval_data, args.data_split) if args.eval_data else None
    if args.dtype is None:
        args.dtype = "float32"
    model, tokenizer = load_model_from_args(args, tokenizer=args.tokenizer is None)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)

    teacher = None
    if args.teacher == "original":
        if is_patched(model) and args.groups is None:
            raise CLIError(
                "--teacher without a path needs the unconverted model: pass --groups, or a teacher path."
            )
        teacher = copy.deepcopy(model).eval()
    elif args.teacher:
        teacher = load_model(args.teacher, dtype=args.dtype, device=device_of(args))
    model = convert(model, tokenizer, args)
    if not is_patched(model):
        logger.warning("hf-gqa uptrain: the model is not converted (no --groups); training it as it is.")
    config = UptrainConfig(
        method=args.method,
        max_steps=args.steps,
        learning_rate=args.lr,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules.split(",") if args.target_modules else None,
        merge_adapter=args.save_merged and args.method == "lora",
        distill_weight=args.distill_weight,
        temperature=args.temperature,
        lm_weight=args.lm_weight,
        hidden_weight=args.hidden_weight,
        block_size=args.block_size,
        text_column=args.text_column,
        eval_fraction=args.eval_fraction,
        max_eval_blocks=args.max_eval_blocks,
        output_dir=args.out,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        training_args=_training_args(args),
    )
    trained = uptrain(model, tokenizer, train_data, config, teacher=teacher, eval_data=eval_data)

    state = PartialState()
    if state.is_main_process:
        out = Path(args.out)
        trained.save_pretrained(out)
        tokenizer.save_pretrained(out)
        summary: dict[str, Any] = {
            "method": args.method,
            "steps": args.steps,
            "loss_log": LOSS_LOG,
            "processes": state.num_processes,
            "parallel": parallel_mode(),  # "FSDP2", "FSDP1", "DDP" or "none"
        }
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
