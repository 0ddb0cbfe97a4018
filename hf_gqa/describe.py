"""`describe(model)`: per layer, query heads, KV heads, and KV-cache bytes per token before and after.

With `cache_config` (the dict `generate(cache_implementation="quantized", cache_config=...)` takes), also the bytes
per token of that quantized cache: GQA and KV quantization multiply.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from .architectures import get_adapter
from .cache import KVQuantization, kv_bytes_per_token
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
    #: Bytes per token of the KV heads after, in the quantized cache of `describe(..., cache_config=...)`.
    bytes_per_token_quantized: float | None = None


@dataclass
class Description:
    family: str
    dtype: str
    layers: list[LayerDescription]
    #: The quantized cache the `bytes_per_token_quantized` figures are for (None: float cache only).
    quantization: KVQuantization | None = None

    @property
    def bytes_per_token_before(self) -> int:
        return sum(layer.bytes_per_token_before for layer in self.layers)

    @property
    def bytes_per_token_after(self) -> int:
        return sum(layer.bytes_per_token_after for layer in self.layers)

    @property
    def bytes_per_token_quantized(self) -> float | None:
        """KV bytes per token of the model as it is now in the quantized cache (None without one)."""
        if self.quantization is None:
            return None
        return sum(layer.bytes_per_token_quantized for layer in self.layers)

    def to_dict(self) -> dict:
        out = {
            "family": self.family,
            "dtype": self.dtype,
            "bytes_per_token_before": self.bytes_per_token_before,
            "bytes_per_token_after": self.bytes_per_token_after,
            "layers": [vars(layer) for layer in self.layers],
        }
        if self.quantization is not None:
            out["quantization"] = self.quantization.cache_config()
            out["bytes_per_token_quantized"] = self.bytes_per_token_quantized
        return out

    def __str__(self) -> str:
        before = max(self.bytes_per_token_before, 1)
        rows = [
            f"{self.family} model, {self.dtype}: KV cache {self.bytes_per_token_before:,} -> "
            f"{self.bytes_per_token_after:,} bytes per token ({self.bytes_per_token_after / before:.1%})"
        ]
        quantized = self.quantization is not None
        if quantized:
            q = self.bytes_per_token_quantized
            rows.append(
                f"with a {self.quantization.label()} KV cache: {q:,.0f} bytes per token "
                f"({q / before:.1%} of the original's float cache, {before / q:.1f}x less; the at most "
                f"{self.quantization.residual_length} most recent tokens it keeps in float not counted)"
            )
        rows.append(
            f"{'layer':>5}  {'q heads':>7}  {'KV heads':>10}  {'KV bytes/token':>16}"
            + (f"  {'quantized':>9}" if quantized else "")
        )
        for layer in self.layers:
            rows.append(
                f"{layer.layer:>5}  {layer.num_heads:>7}  {layer.kv_heads_before:>4} -> {layer.kv_heads_after:<3}"
                f"  {layer.bytes_per_token_before:>6} -> {layer.bytes_per_token_after:<6}"
                + (f"  {layer.bytes_per_token_quantized:>9,.1f}" if quantized else "")
            )
        return "\n".join(rows)


def describe(model: PreTrainedModel, cache_config: dict | KVQuantization | None = None) -> Description:
    """What conversion changed (or, for an unpatched model, what it has now) per attention layer.

    Args:
        cache_config: a quantized KV cache, as `generate(cache_implementation="quantized", cache_config=...)`
            takes it (`{"backend": "quanto" | "hqq" | "fp8", "nbits": ..., "q_group_size": ...}`): each layer's
            bytes per token in that cache are added (`bytes_per_token_quantized`; see `hf_gqa.cache.KVQuantization`
            for how each backend stores a value).
    """
    adapter = get_adapter(model)
    quantization = KVQuantization.from_config(cache_config)
    meta = getattr(model.config.get_text_config(decoder=True), META_KEY, None) or {}
    modules = adapter.attention_modules(model)
    dtype = next(model.parameters()).dtype
    layers = []
    for i, (name, module) in enumerate(modules):
        d = adapter.head_dim(module)
        after = adapter.num_kv_heads(module)
        before = meta["original_kv_heads"][i] if meta else after
        b_before, b_after = kv_bytes_per_token([before, after], d, dtype)
        layer = LayerDescription(i, name, adapter.num_heads(module), before, after, b_before, b_after)
        if quantization is not None:
            layer.bytes_per_token_quantized = kv_bytes_per_token([after], d, dtype, quantization)[0]
        layers.append(layer)
    return Description(adapter.family, str(dtype).replace("torch.", ""), layers, quantization)
