"""GPT-J (`GPTJAttention`): multi-head only in transformers, so conversion installs `GPTJGQAAttention`.

GPT-J has separate `q_proj`, `k_proj`, `v_proj` and `out_proj` linears without bias, and interleaved rotary
embeddings (pairs `(0, 1), (2, 3), ...`) on the first `rotary_dim` dimensions of each head. `GPTJGQAAttention`
keeps those names; only `k_proj` / `v_proj` shrink to `[K * d, hidden]` (`K` key/value heads, `d = head_dim`), and
query head `h` attends with key/value head `h // (H // K)`. The cache stores only the `K` heads.

transformers 5.24 moved GPT-J onto its shared attention interface (SDPA by default); 5.23 runs its own eager code.
`GPTJGQAAttention` dispatches through the interface in both (`hf_gqa.compat` supplies the rotary `(sin, cos)` and
GPT-J's eager arithmetic where 5.23 keeps them inside its module), with GPT-J's eager attention on K/V repeated
to the query heads as the default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gptj.modeling_gptj import GPTJAttention, apply_rotary_pos_emb

from .. import compat
from ..canonical import (
    AttentionWeights,
    RotarySpec,
)
from ..errors import UnsupportedArchitectureError
from .base import AttentionAdapter, shallow_clone
from .shared import (
    additive_mask,
    check_own_attention,
    read_separate_projections,
    set_separate_projections,
    with_repeated_kv,
)

eager_gqa_attention = with_repeated_kv(compat.gptj_eager_attention_forward)
#: GPT-J's projections: query, key, value, output.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class GPTJGQAAttention(GPTJAttention):
    """GPT-J self-attention with `num_key_value_heads` key/value heads (grouped-query attention).

    `q_proj`: `[H * d, hidden]`, `k_proj` / `v_proj`: `[K * d, hidden]`, `out_proj`: `[hidden, H * d]`, no bias.
    Rotary embeddings (interleaved, on the first `rotary_dim` dimensions), scaling, dropout and the float32 score
    computation are GPT-J's; attention dispatches through transformers' attention interface, with GPT-J's eager
    arithmetic on K/V repeated to the query heads as the default.
    """

    num_key_value_heads: int
    num_key_value_groups: int

    def __init__(self, config, layer_idx: int | None = None, num_key_value_heads: int | None = None) -> None:
        super().__init__(config, layer_idx)
        self.num_key_value_heads = num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}."
            )
        self.num_key_value_groups = self.num_attention_heads // self.num_key_value_heads
        kv_dim = self.num_key_value_heads * self.head_dim
        self.k_proj = nn.Linear(self.embed_dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(self.embed_dim, kv_dim, bias=False)

    def _rotate(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """GPT-J's rotary embedding on `x [b, s, heads, d]` (the first `rotary_dim` dimensions of each head)."""
        if self.rotary_dim is None:
            return apply_rotary_pos_emb(x, sin, cos)
        rotated = apply_rotary_pos_emb(x[..., : self.rotary_dim], sin, cos)
        return torch.cat([rotated, x[..., self.rotary_dim :]], dim=-1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states [b, s, hidden]` -> `(output [b, s, hidden], weights [b, H, s, k] or None)`.

        `attention_mask` is `[b, 1, s, k]`: additive float for eager, boolean (or None) for SDPA. The cache
        (`cache=`, `layer_past=` or `past_key_values=`, as the transformers release names it) receives keys and
        values of shape `[b, K, s, d]`. `position_embeddings` are GPT-J's `(sin, cos)` where the model computes
        them (transformers 5.24), else they come from `position_ids`.
        """
        cache = compat.pop_cache(kwargs)
        kwargs.pop("use_cache", None)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape)
        key = self.k_proj(hidden_states).view(shape)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)

        sin, cos = compat.gptj_sin_cos(self, position_ids, position_embeddings, key.dtype)
        query = self._rotate(query, sin, cos).transpose(1, 2)
        key = self._rotate(key, sin, cos).transpose(1, 2)

        if cache is not None:
            key, value = compat.update_cache(cache, key, value, self.layer_idx, kwargs)

        implementation = self.config._attn_implementation
        if output_attentions or implementation is None:
            implementation = "eager"
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            implementation, eager_gqa_attention
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask if implementation != "eager" else additive_mask(attention_mask, torch.float32),
            dropout=self.config.attn_pdrop if self.training else 0.0,
            scaling=self.head_dim**-0.5,
            **kwargs,
        )
        attn_output = self.out_proj(attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous())
        return self.resid_dropout(attn_output), attn_weights


class GPTJAdapter(AttentionAdapter):
    """GPT-J: separate projections without bias, interleaved partial rotary; installs `GPTJGQAAttention`."""

    family = "gptj"
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    model_types = ("gptj",)
    native_gqa = False
    attention_classes = (GPTJAttention,)  # GPTJGQAAttention is a subclass

    def check_model(self, model: PreTrainedModel) -> None:
        check_own_attention(model, "GPT-J", "load the model with attn_implementation='eager' (or 'sdpa').")

    def num_heads(self, module: nn.Module) -> int:
        return module.num_attention_heads

    def num_kv_heads(self, module: nn.Module) -> int:
        return getattr(module, "num_key_value_heads", module.num_attention_heads)

    def head_dim(self, module: nn.Module) -> int:
        return module.head_dim

    def read(self, module: nn.Module) -> AttentionWeights:
        rotary = RotarySpec(module.rotary_dim or module.head_dim, interleaved=True)
        return read_separate_projections(
            module, PROJECTIONS, self.num_heads(module), self.num_kv_heads(module), rotary
        )

    def build(self, module: nn.Module, weights: AttentionWeights) -> nn.Module:
        if any(b is not None for b in (weights.q_bias, weights.k_bias, weights.v_bias, weights.o_bias)):
            raise UnsupportedArchitectureError("GPT-J attention has no biases; the merge returned some.")
        new = shallow_clone(module, GPTJGQAAttention)
        set_separate_projections(new, module, PROJECTIONS, weights)
        new.num_key_value_heads = weights.num_kv_heads
        new.num_key_value_groups = weights.num_heads // weights.num_kv_heads
        return new


ADAPTERS = [GPTJAdapter()]
