"""The `hf-gqa` command: convert, evaluate, benchmark and uptrain grouped-query attention conversions.

    hf-gqa convert --model path/or/id --groups 4 --out converted/
    hf-gqa eval    --model path/or/id --groups 12,4,1 --tasks hf_gqa_wikipedia,hf_gqa_hellaswag --limit 200 --out report/
    hf-gqa bench   --model path/or/id --groups 12,4,1 --batch 1,8 --context 512,2048 --new-tokens 128
    hf-gqa uptrain --model path/or/id --groups 4 --data corpus.txt --method lora --steps 500 --out out/
    hf-gqa lm-eval --model hf-gqa --model_args pretrained=path,groups=4 --tasks hf_gqa_hellaswag --limit 50

Also `python -m hf_gqa.cli ...` (and `accelerate launch -m hf_gqa.cli uptrain ...`). `--model smollm2` is the
packaged SmolLM2-135M-Instruct GGUF.

One module per subcommand (`convert.py`, `evaluate.py`, `bench.py`, `uptrain.py`, `lm_eval.py`), each with an `add_parser`
that registers itself with `@subcommand`; the options several subcommands share (the model, `--groups`, the
conversion and its calibration text) are parsed once, in `options.py`. Adding a subcommand is one module here
with one `@subcommand("name")` function, imported below.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from ..errors import GQAError
from ..loading import ModelLoadError
from . import bench, convert, evaluate, lm_eval, uptrain  # noqa: E402, F401, I001  (each registers its subcommand)
from .options import SUBCOMMANDS, CLIError, subcommand


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-gqa",
        description="Convert Hugging Face causal LMs to grouped-query attention, and measure what it costs in "
        "quality and buys in speed and memory.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    order = ["convert", "eval", "bench", "uptrain", "lm-eval"]
    for name in sorted(SUBCOMMANDS, key=lambda n: (order.index(n) if n in order else len(order), n)):
        SUBCOMMANDS[name](subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-gqa` console script; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["lm-eval"]:  # lm-eval's own command line, every argument passed on unchanged
        return lm_eval.run(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["hf-gqa", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except (CLIError, GQAError, ModelLoadError, FileNotFoundError) as err:
        parser.exit(2, f"hf-gqa {args.command}: error: {err}\n")
    return 2


__all__ = ["CLIError", "build_parser", "main", "subcommand"]
