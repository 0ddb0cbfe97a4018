"""Tiny random models of every supported family, built from configs in code, with an independent reference.

Each module in this package defines `CASES: list[FamilyCase]`; `all_cases()` collects them. A case knows how to
build its family's tiny model and how to compute the mean-pooling reference *in the family's own layout*,
without hf_gqa: the original model with each K/V head replaced by the mean of its group (repeated to every head
of the group), which computes exactly what the GQA model with `groups` KV heads computes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel


@dataclass
class FamilyCase:
    """One family's tiny test model.

    Attributes:
        name: test id.
        make: builds the tiny fp32 model in eval mode, deterministically (seeded inside).
        mean_reference: `(model, groups) -> None`: overwrite, in place and in the family's own layout, every K/V
            head of `model` with the mean of its group of `kv_heads // groups` consecutive heads.
        groups: reductions to test (each divides the KV head count).
        native_gqa: converted checkpoints load with plain transformers.
        kv_heads: KV heads per layer of the model `make` returns.
        num_heads: query heads per layer.
    """

    name: str
    make: Callable[[], PreTrainedModel]
    mean_reference: Callable[[PreTrainedModel, int], None]
    groups: list[int]
    kv_heads: int
    num_heads: int
    native_gqa: bool = False
    extra: dict = field(default_factory=dict)


def group_mean_heads(weight: torch.Tensor, heads: int, groups: int, dim: int = 0) -> torch.Tensor:
    """Replace each of `heads` equal slices of `weight` along `dim` by the mean of its group, repeated.

    For a `[heads * d, ...]` weight (or `[heads * d]` bias) with `dim=0`.
    """
    w = weight.movedim(dim, 0)
    shape = w.shape
    per = w.reshape(groups, heads // groups, shape[0] // heads, *shape[1:])
    mean = per.mean(dim=1, keepdim=True).expand_as(per)
    return mean.reshape(shape).movedim(0, dim).contiguous()


def all_cases() -> list[FamilyCase]:
    cases: list[FamilyCase] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        cases.extend(getattr(module, "CASES", []))
    return cases


TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, max_position_embeddings=256)
