"""The GQA KV cache and its memory accounting, float or quantized.

`GQACache` is a `DynamicCache` (so greedy, sampling, beam-search reorder, crop and left-padded batches work as
they do in transformers) that stores whatever K/V heads each layer hands it: after `patch`, only the grouped
heads, `[batch, kv_heads_of_layer, seq, head_dim]`, with a head count that may differ per layer. It reports its
memory in bytes. `install_cache` makes `generate()` create one when the caller passes no cache.

`GQAQuantizedCache` is transformers' `QuantizedCache` (KIVI-style: keys and values quantized group-wise by the
quanto or HQQ backend, or per tensor to FP8, with the most recent `residual_length` tokens kept in float) with the
same accounting. `generate(..., cache_implementation="quantized", cache_config={"backend": "hqq", "nbits": 4})` on
a patched model builds one: its layers hold the grouped heads only, so GQA and KV quantization multiply.
`KVQuantization` describes such a cache's storage and gives its exact byte count per tensor and per token, as the
backends store it (packed integer codes plus one scale and one zero-point per group, in the cache's dtype).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, QuantizedCache

from . import compat

#: The bit widths each backend of transformers' `QuantizedCache` accepts (transformers 5.23 / 5.24).
BACKEND_NBITS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8), "fp8": (8,)}


@dataclass(frozen=True)
class KVQuantization:
    """How a quantized KV cache stores keys and values: the options of transformers' `QuantizedCache`, with its
    defaults (`generate(cache_implementation="quantized", cache_config=...)` takes the same names).

    Storage, per quantized tensor of `n` elements in groups of `q_group_size` (measured on optimum-quanto 0.2.7
    and hqq 0.2.8; `tensor_nbytes` is the exact count, checked in the tests against a generated cache):

    - `quanto` (nbits 2 or 4): `n / q_group_size` groups, the codes packed `8 // nbits` to a byte along the
      group index (`ceil(groups / (8 // nbits)) * q_group_size` bytes), and a scale and a shift per group in the
      cache's dtype. With `axis=0` a group is `q_group_size` consecutive values of one token's head vector.
    - `hqq` (nbits 1, 2, 3, 4 or 8): the tensor viewed as `[q_group_size, n / q_group_size]` (`axis=0`: each
      group is a column, strided through the tensor) or `[n / q_group_size, q_group_size]` (`axis=1`), codes
      packed along the first dimension (8 / nbits to a byte; 3 bits as 10 codes per int32), a scale and a
      zero-point per group in the cache's dtype.
    - `fp8`: one byte per value (float8_e4m3fn) and one float32 scale per tensor; no residual window.

    The `residual_length` most recent tokens (at most) are held unquantized until they are flushed.
    """

    backend: str = "quanto"
    nbits: int = 4
    q_group_size: int = 64
    residual_length: int = 128
    axis_key: int = 0
    axis_value: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_NBITS:
            raise ValueError(
                f"unknown KV quantization backend {self.backend!r}; one of {list(BACKEND_NBITS)}"
            )
        if self.nbits not in BACKEND_NBITS[self.backend]:
            raise ValueError(
                f"backend {self.backend!r} stores {BACKEND_NBITS[self.backend]} bits, not nbits={self.nbits}"
            )

    @classmethod
    def from_config(cls, cache_config: dict | KVQuantization | None) -> KVQuantization | None:
        """From `generate()`'s `cache_config` dict (None stays None): the unset options take transformers'
        defaults (backend "quanto", nbits 4, groups of 64, residual 128, axis 0; "fp8" is 8 bits, per tensor)."""
        if cache_config is None or isinstance(cache_config, KVQuantization):
            return cache_config
        options = {k: v for k, v in dict(cache_config).items() if k != "config" and v is not None}
        if options.get("backend", "quanto") == "fp8":
            options.setdefault("nbits", 8)
            options.setdefault("residual_length", 0)
        return cls(**options)

    @classmethod
    def from_cache(cls, cache: Cache) -> KVQuantization | None:
        """The storage of a `QuantizedCache` (None for a cache that holds no quantized layer)."""
        for layer in cache.layers:
            name = type(layer).__name__
            if name == "Fp8QuantizedLayer":
                return cls(backend="fp8", nbits=8, residual_length=0)
            if name in ("QuantoQuantizedLayer", "HQQQuantizedLayer"):
                return cls(
                    backend="quanto" if name.startswith("Quanto") else "hqq",
                    nbits=layer.nbits,
                    q_group_size=layer.q_group_size,
                    residual_length=layer.residual_length,
                    axis_key=layer.axis_key,
                    axis_value=layer.axis_value,
                )
        return None

    def cache_config(self) -> dict:
        """The `cache_config` for `generate(cache_implementation="quantized", cache_config=...)`."""
        if self.backend == "fp8":
            return {"backend": "fp8"}
        return asdict(self)

    def label(self) -> str:
        if self.backend == "fp8":
            return "fp8 (fp8)"
        return f"int{self.nbits} ({self.backend}, groups of {self.q_group_size})"

    # -- bytes ---------------------------------------------------------------------------------------------------
    def _code_bytes(self, rows: int, cols: int) -> int:
        """Bytes of `[rows, cols]` integer codes packed along the rows, as the backend packs them."""
        if self.backend == "quanto":
            return math.ceil(rows / (8 // self.nbits)) * cols
        if self.nbits == 3:  # hqq: 10 codes per int32
            return math.ceil(rows / 10) * 4 * cols
        return rows * self.nbits // 8 * cols

    def tensor_nbytes(self, numel: int, dtype: torch.dtype, axis: int = 0) -> int:
        """Exact bytes the backend holds for one quantized tensor of `numel` values cached in `dtype` (codes,
        scales and zero-points; `axis` is the backend's `axis_key` or `axis_value`)."""
        if self.backend == "fp8":
            return numel + 4
        if numel % self.q_group_size:
            raise ValueError(f"{numel} values do not split into groups of {self.q_group_size}")
        groups = numel // self.q_group_size
        # quanto axis 0 and hqq axis 1 pack [groups, group_size] along the groups; the others the transpose
        along_groups = (axis == 0) if self.backend == "quanto" else (axis == 1)
        rows, cols = (groups, self.q_group_size) if along_groups else (self.q_group_size, groups)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self._code_bytes(rows, cols) + 2 * groups * itemsize

    def bytes_per_value(self, dtype: torch.dtype, axis: int = 0) -> float:
        """Bytes per cached value over a long sequence: the packed code plus its share of the group's scale and
        zero-point (fp8: one byte; its per-tensor scale does not grow with the sequence)."""
        if self.backend == "fp8":
            return 1.0
        g = self.q_group_size
        itemsize = torch.empty((), dtype=dtype).element_size()
        along_groups = (axis == 0) if self.backend == "quanto" else (axis == 1)
        if self.backend == "hqq" and self.nbits == 3 and not along_groups:
            code = math.ceil(g / 10) * 4 / g  # each group of g codes is packed on its own
        elif self.backend == "hqq" and self.nbits == 3:
            code = 0.4  # 10 codes per int32 along the groups
        else:
            code = self.nbits / 8
        return code + 2 * itemsize / g

    def layer_nbytes(
        self, batch: int, kv_heads: int, head_dim: int, quantized: int, residual: int, dtype: torch.dtype
    ) -> int:
        """Exact bytes of one layer's keys and values: `quantized` tokens held quantized, `residual` in float."""
        numel = batch * kv_heads * head_dim
        itemsize = torch.empty((), dtype=dtype).element_size()
        total = 2 * residual * numel * itemsize
        if quantized:
            total += self.tensor_nbytes(quantized * numel, dtype, self.axis_key)
            total += self.tensor_nbytes(quantized * numel, dtype, self.axis_value)
        return total


def kv_bytes_per_token(
    kv_heads: list[int],
    head_dim: int | list[int],
    dtype: torch.dtype,
    quantization: KVQuantization | dict | None = None,
) -> list[int] | list[float]:
    """Bytes of K plus V that one token takes in each layer: `2 * kv_heads * head_dim * itemsize` in float, or,
    with a quantized cache, `kv_heads * head_dim * (bytes per key + bytes per value)` (packed codes plus the
    group's scale and zero-point, see `KVQuantization`; tokens in the residual window are not counted)."""
    dims = head_dim if isinstance(head_dim, list) else [head_dim] * len(kv_heads)
    quantization = KVQuantization.from_config(quantization)
    if quantization is None:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return [2 * h * d * itemsize for h, d in zip(kv_heads, dims)]
    per_value = quantization.bytes_per_value(dtype, quantization.axis_key) + quantization.bytes_per_value(
        dtype, quantization.axis_value
    )
    return [h * d * per_value for h, d in zip(kv_heads, dims)]


# -- what a cache holds ----------------------------------------------------------------------------------------
def held_nbytes(obj) -> int:
    """Bytes of the tensors in `obj` (a tensor, a quantized tensor subclass, or tuples / lists / dicts of them),
    counted through tensor subclasses (a quanto `QBitsTensor` holds packed codes, scales and shifts) to the plain
    tensors that really hold memory."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(held_nbytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(held_nbytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(held_nbytes(x) for x in obj.values())
    return 0


def _quantized_shape(q) -> tuple[int, ...] | None:
    """Logical shape `[batch, kv_heads, seq, head_dim]` of a backend's quantized tensor (None if none)."""
    if q is None:
        return None
    if isinstance(q, tuple):  # hqq: (codes, meta); fp8: (codes, scale)
        codes, meta = q
        return tuple(meta["shape"]) if isinstance(meta, dict) else tuple(codes.shape)
    return tuple(q.shape)  # quanto: a tensor subclass of the original shape


def _float_part(layer, name: str) -> torch.Tensor | None:
    t = getattr(layer, name, None)
    return t if isinstance(t, torch.Tensor) and t.dim() == 4 and t.numel() else None


def layer_parts(layer) -> dict[str, tuple[int, ...] | None]:
    """Shapes `[batch, kv_heads, seq, head_dim]` of what one cache layer holds: `"quantized"` keys (None for a
    float layer or before the first write) and `"residual"` float keys (None when empty)."""
    residual = _float_part(layer, "keys")
    return {
        "quantized": _quantized_shape(getattr(layer, "_quantized_keys", None)),
        "residual": tuple(residual.shape) if residual is not None else None,
    }


def layer_shape(layer) -> tuple[int, ...] | None:
    """Shape `[batch, kv_heads, seq, head_dim]` of all keys a layer holds, quantized and float (None if empty)."""
    parts = layer_parts(layer)
    base = parts["quantized"] or parts["residual"]
    if base is None:
        return None
    seq = getattr(layer, "cumulative_length", None) if parts["quantized"] else None
    return (*base[:2], seq if seq is not None else base[2], base[3])


def layer_nbytes(layer) -> int:
    """Bytes of keys and values one cache layer holds: float tensors and the backend's quantized tensors."""
    return held_nbytes(
        [getattr(layer, name, None) for name in ("keys", "values", "_quantized_keys", "_quantized_values")]
    )


def cache_layer_nbytes(cache: Cache) -> list[int]:
    """Bytes of keys plus values held per layer by any transformers cache (float or quantized)."""
    return [layer_nbytes(layer) for layer in cache.layers]


def cache_nbytes(cache: Cache) -> int:
    """Total bytes of keys and values held by any transformers cache (float or quantized)."""
    return sum(cache_layer_nbytes(cache))


class _Accounting:
    """Per-layer shapes and bytes of a transformers cache (mixed into `GQACache` and `GQAQuantizedCache`)."""

    def layer_shapes(self) -> list[tuple[int, ...] | None]:
        """Shape `[batch, kv_heads, seq, head_dim]` of each layer's keys, quantized and float together (None
        for a layer not yet written)."""
        return [layer_shape(layer) for layer in self.layers]

    def kv_heads(self) -> list[int]:
        """KV heads held per layer (0 for a layer not yet written)."""
        return [s[1] if s else 0 for s in self.layer_shapes()]

    def layer_nbytes(self) -> list[int]:
        """Bytes of keys plus values held per layer (quantized codes, scales and zero-points included)."""
        return cache_layer_nbytes(self)

    def nbytes(self) -> int:
        """Total bytes of keys and values held."""
        return sum(self.layer_nbytes())


class GQACache(_Accounting, DynamicCache):
    """A dynamic cache for grouped-query attention with per-layer memory accounting."""


class GQAQuantizedCache(_Accounting, QuantizedCache):
    """transformers' `QuantizedCache` with per-layer memory accounting: `GQAQuantizedCache(backend, config,
    nbits=..., q_group_size=..., residual_length=...)`. Each layer quantizes the K/V heads it is handed, so on a
    patched model it holds the grouped heads (a count that may differ per layer)."""

    def quantization(self) -> KVQuantization | None:
        return KVQuantization.from_cache(self)


#: The cache classes `generate()` makes and the accounting class that replaces each.
_ACCOUNTING_CLASSES = {DynamicCache: GQACache, QuantizedCache: GQAQuantizedCache}


def with_accounting(cache: Cache) -> Cache:
    """The same cache (layers, options, offloading) as a `GQACache` / `GQAQuantizedCache`; other caches as is."""
    cls = _ACCOUNTING_CLASSES.get(type(cache))
    if cls is None:
        return cache
    upgraded = cls.__new__(cls)
    upgraded.__dict__.update(cache.__dict__)
    return upgraded


class GQACacheHook:
    """`generate()`'s cache preparation for one model: transformers prepares the cache the caller asked for
    (`cache_implementation`, `cache_config`), and a `DynamicCache` or `QuantizedCache` it made is handed on as a
    `GQACache` / `GQAQuantizedCache` (the same layers and options, plus the accounting). A cache passed by the
    caller, and every other cache implementation, is left as it is.

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
        if cache is not None and not getattr(cache, "_is_user_defined", False):
            model_kwargs[compat.CACHE_KWARG] = with_accounting(cache)
        return result


def install_cache(model: PreTrainedModel) -> None:
    """Make `model.generate()` hand out its caches with GQA accounting (`GQACache` unless the caller passes a cache
    or asks for another implementation; `GQAQuantizedCache` for `cache_implementation="quantized"`)."""
    model._prepare_cache_for_generation = GQACacheHook(model)


def quantized_cache(model: PreTrainedModel, cache_config: dict | KVQuantization) -> GQAQuantizedCache:
    """A new `GQAQuantizedCache` for `model` (to pass as `cache=` to a forward or to `generate()`)."""
    options = KVQuantization.from_config(cache_config).cache_config()
    backend = options.pop("backend")
    return GQAQuantizedCache(backend=backend, config=model.config.get_text_config(decoder=True), **options)


__all__: Sequence[str] = [
    "BACKEND_NBITS",
    "GQACache",
    "GQACacheHook",
    "GQAQuantizedCache",
    "KVQuantization",
    "cache_layer_nbytes",
    "cache_nbytes",
    "held_nbytes",
    "install_cache",
    "kv_bytes_per_token",
    "quantized_cache",
    "with_accounting",
]
