"""Bloom (`BloomAttention`): multi-head only, ALiBi, not on transformers' shared attention interface, so
conversion installs `BloomGQAAttention`.

Bloom fuses q, k and v into `query_key_value` (with bias), interleaved per head as `[q_h, k_h, v_h]`. That is the
grouped layout of Falcon with `K = H` (`hf_gqa.architectures.falcon`): for each of the `K` key/value groups, its
`H // K` query heads, then its key head, then its value head. `BloomGQAAttention` keeps the names
`query_key_value` (weight `[(H + 2K) * d, hidden]`, bias `[(H + 2K) * d]`, grouped layout) and `dense`, and
stores only the `K` heads in the cache. ALiBi slopes stay per query head.

Bloom always runs its eager code in transformers (the family declares no SDPA support); `BloomGQAAttention`
computes exactly that, on K/V repeated to the query heads. If `config._attn_implementation` is set to `"sdpa"` or
`"hf_gqa_sdpa"` (so that the model builds boolean masks), it folds ALiBi into a float mask and uses
`hf_gqa.attention.gqa_sdpa_attention_forward`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.models.bloom.modeling_bloom import BloomAttention, dropout_add

from .. import compat
from ..attention import gqa_sdpa_attention_forward
from ..canonical import AttentionWeights, join_out_heads
from .base import AttentionAdapter, new_linear, shallow_clone
from .shared import (
    additive_mask,
    check_own_attention,
    join_grouped_qkv,
    read_grouped_fused,
    split_grouped_states,
)


def alibi_sdpa_mask(
    alibi: torch.Tensor, attention_mask: torch.Tensor | None, query_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """ALiBi `[b, H, 1, k]` and the model's mask (boolean `[b, 1, q, k]`, additive float, or None for plain
    causal attention) -> one additive float mask `[b, H, q, k]` for SDPA."""
    alibi = alibi.to(dtype)
    key_length = alibi.shape[-1]
    if attention_mask is None:  # causal, aligned to the end of the keys (queries are the last positions)
        attention_mask = torch.ones(query_length, key_length, dtype=torch.bool, device=alibi.device).tril(
            key_length - query_length
        )
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, alibi, torch.finfo(dtype).min)
    return alibi + attention_mask.to(dtype)


class BloomGQAAttention(BloomAttention):
    """Bloom self-attention with `num_kv_heads` key/value heads in the grouped fused layout (module docstring).

    `query_key_value`: `[(H + 2K) * d, hidden]` + bias, `dense`: `[hidden, H * d]` + bias.
    """

    num_kv_heads: int
    num_key_value_groups: int
    is_causal = True

    def __init__(
        self, config: PretrainedConfig, layer_idx: int | None = None, num_kv_heads: int | None = None
    ):
        super().__init__(config, layer_idx)
        self.num_kv_heads = num_kv_heads or self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}.")
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        out_features = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(self.hidden_size, out_features, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        alibi: torch.Tensor,
        attention_mask: torch.Tensor,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states [b, s, hidden]` (+ `residual`) -> `(output [b, s, hidden], probs [b, H, s, k] or None)`.

        `alibi`: `[b * H, 1, k]`; `attention_mask`: `[b, 1, s, k]`, additive float for eager, boolean or None
        for SDPA. The cache (`layer_past=`) receives keys and values `[b, K, s, d]`.
        """
        cache = compat.pop_cache(kwargs)
        batch_size, q_length, _ = hidden_states.shape
        fused_qkv = self.query_key_value(hidden_states)
        query, key, value = split_grouped_states(fused_qkv, self.num_heads, self.num_kv_heads, self.head_dim)

        if cache is not None:
            key, value = compat.update_cache(cache, key, value, self.layer_idx, kwargs)

        # BloomAttention keeps no config: the mask tells which implementation the model built it for (eager masks
        # are additive floats; SDPA masks are boolean, or None for plain causal attention).
        sdpa_mask = attention_mask is None or attention_mask.dtype == torch.bool
        if sdpa_mask and not output_attentions:
            mask = alibi_sdpa_mask(
                alibi.view(batch_size, self.num_heads, 1, -1), attention_mask, q_length, query.dtype
            )
            context, attention_probs = gqa_sdpa_attention_forward(
                self,
                query,
                key,
                value,
                mask,
                dropout=self.attention_dropout.p if self.training else 0.0,
                scaling=self.inv_norm_factor,
            )
            context_layer = context.reshape(batch_size, q_length, self.num_heads * self.head_dim)
        else:
            context_layer, attention_probs = self._eager(query, key, value, alibi, attention_mask)

        if self.pretraining_tp > 1 and self.slow_but_exact:
            slices = self.hidden_size / self.pretraining_tp
            output_tensor = torch.zeros_like(context_layer)
            for i in range(self.pretraining_tp):
                output_tensor = output_tensor + F.linear(
                    context_layer[:, :, int(i * slices) : int((i + 1) * slices)],
                    self.dense.weight[:, int(i * slices) : int((i + 1) * slices)],
                )
        else:
            output_tensor = self.dense(context_layer)

        output_tensor = dropout_add(output_tensor, residual, self.hidden_dropout, self.training)
        return output_tensor, attention_probs

    def _eager(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        alibi: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bloom's eager attention: `query [b, H, q, d]`, `key`/`value` `[b, K, k, d]`, `alibi [b * H, 1, k]` ->
        `(context [b, q, H * d], probs [b, H, q, k])`."""
        batch_size, _, q_length, _ = query.shape
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)

        query_layer = query.reshape(batch_size * self.num_heads, -1, self.head_dim)
        key_layer = key.reshape(batch_size * self.num_heads, -1, self.head_dim).transpose(-1, -2)
        value_layer = value.reshape(batch_size * self.num_heads, -1, self.head_dim)

        attention_scores = alibi.baddbmm(
            batch1=query_layer, batch2=key_layer, beta=self.beta, alpha=self.inv_norm_factor
        )
        attn_weights = attention_scores.view(batch_size, self.num_heads, q_length, -1)
        if attention_mask is not None:
            attn_weights = attn_weights + additive_mask(attention_mask, attn_weights.dtype)

        attention_probs = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_layer.dtype)
        attention_probs = self.attention_dropout(attention_probs)
        attention_probs_reshaped = attention_probs.view(batch_size * self.num_heads, q_length, -1)
        context_layer = torch.bmm(attention_probs_reshaped, value_layer)
        return self._merge_heads(context_layer), attention_probs


class BloomAdapter(AttentionAdapter):
    """Bloom: fused per-head qkv with biases, ALiBi; installs `BloomGQAAttention`."""

    family = "bloom"
    lora_targets = ("query_key_value", "dense")
    key_value_inputs = ("query_key_value",)
    model_types = ("bloom",)
    native_gqa = False
    attention_classes = (BloomAttention,)  # BloomGQAAttention is a subclass

    def check_model(self, model: PreTrainedModel) -> None:
        check_own_attention(model, "Bloom", "load the model with attn_implementation='eager'.")

    def num_heads(self, module: nn.Module) -> int:
        return module.num_heads

    def num_kv_heads(self, module: nn.Module) -> int:
        return getattr(module, "num_kv_heads", module.num_heads)

    def head_dim(self, module: nn.Module) -> int:
        return module.head_dim

    def read(self, module: nn.Module) -> AttentionWeights:
        return read_grouped_fused(module, self.num_heads(module), self.num_kv_heads(module), rotary=None)

    def build(self, module: nn.Module, weights: AttentionWeights) -> nn.Module:
        weight, bias = join_grouped_qkv(weights)
        new = shallow_clone(module, BloomGQAAttention)
        new.query_key_value = new_linear(weight, bias, like=module.query_key_value)
        new.dense = new_linear(join_out_heads(weights.o), weights.o_bias, like=module.dense)
        new.num_kv_heads = weights.num_kv_heads
        new.num_key_value_groups = weights.num_heads // weights.num_kv_heads
        return new


ADAPTERS = [BloomAdapter()]
