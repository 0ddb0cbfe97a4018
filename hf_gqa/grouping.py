"""Which key/value heads ("units") share a group after conversion.

A grouping function takes the number of current KV heads `K` and the target `G` (which divides `K`) and returns
`G` lists of unit indices, each of length `K // G`. Groups are contiguous after the patcher applies the
permutation `sum(groups, [])`, so query head `h` of the converted layer uses KV head `h // (H // G)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .canonical import AttentionWeights

GroupingFn = Callable[[AttentionWeights, int, "object | None"], list[list[int]]]


def consecutive_groups(
    weights: AttentionWeights, groups: int, stats: object | None = None
) -> list[list[int]]:
    """Ainslie et al. (2023): KV head `i` joins group `i // (K // groups)`."""
    units = weights.num_kv_heads
    size = units // groups
    return [list(range(g * size, (g + 1) * size)) for g in range(groups)]


GROUPING_METHODS: dict[str, GroupingFn] = {"consecutive": consecutive_groups}


def register_grouping(name: str, fn: GroupingFn) -> None:
    """Make `patch(..., grouping=name)` use `fn`."""
    GROUPING_METHODS[name] = fn


def get_grouping(name: str) -> GroupingFn:
    if name not in GROUPING_METHODS:
        raise ValueError(f"Unknown grouping {name!r}; choose one of {sorted(GROUPING_METHODS)}.")
    return GROUPING_METHODS[name]


def check_partition(groups: list[list[int]], units: int) -> None:
    """Raise unless `groups` is a balanced partition of `range(units)`."""
    flat = sorted(i for g in groups for i in g)
    sizes = {len(g) for g in groups}
    if flat != list(range(units)) or len(sizes) != 1:
        raise ValueError(f"grouping must be a balanced partition of {units} KV heads, got {groups}")


def permutation_of(groups: list[list[int]]) -> list[int]:
    """The KV-head order that makes every group contiguous."""
    return [i for g in groups for i in g]


def as_index(groups: list[list[int]]) -> torch.Tensor:
    """`[G, K // G]` index tensor of the groups."""
    return torch.tensor(groups, dtype=torch.long)
