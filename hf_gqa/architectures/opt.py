"""OPT (`OPTAttention`): multi-head only in transformers, so conversion installs `OPTGQAAttention`.

OPT has separate `q_proj`, `k_proj`, `v_proj` and `out_proj` linears (with biases when `enable_bias`).
`OPTGQAAttention` keeps those names (so that PEFT `target_modules` written for OPT still apply) with
`k_proj`/`v_proj` of `K * head_dim` outputs, head `j` at rows `j * head_dim:(j + 1) * head_dim`. Query head `h`
attends with key/value head `h // (H // K)`; the cache stores only the `K` heads. As in OPT, the queries are
scaled by `head_dim ** -0.5` before attention, which then runs with `scaling=1.0`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.opt.modeling_opt import OPTAttention, eager_attention_forward

from .. import compat
from ..canonical import (
    AttentionWeights,
)
from .base import AttentionAdapter, shallow_clone
from .shared import read_separate_projections, set_separate_projections, with_repeated_kv

eager_gqa_attention_forward = with_repeated_kv(eager_attention_forward)
#: OPT's projections: query, key, value, output.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class OPTGQAAttention(OPTAttention):
    """OPT self-attention with `num_key_value_heads` key/value heads (grouped-query attention).

    `q_proj`: `[H * d, hidden]`, `k_proj`/`v_proj`: `[K * d, hidden]`, `out_proj`: `[hidden, H * d]` (`nn.Linear`
    weights). Everything else (query scaling, dropout, attention dispatch) is OPT's.
    """

    def __init__(
        self, config, layer_idx: int | None = None, num_key_value_heads: int | None = None, **kwargs
    ):
        super().__init__(config, layer_idx=layer_idx, **kwargs)
        self.num_key_value_heads = num_key_value_heads or self.num_heads
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_heads={self.num_heads}."
            )
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        kv_size = self.num_key_value_heads * self.head_dim
        self.k_proj = nn.Linear(self.embed_dim, kv_size, bias=self.enable_bias)
        self.v_proj = nn.Linear(self.embed_dim, kv_size, bias=self.enable_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states [b, s, hidden]` -> `(output [b, s, hidden], attention weights [b, H, s, k] or None)`.

        The cache (`cache=` or `past_key_values=`, as the transformers release names it) receives keys and values
        `[b, K, s, d]`.
        """
        cache = compat.pop_cache(kwargs)
        bsz, tgt_len, _ = hidden_states.size()

        # As in OPT: scale the queries here, attend with scaling 1.0.
        query_states = self.q_proj(hidden_states) * self.scaling
        query_states = query_states.view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)

        key_states = self.k_proj(hidden_states)
        value_states = self.v_proj(hidden_states)
        key_states = key_states.view(bsz, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value_states = value_states.view(bsz, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)

        if cache is not None:
            key_states, value_states = compat.update_cache(
                cache, key_states, value_states, self.layer_idx, kwargs
            )

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_gqa_attention_forward
        )

        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=1.0,
            **kwargs,
        )

        attn_output = attn_output.reshape(bsz, tgt_len, -1).contiguous()
        attn_output = self.out_proj(attn_output)
        return attn_output, attn_weights


class OPTAdapter(AttentionAdapter):
    """Converts `OPTAttention` (and `OPTGQAAttention`, to go further down) to `OPTGQAAttention`."""

    family = "opt"
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    model_types = ("opt",)
    native_gqa = False
    attention_classes: ClassVar[tuple[type[nn.Module], ...]] = (OPTAttention,)

    def num_heads(self, module: nn.Module) -> int:
        return module.q_proj.out_features // module.head_dim

    def num_kv_heads(self, module: nn.Module) -> int:
        return module.k_proj.out_features // module.head_dim

    def head_dim(self, module: nn.Module) -> int:
        return module.head_dim

    def read(self, module: nn.Module) -> AttentionWeights:
        return read_separate_projections(
            module, PROJECTIONS, self.num_heads(module), self.num_kv_heads(module), rotary=None
        )

    def build(self, module: nn.Module, weights: AttentionWeights) -> nn.Module:
        new = shallow_clone(module, cls=OPTGQAAttention)
        set_separate_projections(new, module, PROJECTIONS, weights)
        new.num_key_value_heads = weights.num_kv_heads
        new.num_key_value_groups = weights.num_heads // weights.num_kv_heads
        return new


ADAPTERS = [OPTAdapter()]
