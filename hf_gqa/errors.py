"""Errors raised by hf_gqa. Every one is raised before any weight is touched."""

from __future__ import annotations


class GQAError(ValueError):
    """Base class of every error hf_gqa raises on bad input."""


class GroupsError(GQAError):
    """`groups` is not a valid number of key/value heads for this model."""


class UnsupportedArchitectureError(GQAError):
    """The model's attention is not one hf_gqa knows how to convert."""


class UnconvertibleWeightsError(GQAError):
    """The attention weights cannot be converted (quantized, on the meta device, ...)."""
