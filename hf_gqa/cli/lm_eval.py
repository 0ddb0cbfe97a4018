"""`hf-gqa lm-eval ...`: lm-eval's own command line, with the `hf-gqa` model and hf_gqa's offline tasks known.

    hf-gqa lm-eval --model hf-gqa --model_args pretrained=PATH,groups=4 --tasks hf_gqa_hellaswag --limit 50
    hf-gqa lm-eval ls tasks

Every argument goes to lm-eval's command line unchanged (`hf-gqa lm-eval --help` is lm-eval's help); before it
runs, the lm-eval model `hf-gqa` is registered and, unless the command names its own `--include_path`, hf_gqa's
task folder is included, so `hf_gqa_wikipedia`, `hf_gqa_hellaswag`, `hf_gqa_arc_easy` and `hf_gqa_winogrande` are
found offline.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .options import subcommand

#: lm-eval subcommands that take `--include_path`.
_TAKE_INCLUDE_PATH = ("run", "ls", "list", "validate")


@subcommand("lm-eval")
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Listed in `hf-gqa --help`; `hf_gqa.cli.main` hands `hf-gqa lm-eval ...` to `run` before parsing."""
    return subparsers.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-eval's own command line with the hf-gqa model and hf_gqa's offline tasks (all arguments passed on)",
    )


def lm_eval_argv(argv: Sequence[str]) -> list[str]:
    """`argv` for lm-eval's command line: as given, plus `--include_path <hf_gqa's tasks>` where it applies."""
    from ..evaluation.tasks import TASKS_DIR

    args = list(argv)
    asks_help = any(a in ("-h", "--help") for a in args)
    subcommand_given = bool(args) and not args[0].startswith("-")
    takes_path = not subcommand_given or args[0] in _TAKE_INCLUDE_PATH
    if args and not asks_help and takes_path and not any(a.startswith("--include_path") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    return args


def run(argv: Sequence[str]) -> int:
    """Run lm-eval's command line on `argv` in this process; returns its exit status."""
    from lm_eval.__main__ import cli_evaluate

    from ..evaluation import register_lm_eval_model

    register_lm_eval_model()
    saved = sys.argv
    sys.argv = ["lm-eval", *lm_eval_argv(argv)]
    try:
        cli_evaluate()
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    finally:
        sys.argv = saved
    return 0
