"""Pieces several families' GQA modules share: the attention implementations our own modules accept, eager
attention on grouped K/V, and the conversion of boolean masks to additive ones."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.integrations.sdpa_attention import repeat_kv

from ..attention import ATTN_IMPLEMENTATION

#: Attention implementations that run through SDPA in the modules of families with their own attention code.
SDPA_IMPLEMENTATIONS = ("sdpa", ATTN_IMPLEMENTATION)
#: What those modules support (None: a module built outside a model).
SUPPORTED_IMPLEMENTATIONS = (None, "eager", *SDPA_IMPLEMENTATIONS)

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


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
