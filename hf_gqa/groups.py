"""The one parser of the `groups` values users type, on the command line and in lm-eval `model_args`.

One variant is a KV head count (`4`), `auto`, or one count per layer (`4:4:2:2`; `;`, `/`, `|` work too); a list of
variants separates them with commas (`12,4,1`), as `hf-gqa eval` and `hf-gqa bench` take them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import GroupsError

#: Separators of a per-layer list inside one value (a comma already separates lm-eval `model_args`).
_LAYER_SEPARATORS = r"[;:/|\s]+"

Groups = int | list[int] | str  # a count, one count per layer, or "auto"


def _positive_int(text: str, whole: str) -> int:
    text = text.strip()
    if not re.fullmatch(r"\+?\d+", text) or int(text) < 1:
        raise GroupsError(
            f"invalid groups {whole!r}: {text!r} is not a positive integer (a KV head count such as 4, or one "
            "count per layer such as 4:4:2:2)."
        )
    return int(text)


def parse_groups(value: str | int | Sequence[int] | None) -> Groups | None:
    """One `groups` value for `hf_gqa.patch`: an int, `"auto"`, or a per-layer list written `4:4:2:2` (or `;`, `/`, `|`).

    None and the strings "", "none" and "original" mean "do not patch".
    """
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        if value is not None and value < 1:
            raise GroupsError(f"invalid groups {value!r}: the KV head count must be at least 1.")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none", "original"):
            return None
        if text.lower() == "auto":
            return "auto"
        parts = [p for p in re.split(_LAYER_SEPARATORS, text) if p]
        numbers = [_positive_int(p, value) for p in parts]
        return numbers[0] if len(numbers) == 1 and not re.search(_LAYER_SEPARATORS, text) else numbers
    if isinstance(value, Sequence) and not isinstance(value, bool):
        return [_positive_int(str(v), str(list(value))) for v in value]
    raise GroupsError(f"invalid groups {value!r}: expected an int, a per-layer list, or None.")


def parse_variants(text: str) -> list[Groups]:
    """A comma-separated list of variants, each an int or a per-layer list: `"12,4,1"`, `"4,2:2:1:1"`."""
    items = [item for item in text.split(",")]
    if not text.strip() or any(not item.strip() for item in items):
        raise GroupsError(
            f"invalid groups list {text!r}: expected KV head counts separated by commas, such as 12,4,1."
        )
    variants = [parse_groups(item) for item in items]
    if any(v is None for v in variants):
        raise GroupsError(f"invalid groups list {text!r}: every entry must be a KV head count.")
    return variants  # type: ignore[return-value]


def parse_int_list(text: str, what: str) -> list[int]:
    """`"1,8"` -> `[1, 8]`; raises ValueError naming `what` on anything else."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ValueError(
            f"invalid {what} {text!r}: expected positive integers separated by commas, such as 1,8."
        )
    return values


def groups_label(groups: Groups | None) -> str:
    """A short display name: `original`, `kv=4`, `kv=4:4:2:2`, `kv=auto`."""
    if groups is None:
        return "original"
    if isinstance(groups, (int, str)):
        return f"kv={groups}"
    return "kv=" + ":".join(str(g) for g in groups)
