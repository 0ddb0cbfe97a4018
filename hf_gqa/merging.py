"""How the key/value heads of a group become one head.

A merge function receives canonical weights whose KV heads are already ordered so that the groups are
contiguous (`K // G` consecutive KV heads a group, and the query heads with them) and returns canonical weights
with `G` KV heads. It may also change the query and output projections (to fold in maps), which is why it
returns whole `AttentionWeights`: adapters never see how a merge works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .canonical import AttentionWeights

MergeFn = Callable[[AttentionWeights, int, "object | None"], AttentionWeights]


def _group_view(t: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """`[K, ...]` -> `[G, K // G, ...]`."""
    return None if t is None else t.reshape(groups, t.shape[0] // groups, *t.shape[1:])


def merge_mean(weights: AttentionWeights, groups: int, stats: object | None = None) -> AttentionWeights:
    """Ainslie et al. (2023): each merged K/V head (and bias) is the mean of its group's heads.

    `k: [K, d, D] -> [G, d, D]`, `k_bias: [K, d] -> [G, d]`, likewise for values; queries and outputs unchanged.
    """

    def mean(t: torch.Tensor | None) -> torch.Tensor | None:
        grouped = _group_view(t, groups)
        return None if grouped is None else grouped.float().mean(dim=1).to(t.dtype)

    return weights.replace(
        k=mean(weights.k), v=mean(weights.v), k_bias=mean(weights.k_bias), v_bias=mean(weights.v_bias)
    )


def merge_first(weights: AttentionWeights, groups: int, stats: object | None = None) -> AttentionWeights:
    """The paper's baseline: keep the first K/V head of each group."""

    def first(t: torch.Tensor | None) -> torch.Tensor | None:
        grouped = _group_view(t, groups)
        return None if grouped is None else grouped[:, 0].clone()

    return weights.replace(
        k=first(weights.k), v=first(weights.v), k_bias=first(weights.k_bias), v_bias=first(weights.v_bias)
    )


MERGE_METHODS: dict[str, MergeFn] = {"mean": merge_mean, "first": merge_first}


def register_merge(name: str, fn: MergeFn) -> None:
    """Make `patch(..., merge=name)` use `fn`."""
    MERGE_METHODS[name] = fn


def get_merge(name: str | MergeFn) -> MergeFn:
    if callable(name):
        return name
    if name not in MERGE_METHODS:
        raise ValueError(f"Unknown merge {name!r}; choose one of {sorted(MERGE_METHODS)} or pass a function.")
    return MERGE_METHODS[name]
