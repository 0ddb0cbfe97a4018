"""lm-eval tasks shipped with hf_gqa, over the data in `hf_gqa.data`; they run without the Hugging Face Hub.

| task | what | metrics |
|---|---|---|
| `hf_gqa_wikipedia` | rolling log-likelihood over 12 held-out Wikipedia articles | word_perplexity, byte_perplexity, bits_per_byte |
| `hf_gqa_hellaswag` | lm-eval's `hellaswag` over the first 1,000 validation rows | acc, acc_norm |
| `hf_gqa_arc_easy` | lm-eval's `arc_easy` over the validation split (570 rows) | acc, acc_norm |
| `hf_gqa_winogrande` | lm-eval's `winogrande` over the XL validation split (1,267 rows) | acc |

The tag `hf_gqa` names all four. Use them from lm-eval with `TaskManager(include_path=TASKS_DIR)` or
`lm_eval --include_path <TASKS_DIR>`; `task_manager()` does the first.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

#: The task names shipped here, in a stable order.
BUNDLED_TASKS = ("hf_gqa_wikipedia", "hf_gqa_hellaswag", "hf_gqa_arc_easy", "hf_gqa_winogrande")
BUNDLED_TAG = "hf_gqa"


def task_manager(tasks: Sequence[str] | None = None):
    """An lm-eval `TaskManager` that knows the bundled tasks.

    Args:
        tasks: the task names about to be loaded. When every one is bundled, lm-eval's own task folders are not
            indexed (saves seconds); otherwise, or when None, they are, and the standard tasks resolve as usual.
    """
    bundled = set(BUNDLED_TASKS) | {BUNDLED_TAG}
    only_bundled = tasks is not None and all(t in bundled for t in tasks)
    return _task_manager(include_defaults=not only_bundled)


@functools.lru_cache(maxsize=2)
def _task_manager(include_defaults: bool):
    """Indexing lm-eval's ~15k task files takes seconds: one manager per process (its index never changes)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


__all__ = ["BUNDLED_TAG", "BUNDLED_TASKS", "TASKS_DIR", "task_manager"]
