"""The GQA KV cache and its memory accounting.

`GQACache` is a `DynamicCache` (so greedy, sampling, beam-search reorder, crop and left-padded batches work as
they do in transformers) that stores whatever K/V heads each layer hands it: after `patch`, only the grouped
heads, `[batch, kv_heads_of_layer, seq, head_dim]`, with a head count that may differ per layer. It reports its
memory in bytes. `install_cache` makes `generate()` create one when the caller passes no cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from . import compat


class GQACache(DynamicCache):
    """A dynamic cache for grouped-query attention with per-layer memory accounting."""

    def layer_shapes(self) -> list[tuple[int, ...] | None]:
        """Shape `[batch, kv_heads, seq, head_dim]` of each layer's keys (None for a layer not yet written)."""
        shapes = []
        for layer in self.layers:
            keys = getattr(layer, "keys", None)
            shapes.append(tuple(keys.shape) if isinstance(keys, torch.Tensor) and keys.numel() else None)
        return shapes

    def kv_heads(self) -> list[int]:
        """KV heads held per layer (0 for a layer not yet written)."""
        return [s[1] if s else 0 for s in self.layer_shapes()]

    def layer_nbytes(self) -> list[int]:
        """Bytes of keys plus values held per layer."""
        total = []
        for layer in self.layers:
            n = 0
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    n += t.numel() * t.element_size()
            total.append(n)
        return total

    def nbytes(self) -> int:
        """Total bytes of keys and values held."""
        return sum(self.layer_nbytes())


def kv_bytes_per_token(kv_heads: list[int], head_dim: int | list[int], dtype: torch.dtype) -> list[int]:
    """Bytes of K plus V that one token takes in each layer: `2 * kv_heads * head_dim * itemsize`."""
    dims = head_dim if isinstance(head_dim, list) else [head_dim] * len(kv_heads)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return [2 * h * d * itemsize for h, d in zip(kv_heads, dims)]


class GQACacheHook:
    """`generate()`'s cache preparation for one model, with a `GQACache` wherever transformers would make a plain
    `DynamicCache` (so no cache passed by the caller, and no `cache_implementation` asked for).

    An object rather than a bound method, so that a patched model pickles (`torch.save(model)`) and deep-copies:
    it holds the model it serves and calls the model class's own `_prepare_cache_for_generation`.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    def __call__(self, generation_config, model_kwargs: dict, *args, **kwargs):
        model = self.model
        result = type(model)._prepare_cache_for_generation(
            model, generation_config, model_kwargs, *args, **kwargs
        )
        cache = compat.model_kwargs_cache(model_kwargs)
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs[compat.CACHE_KWARG] = GQACache(config=model.config.get_text_config(decoder=True))
        return result


def install_cache(model: PreTrainedModel) -> None:
    """Make `model.generate()` use a `GQACache` unless the caller passes a cache or a cache implementation."""
    model._prepare_cache_for_generation = GQACacheHook(model)
