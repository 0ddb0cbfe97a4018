"""GPT-J (`GPTJAttention`): multi-head only in transformers and not on its shared attention interface, so
conversion installs `GPTJGQAAttention`.

GPT-J has separate `q_proj`, `k_proj`, `v_proj` and `out_proj` linears without bias, and interleaved rotary
embeddings (pairs `(0, 1), (2, 3), ...`) on the first `rotary_dim` dimensions of each head. `GPTJGQAAttention`
keeps those names; only `k_proj` / `v_proj` shrink to `[K * d, hidden]` (`K` key/value heads, `d = head_dim`), and
query head `h` attends with key/value head `h // (H // K)`. The cache stores only the `K` heads.

GPT-J models always run its eager code in transformers (the family declares no SDPA support, and
`set_attn_implementation` leaves it unchanged); `GPTJGQAAttention` computes exactly that eager attention, on K/V
repeated to the query heads. If `config._attn_implementation` is set to `"sdpa"` or `"hf_gqa_sdpa"`, it uses
`hf_gqa.attention.gqa_sdpa_attention_forward` instead, which lets torch do GQA without copying K/V where it can.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.models.gptj.modeling_gptj import GPTJAttention, apply_rotary_pos_emb

from ..attention import ATTN_IMPLEMENTATION, gqa_sdpa_attention_forward
from ..canonical import (
    AttentionWeights,
    RotarySpec,
    join_heads,
    join_out_heads,
    split_heads,
    split_out_heads,
)
from ..errors import UnsupportedArchitectureError
from .base import AttentionAdapter, new_linear, shallow_clone

# Shared with the Falcon and Bloom adapters, whose modules dispatch the same way.
SDPA_IMPLEMENTATIONS = ("sdpa", ATTN_IMPLEMENTATION)
SUPPORTED_IMPLEMENTATIONS = (None, "eager", *SDPA_IMPLEMENTATIONS)


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


class GPTJGQAAttention(GPTJAttention):
    """GPT-J self-attention with `num_key_value_heads` key/value heads (grouped-query attention).

    `q_proj`: `[H * d, hidden]`, `k_proj` / `v_proj`: `[K * d, hidden]`, `out_proj`: `[hidden, H * d]`, no bias.
    Rotary embeddings, scaling, dropout and the fp32 score computation are GPT-J's.
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

    def _rotate(
        self, query: torch.Tensor, key: torch.Tensor, position_ids: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GPT-J's rotary embedding on `query [b, s, H, d]` and `key [b, s, K, d]` (same shapes returned)."""
        embed_positions = self._get_embed_positions(position_ids)
        repeated_position_ids = position_ids.unsqueeze(-1).repeat(1, 1, embed_positions.shape[-1])
        sincos = torch.gather(embed_positions, 1, repeated_position_ids).to(key.dtype)
        sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)

        if self.rotary_dim is not None:
            k_rot = apply_rotary_pos_emb(key[:, :, :, : self.rotary_dim], sin, cos)
            q_rot = apply_rotary_pos_emb(query[:, :, :, : self.rotary_dim], sin, cos)
            key = torch.cat([k_rot, key[:, :, :, self.rotary_dim :]], dim=-1)
            query = torch.cat([q_rot, query[:, :, :, self.rotary_dim :]], dim=-1)
        else:
            key = apply_rotary_pos_emb(key, sin, cos)
            query = apply_rotary_pos_emb(query, sin, cos)
        return query, key

    def forward(
        self,
        hidden_states: torch.Tensor,
        layer_past: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states [b, s, hidden]` -> `(output [b, s, hidden], weights [b, H, s, k] or None)`.

        `attention_mask` is `[b, 1, s, k]`: additive float for eager, boolean (or None) for SDPA. The cache
        receives keys and values of shape `[b, K, s, d]`.
        """
        query = self._split_heads(self.q_proj(hidden_states), self.num_attention_heads, self.head_dim, True)
        key = self._split_heads(self.k_proj(hidden_states), self.num_key_value_heads, self.head_dim, True)
        value = self._split_heads(self.v_proj(hidden_states), self.num_key_value_heads, self.head_dim, False)

        query, key = self._rotate(query, key, position_ids)
        key = key.permute(0, 2, 1, 3)
        query = query.permute(0, 2, 1, 3)

        if layer_past is not None:
            key, value = layer_past.update(key, value, self.layer_idx)

        if uses_sdpa(self.config, output_attentions):
            attn_output, attn_weights = gqa_sdpa_attention_forward(
                self,
                query,
                key,
                value,
                attention_mask,
                dropout=self.config.attn_pdrop if self.training else 0.0,
                scaling=1.0 / self.scale_attn,
            )
            attn_output = attn_output.reshape(
                *attn_output.shape[:2], self.num_attention_heads * self.head_dim
            )
        else:
            key = repeat_kv(key, self.num_key_value_groups)
            value = repeat_kv(value, self.num_key_value_groups)
            attn_output, attn_weights = self._attn(
                query, key, value, additive_mask(attention_mask, torch.float32)
            )
            attn_output = self._merge_heads(attn_output, self.num_attention_heads, self.head_dim)

        attn_output = self.out_proj(attn_output)
        attn_output = self.resid_dropout(attn_output)
        return attn_output, attn_weights


class GPTJAdapter(AttentionAdapter):
    """GPT-J: separate projections without bias, interleaved partial rotary; installs `GPTJGQAAttention`."""

    family = "gptj"
    model_types = ("gptj",)
    native_gqa = False
    attention_classes = (GPTJAttention,)  # GPTJGQAAttention is a subclass

    def check_model(self, model: PreTrainedModel) -> None:
        implementation = model.config._attn_implementation
        if implementation not in SUPPORTED_IMPLEMENTATIONS:
            raise UnsupportedArchitectureError(
                f"hf_gqa converts GPT-J models running eager or SDPA attention, not {implementation!r}; load the "
                "model with attn_implementation='eager'."
            )

    def num_heads(self, module: nn.Module) -> int:
        return module.num_attention_heads

    def num_kv_heads(self, module: nn.Module) -> int:
        return getattr(module, "num_key_value_heads", module.num_attention_heads)

    def head_dim(self, module: nn.Module) -> int:
        return module.head_dim

    def read(self, module: nn.Module) -> AttentionWeights:
        heads, kv_heads = self.num_heads(module), self.num_kv_heads(module)
        return AttentionWeights(
            q=split_heads(module.q_proj.weight, heads),
            k=split_heads(module.k_proj.weight, kv_heads),
            v=split_heads(module.v_proj.weight, kv_heads),
            o=split_out_heads(module.out_proj.weight, heads),
            q_bias=module.q_proj.bias,
            k_bias=module.k_proj.bias,
            v_bias=module.v_proj.bias,
            o_bias=module.out_proj.bias,
            rotary=RotarySpec(module.rotary_dim or module.head_dim, interleaved=True),
        )

    def build(self, module: nn.Module, weights: AttentionWeights) -> nn.Module:
        if any(b is not None for b in (weights.q_bias, weights.k_bias, weights.v_bias, weights.o_bias)):
            raise UnsupportedArchitectureError("GPT-J attention has no biases; the merge returned some.")
        new = shallow_clone(module, GPTJGQAAttention)
        new.q_proj = new_linear(join_heads(weights.q), None, like=module.q_proj)
        new.k_proj = new_linear(join_heads(weights.k), None, like=module.k_proj)
        new.v_proj = new_linear(join_heads(weights.v), None, like=module.v_proj)
        new.out_proj = new_linear(join_out_heads(weights.o), None, like=module.out_proj)
        new.num_key_value_heads = weights.num_kv_heads
        new.num_key_value_groups = weights.num_heads // weights.num_kv_heads
        return new


ADAPTERS = [GPTJAdapter()]
