"""Planning a conversion: which attention modules change, from how many KV heads to how many, validated against
every layer before any weight is touched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from .architectures import AttentionAdapter
from .canonical import AttentionWeights
from .checks import check_weights
from .errors import GQAError, GroupsError, UnsupportedArchitectureError
from .grouping import GroupingFn, check_partition, permutation_of
from .methods import ConversionMethod


@dataclass
class LayerPlan:
    """What the patcher will do to one attention module."""

    name: str
    module: nn.Module
    num_heads: int
    kv_heads_before: int
    kv_heads_after: int
    head_dim: int


def plan_layers(
    model: PreTrainedModel, adapter: AttentionAdapter, groups: int | Sequence[int], check: bool = True
) -> list[LayerPlan]:
    """Validate `groups` against every attention module (and, with `check`, their weights); touch nothing.

    `check=False` plans a model built on the meta device (a checkpoint streamed layer by layer checks each
    module's weights as it loads them)."""
    modules = adapter.attention_modules(model)
    if not modules:
        raise UnsupportedArchitectureError(
            f"No {adapter.family} attention modules found in {type(model).__name__}; was it built by transformers?"
        )
    if check:
        check_weights(model, modules)
    targets = _targets(groups, len(modules))
    plans = []
    for i, ((name, module), g) in enumerate(zip(modules, targets)):
        heads, kv = adapter.num_heads(module), adapter.num_kv_heads(module)
        _check_groups(i, g, heads, kv)
        plans.append(LayerPlan(name, module, heads, kv, g, adapter.head_dim(module)))
    return plans


def _targets(groups: int | Sequence[int], layers: int) -> list[int]:
    if isinstance(groups, bool) or not isinstance(groups, (int, Sequence)) or isinstance(groups, str):
        raise GroupsError(
            f"groups must be a positive int or a list of {layers} ints (one per layer), got {groups!r}."
        )
    if isinstance(groups, int):
        return [groups] * layers
    targets = list(groups)
    if len(targets) != layers:
        raise GroupsError(f"groups has {len(targets)} entries but the model has {layers} attention layers.")
    if not all(isinstance(g, int) and not isinstance(g, bool) for g in targets):
        raise GroupsError(f"groups must hold ints, got {targets!r}.")
    return targets


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_groups(layer: int, g: int, heads: int, kv: int) -> None:
    if g < 1:
        raise GroupsError(
            f"groups must be at least 1 (1 = multi-query attention), got {g} for layer {layer}."
        )
    if kv == heads:
        if g > heads:
            raise GroupsError(
                f"groups={g} exceeds the {heads} query heads of layer {layer}; choose one of {_divisors(heads)}."
            )
        if heads % g:
            raise GroupsError(
                f"groups={g} does not divide the {heads} query heads of layer {layer}; choose one of {_divisors(heads)}."
            )
        return
    if g > kv or kv % g:
        raise GroupsError(
            f"layer {layer} already has {kv} KV heads for {heads} query heads (a GQA model, or already patched): "
            f"groups={g} must divide {kv}; choose one of {_divisors(kv)}."
        )


def convert_weights(
    weights: AttentionWeights,
    groups: int,
    method: ConversionMethod,
    grouping_fn: GroupingFn,
    stats: object | None,
) -> AttentionWeights:
    """Group and merge one layer's canonical weights down to `groups` KV heads with `method`'s closed form.

    `grouping_fn` partitions the KV heads; the heads are permuted so that each group is contiguous, then merged.
    """
    partition = grouping_fn(weights, groups, stats)
    check_partition(partition, weights.num_kv_heads)
    order = permutation_of(partition)
    if order != list(range(weights.num_kv_heads)):
        weights = weights.permute_kv(order)
    merged = method.merge(weights, groups, stats)
    if merged.num_kv_heads != groups or merged.k.shape[1:] != weights.k.shape[1:]:
        raise GQAError(f"merge returned K of shape {tuple(merged.k.shape)}, expected {groups} heads")
    return merged
