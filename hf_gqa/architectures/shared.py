"""Pieces several families share: the grouped fused QKV layout, partial rotary specs, the attention
implementations our own modules accept, eager attention on grouped K/V, and boolean masks made additive."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv

from ..attention import ATTN_IMPLEMENTATION
from ..canonical import (
    AttentionWeights,
    RotarySpec,
    join_bias,
    join_heads,
    join_out_heads,
    split_bias,
    split_heads,
    split_out_heads,
)
from ..errors import UnsupportedArchitectureError

#: Attention implementations that run through SDPA in the modules of families with their own attention code.
SDPA_IMPLEMENTATIONS = ("sdpa", ATTN_IMPLEMENTATION)
#: What those modules support (None: a module built outside a model).
SUPPORTED_IMPLEMENTATIONS = (None, "eager", *SDPA_IMPLEMENTATIONS)

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def attention_classes_of(*paths: str) -> tuple[type[nn.Module], ...]:
    """Import attention classes by `module:Class` path, skipping those this transformers version lacks."""
    classes = []
    for path in paths:
        mod, _, name = path.partition(":")
        try:
            classes.append(getattr(importlib.import_module(f"transformers.models.{mod}"), name))
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


# -- separate q/k/v/o projections (Llama-style, Phi, OPT, GPT-J) -----------------------------------------------------
def read_separate_projections(
    module: nn.Module,
    names: tuple[str, str, str, str],
    heads: int,
    kv_heads: int,
    rotary: RotarySpec | None,
    extras: dict | None = None,
) -> AttentionWeights:
    """Canonical weights of a module with separate `nn.Linear` projections named `names` (q, k, v, output):
    `q` `[H * d, D]`, `k` / `v` `[K * d, D]`, output `[D, H * d]`, optional biases."""
    q, k, v, o = (getattr(module, name) for name in names)
    return AttentionWeights(
        q=split_heads(q.weight, heads),
        k=split_heads(k.weight, kv_heads),
        v=split_heads(v.weight, kv_heads),
        o=split_out_heads(o.weight, heads),
        q_bias=split_bias(q.bias, heads),
        k_bias=split_bias(k.bias, kv_heads),
        v_bias=split_bias(v.bias, kv_heads),
        o_bias=o.bias,
        rotary=rotary,
        extras=extras or {},
    )


def set_separate_projections(
    new: nn.Module, module: nn.Module, names: tuple[str, str, str, str], weights: AttentionWeights
) -> None:
    """Give `new` (a clone of `module`) projections named `names` holding `weights`, each like its counterpart
    in `module` (device, dtype, trainability)."""
    from .base import new_linear

    blocks = (
        (join_heads(weights.q), join_bias(weights.q_bias)),
        (join_heads(weights.k), join_bias(weights.k_bias)),
        (join_heads(weights.v), join_bias(weights.v_bias)),
        (join_out_heads(weights.o), weights.o_bias),
    )
    for name, (weight, bias) in zip(names, blocks):
        setattr(new, name, new_linear(weight, bias, like=getattr(module, name)))


def check_own_attention(model: PreTrainedModel, family: str, hint: str) -> None:
    """Refuse an attention implementation our own modules of `family` do not run (flash attention, flex, ...)."""
    implementation = model.config._attn_implementation
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise UnsupportedArchitectureError(
            f"hf_gqa converts {family} models running eager or SDPA attention, not {implementation!r}; {hint}"
        )


def partial_rotary(module: nn.Module) -> RotarySpec:
    """The rotate-half rotary spec of a module whose config may set `rope_parameters["partial_rotary_factor"]`."""
    factor = (getattr(module.config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return RotarySpec(rotary_dim=int(module.head_dim * factor), interleaved=False)


def uses_sdpa(config: PretrainedConfig, output_attentions: bool | None) -> bool:
    """Whether attention runs through SDPA: an SDPA implementation is configured and no weights are requested."""
    return config._attn_implementation in SDPA_IMPLEMENTATIONS and not output_attentions


def additive_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An eager (additive) mask: a boolean mask `[b, 1, q, k]` (True = attend, as SDPA masks are) becomes 0 where
    attended and the minimum of `dtype` elsewhere; float masks and `None` are returned unchanged."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return attention_mask
    zero = torch.zeros((), device=attention_mask.device, dtype=dtype)
    return torch.where(attention_mask, zero, torch.finfo(dtype).min)


def with_repeated_kv(eager_attention_forward: AttentionFn) -> AttentionFn:
    """A family's eager attention function (written for as many K/V heads as query heads) on grouped K/V.

    The returned function takes `query [b, H, q, d]` and `key`/`value` `[b, K, k, d]`, repeats K/V to the `H`
    query heads (`module.num_key_value_groups` times each) and then computes exactly the family's arithmetic;
    it returns what the family's function returns, `([b, q, H, d], weights [b, H, q, k])`.
    """

    def forward(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = repeat_kv(key, module.num_key_value_groups)
        value = repeat_kv(value, module.num_key_value_groups)
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    forward.__name__ = f"gqa_{getattr(eager_attention_forward, '__name__', 'eager')}"
    forward.__doc__ = with_repeated_kv.__doc__
    return forward


# -- the grouped fused QKV layout (Falcon, Bloom, GPT-NeoX) -------------------------------------------------------
# One fused `query_key_value` linear whose output rows are grouped per key/value head: `[K, H // K + 2, d]`, i.e. for
# each of the `K` groups its `H // K` query heads, then its key head, then its value head (Megatron-LM's GQA layout;
# with `K == H` the per-head `[q_h, k_h, v_h]` interleaving of GPT-NeoX and Bloom).


def read_grouped_fused(
    module: nn.Module, heads: int, kv_heads: int, rotary: RotarySpec | None
) -> AttentionWeights:
    """Canonical weights of a module with a grouped fused `query_key_value` and a `dense` output (Falcon, Bloom,
    GPT-NeoX)."""
    qkv = module.query_key_value
    q, k, v, q_bias, k_bias, v_bias = split_grouped_qkv(qkv.weight, qkv.bias, heads, kv_heads)
    return AttentionWeights(
        q=q,
        k=k,
        v=v,
        o=split_out_heads(module.dense.weight, heads),
        q_bias=q_bias,
        k_bias=k_bias,
        v_bias=v_bias,
        o_bias=module.dense.bias,
        rotary=rotary,
    )


def split_grouped_qkv(
    weight: torch.Tensor, bias: torch.Tensor | None, heads: int, kv_heads: int
) -> tuple[torch.Tensor, ...]:
    """Fused `[K * (H // K + 2) * d, D]` weight (and `[K * (H // K + 2) * d]` bias) in the grouped layout ->
    `(q [H, d, D], k [K, d, D], v [K, d, D], q_bias [H, d], k_bias [K, d], v_bias [K, d])` (biases None if absent).
    """
    per_group = heads // kv_heads
    hidden = weight.shape[1]
    w = weight.reshape(kv_heads, per_group + 2, -1, hidden)
    head_dim = w.shape[2]
    q, k, v = w[:, :per_group].reshape(heads, head_dim, hidden), w[:, per_group], w[:, per_group + 1]
    if bias is None:
        return q, k, v, None, None, None
    b = bias.reshape(kv_heads, per_group + 2, head_dim)
    return q, k, v, b[:, :per_group].reshape(heads, head_dim), b[:, per_group], b[:, per_group + 1]


def join_grouped_qkv(weights: AttentionWeights) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Canonical q, k, v (and biases) -> fused weight `[K * (H // K + 2) * d, D]` and bias in the grouped layout."""
    heads, kv_heads, head_dim, hidden = (
        weights.num_heads,
        weights.num_kv_heads,
        weights.head_dim,
        weights.hidden_size,
    )
    per_group = heads // kv_heads
    q = weights.q.reshape(kv_heads, per_group, head_dim, hidden)
    weight = torch.cat([q, weights.k[:, None], weights.v[:, None]], dim=1).reshape(-1, hidden)
    biases = (weights.q_bias, weights.k_bias, weights.v_bias)
    if all(b is None for b in biases):
        return weight, None
    q_bias, k_bias, v_bias = (
        torch.zeros(n, head_dim, dtype=weight.dtype, device=weight.device) if b is None else b
        for b, n in zip(biases, (heads, kv_heads, kv_heads))
    )
    bias = torch.cat([q_bias.reshape(kv_heads, per_group, head_dim), k_bias[:, None], v_bias[:, None]], dim=1)
    return weight, bias.reshape(-1)


def split_grouped_states(
    fused_qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected `fused_qkv [b, s, (H + 2K) * d]` -> `query [b, H, s, d]`, `key [b, K, s, d]`, `value [b, K, s, d]`."""
    batch, seq_len, _ = fused_qkv.shape
    per_group = heads // kv_heads
    qkv = fused_qkv.view(batch, seq_len, kv_heads, per_group + 2, head_dim)
    query = qkv[:, :, :, :per_group].reshape(batch, seq_len, heads, head_dim)
    key, value = qkv[:, :, :, per_group], qkv[:, :, :, per_group + 1]
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
