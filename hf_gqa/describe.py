"""`describe(model)`: per layer, query heads, KV heads, and KV-cache bytes per token before and after."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from .architectures import get_adapter
from .cache import kv_bytes_per_token
from .patch import META_KEY


@dataclass
class LayerDescription:
    layer: int
    name: str
    num_heads: int
    kv_heads_before: int
    kv_heads_after: int
    bytes_per_token_before: int
    bytes_per_token_after: int


@dataclass
class Description:
    family: str
    dtype: str
    layers: list[LayerDescription]

    @property
    def bytes_per_token_before(self) -> int:
        return sum(layer.bytes_per_token_before for layer in self.layers)

    @property
    def bytes_per_token_after(self) -> int:
        return sum(layer.bytes_per_token_after for layer in self.layers)

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "dtype": self.dtype,
            "bytes_per_token_before": self.bytes_per_token_before,
            "bytes_per_token_after": self.bytes_per_token_after,
            "layers": [vars(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        rows = [
            f"{self.family} model, {self.dtype}: KV cache {self.bytes_per_token_before:,} -> "
            f"{self.bytes_per_token_after:,} bytes per token "
            f"({self.bytes_per_token_after / max(self.bytes_per_token_before, 1):.1%})",
            f"{'layer':>5}  {'q heads':>7}  {'KV heads':>10}  {'KV bytes/token':>16}",
        ]
        for layer in self.layers:
            rows.append(
                f"{layer.layer:>5}  {layer.num_heads:>7}  {layer.kv_heads_before:>4} -> {layer.kv_heads_after:<3}"
                f"  {layer.bytes_per_token_before:>6} -> {layer.bytes_per_token_after:<6}"
            )
        return "\n".join(rows)


def describe(model: PreTrainedModel) -> Description:
    """What conversion changed (or, for an unpatched model, what it has now) per attention layer."""
    adapter = get_adapter(model)
    meta = getattr(model.config.get_text_config(decoder=True), META_KEY, None) or {}
    modules = adapter.attention_modules(model)
    dtype = next(model.parameters()).dtype
    layers = []
    for i, (name, module) in enumerate(modules):
        d = adapter.head_dim(module)
        after = adapter.num_kv_heads(module)
        before = meta["original_kv_heads"][i] if meta else after
        b_before, b_after = kv_bytes_per_token([before, after], d, dtype)
        layers.append(LayerDescription(i, name, adapter.num_heads(module), before, after, b_before, b_after))
    return Description(adapter.family, str(dtype).replace("torch.", ""), layers)
