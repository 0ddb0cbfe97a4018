"""Registry of architecture adapters: which adapter converts which model family."""

from __future__ import annotations

import importlib
import pkgutil

from transformers import PreTrainedModel

from ..errors import UnsupportedArchitectureError
from .base import AttentionAdapter


def _discover() -> list[AttentionAdapter]:
    """Every `ADAPTERS` list defined by a module of this package (one module per family)."""
    found: list[AttentionAdapter] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base":
            found.extend(getattr(importlib.import_module(f"{__name__}.{info.name}"), "ADAPTERS", []))
    return found


ADAPTERS: list[AttentionAdapter] = _discover()


def register_adapter(adapter: AttentionAdapter) -> None:
    """Add an adapter; later registrations win over earlier ones for the same model type."""
    ADAPTERS.insert(0, adapter)


def supported_model_types() -> list[str]:
    return sorted({t for a in ADAPTERS for t in a.model_types})


def get_adapter(model: PreTrainedModel) -> AttentionAdapter:
    """The adapter for `model`, or `UnsupportedArchitectureError` naming the supported families."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            adapter.check_model(model)
            return adapter
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise UnsupportedArchitectureError(
        f"hf_gqa cannot convert model type {model_type!r} ({type(model).__name__}). "
        f"Supported model types: {', '.join(supported_model_types())}. "
        "To add one, register an AttentionAdapter with hf_gqa.architectures.register_adapter."
    )


__all__ = ["ADAPTERS", "AttentionAdapter", "get_adapter", "register_adapter", "supported_model_types"]
