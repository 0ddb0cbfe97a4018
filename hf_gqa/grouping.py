"""Which key/value heads ("units") share a group after conversion.

A grouping function takes the number of current KV heads `K` and the target `G` (which divides `K`) and returns
`G` lists of unit indices, each of length `K // G`. Groups are contiguous after the patcher applies the
permutation `sum(groups, [])`, so query head `h` of the converted layer uses KV head `h // (H // G)`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from .canonical import AttentionWeights
from .errors import GQAError

GroupingFn = Callable[[AttentionWeights, int, "object | None"], list[list[int]]]


def consecutive_groups(
    weights: AttentionWeights, groups: int, stats: object | None = None
) -> list[list[int]]:
    """Ainslie et al. (2023): KV head `i` joins group `i // (K // groups)`."""
    units = weights.num_kv_heads
    size = units // groups
    return [list(range(g * size, (g + 1) * size)) for g in range(groups)]


GROUPING_METHODS: dict[str, GroupingFn] = {"consecutive": consecutive_groups}
#: Groupings that need calibration statistics.
CALIBRATED_GROUPINGS: set[str] = set()


def register_grouping(name: str, fn: GroupingFn, needs_calibration: bool = False) -> None:
    """Make `patch(..., grouping=name)` use `fn`; `needs_calibration`: `fn` reads calibration statistics."""
    GROUPING_METHODS[name] = fn
    if needs_calibration:
        CALIBRATED_GROUPINGS.add(name)
    else:
        CALIBRATED_GROUPINGS.discard(name)


def get_grouping(name: str) -> GroupingFn:
    if name not in GROUPING_METHODS:
        raise GQAError(f"Unknown grouping {name!r}; choose one of {', '.join(sorted(GROUPING_METHODS))}.")
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


# -- similarity grouping ------------------------------------------------------------------------------------
MAX_EXHAUSTIVE_PARTITIONS = 20000


def _rv(a: torch.Tensor, b: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """RV coefficient of two heads' activations (`[n, D+1]` augmented weights): 1 when one is an orthogonal
    (or scaled) image of the other, whatever their basis."""
    cross = a @ sigma @ b.T
    return (cross**2).sum() / ((a @ sigma @ a.T).norm() * (b @ sigma @ b.T).norm()).clamp(min=1e-30)


def _rotary_coherence(a: torch.Tensor, b: torch.Tensor, sigma: torch.Tensor, pa, pb) -> torch.Tensor:
    """How well one key head is a per-pair rotation-and-scale of the other (1 = exactly), energy-weighted."""
    sig = sigma.to(torch.complex128)
    ca, cb = torch.complex(a[pa], a[pb]), torch.complex(b[pa], b[pb])
    cross = torch.einsum("pd,de,pe->p", ca.conj(), sig, cb).abs()
    ea = torch.einsum("pd,de,pe->p", ca.conj(), sig, ca).real
    eb = torch.einsum("pd,de,pe->p", cb.conj(), sig, cb).real
    energy = (ea * eb).sqrt()
    return cross.sum() / energy.sum().clamp(min=1e-30)


def head_similarity(weights: AttentionWeights, stats: object) -> torch.Tensor:
    """`[K, K]` similarity of KV heads from calibration statistics: how mergeable their keys and values are
    under the maps the activation-aware merges may fold (rotation and scale per rotary pair, any linear map
    elsewhere)."""
    from .merging import augment, calibration_sigma

    sigma = calibration_sigma(stats, "similarity grouping").to(weights.k.device)
    keys, values = augment(weights.k, weights.k_bias), augment(weights.v, weights.v_bias)
    units = weights.num_kv_heads
    rot = weights.rotary.rotary_dim if weights.rotary is not None else 0
    if rot:
        pa, pb = weights.rotary.pairs()
    sim = torch.zeros(units, units, dtype=torch.float64)
    for u in range(units):
        for w in range(u, units):
            s = _rv(values[u], values[w], sigma)
            if rot:
                s = s + _rotary_coherence(keys[u], keys[w], sigma, pa, pb)
                if rot < weights.head_dim:
                    s = s + _rv(keys[u, rot:], keys[w, rot:], sigma)
            else:
                s = s + _rv(keys[u], keys[w], sigma)
            sim[u, w] = sim[w, u] = s
    return sim


def _balanced_partitions(items: list[int], size: int):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        remaining = [i for i in rest if i not in others]
        for tail in _balanced_partitions(remaining, size):
            yield [[first, *others], *tail]


def _partition_count(units: int, size: int) -> int:
    groups = units // size
    return math.factorial(units) // (math.factorial(size) ** groups * math.factorial(groups))


def _score(partition: list[list[int]], sim: torch.Tensor) -> float:
    return float(sum(sim[u, w] for g in partition for i, u in enumerate(g) for w in g[i + 1 :]))


def _greedy_partition(sim: torch.Tensor, size: int) -> list[list[int]]:
    left = list(range(sim.shape[0]))
    partition = []
    while left:
        sub = sim[left][:, left].clone()
        sub.fill_diagonal_(-math.inf)
        flat = int(sub.argmax())
        group = [left[flat // len(left)], left[flat % len(left)]][: max(size, 1)]
        while len(group) < size:
            candidates = [u for u in left if u not in group]
            group.append(max(candidates, key=lambda u: float(sum(sim[u, w] for w in group))))
        partition.append(sorted(group))
        left = [u for u in left if u not in group]
    return partition


def similarity_groups(weights: AttentionWeights, groups: int, stats: object | None = None) -> list[list[int]]:
    """Balanced clustering of KV heads by calibration statistics: the partition into `groups` equal groups with
    the largest within-group similarity (`head_similarity`); exhaustive where there are at most
    `MAX_EXHAUSTIVE_PARTITIONS` partitions, greedy beyond. Groups are ordered by their smallest head index."""
    units = weights.num_kv_heads
    size = units // groups
    if size == 1 or groups == 1:
        return consecutive_groups(weights, groups)
    sim = head_similarity(weights, stats)
    if _partition_count(units, size) <= MAX_EXHAUSTIVE_PARTITIONS:
        best = max(_balanced_partitions(list(range(units)), size), key=lambda p: _score(p, sim))
    else:
        best = _greedy_partition(sim, size)
    return sorted((sorted(g) for g in best), key=lambda g: g[0])


register_grouping("similarity", similarity_groups, needs_calibration=True)
