"""Falcon (`FalconAttention`): not on transformers' shared attention interface, so conversion installs
`FalconGQAAttention`, for both decoder architectures.

Falcon fuses q, k and v into one linear, `query_key_value`. All three of its layouts are one **grouped** layout,
`[K, H // K + 2, d]` along the output rows: for each of the `K` key/value groups, its `H // K` query heads, then its
key head, then its value head (`H` query heads, `d = head_dim`):

- new decoder architecture (Falcon-40B/180B, Falcon2): natively GQA with `config.num_kv_heads = K`;
- old architecture, `multi_query=True` (Falcon-7B): `[q_0 .. q_{H-1}, k, v]`, i.e. `K = 1`;
- old architecture, `multi_query=False` (Falcon-RW): `[q_h, k_h, v_h]` per head, i.e. `K = H`.

`FalconGQAAttention` keeps the names `query_key_value` (weight `[(H + 2K) * d, hidden]` in the grouped layout) and
`dense`, and stores only the `K` heads in the cache (transformers' own module broadcasts the new architecture's
keys and values to all `H` heads before caching them). Its arithmetic is Falcon's: rotary or ALiBi, eager or SDPA
(`config._attn_implementation` `"sdpa"` or `"hf_gqa_sdpa"`, through `hf_gqa.attention.gqa_sdpa_attention_forward`,
which avoids copying K/V where torch can do GQA natively).

A new-architecture model converted to the same `K` in every layer is a standard Falcon checkpoint (only
`config.num_kv_heads` changes). Old-architecture Falcon cannot express `1 < K < H` in its config, so such models
load with `hf_gqa.from_pretrained`; plain transformers refuses them (size mismatch of `query_key_value`).

Note (transformers 5.23): Falcon's own eager ALiBi path adds the ALiBi bias twice (once to the scores and once
through the mask the model builds), its SDPA path once; `FalconGQAAttention` reproduces each path as it is.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.models.falcon.modeling_falcon import FalconAttention, apply_rotary_pos_emb

from .. import compat
from ..attention import gqa_sdpa_attention_forward
from ..canonical import AttentionWeights, RotarySpec, join_out_heads
from ..errors import UnsupportedArchitectureError
from .base import AttentionAdapter, new_linear, shallow_clone
from .shared import (
    additive_mask,
    check_own_attention,
    join_grouped_qkv,
    read_grouped_fused,
    split_grouped_states,
    uses_sdpa,
)


def new_like(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """A linear of the same class as `like` (e.g. `FalconLinear`, whose matmul-then-add differs in the last bits
    from `nn.Linear`) holding `weight [out, in]` and `bias [out]`, on the device and dtype of `like`."""
    linear = new_linear(weight, bias, like)
    if type(like) is not nn.Linear:
        linear.__class__ = type(like)
    return linear


# -- the GQA module -----------------------------------------------------------------------------------------------


class FalconGQAAttention(FalconAttention):
    """Falcon self-attention with `num_kv_heads` key/value heads in the grouped fused layout (module docstring).

    `query_key_value`: `[(H + 2K) * d, hidden]` (+ bias), `dense`: `[hidden, H * d]` (+ bias).
    """

    num_kv_heads: int
    num_key_value_groups: int

    def __init__(
        self, config: PretrainedConfig, layer_idx: int | None = None, num_kv_heads: int | None = None
    ):
        super().__init__(config, layer_idx)
        self.num_kv_heads = num_kv_heads or falcon_kv_heads(config)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}.")
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        out_features = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = type(self.query_key_value)(self.hidden_size, out_features, bias=config.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        alibi: torch.Tensor | None,
        attention_mask: torch.Tensor,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states [b, s, hidden]` -> `(output [b, s, hidden], probabilities [b, H, s, k] or None)`.

        `alibi`: `[b * H, 1, k]` or None (rotary, with `position_embeddings` `(cos, sin)` `[b, s, d]`).
        `attention_mask`: `[b, 1 or H, s, k]`; boolean under SDPA for rotary models, additive float otherwise
        (with ALiBi folded in when `alibi` is given). The cache (`layer_past=`) receives keys and values
        `[b, K, s, d]`.
        """
        cache = compat.pop_cache(kwargs)
        fused_qkv = self.query_key_value(hidden_states)
        query, key, value = split_grouped_states(fused_qkv, self.num_heads, self.num_kv_heads, self.head_dim)
        batch_size, _, query_length, _ = query.shape

        if alibi is None:
            cos, sin = position_embeddings
            query, key = apply_rotary_pos_emb(query, key, cos, sin)

        if cache is not None:
            key, value = compat.update_cache(cache, key, value, self.layer_idx, kwargs)

        if uses_sdpa(self.config, output_attentions):
            dropout = self.attention_dropout.p if (alibi is not None and self.training) else 0.0
            attn_output, attention_probs = gqa_sdpa_attention_forward(
                self, query, key, value, attention_mask, dropout=dropout
            )
            attn_output = attn_output.reshape(batch_size, query_length, self.num_heads * self.head_dim)
            return self.dense(attn_output), attention_probs

        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        if alibi is None:
            attn_output, attention_probs = self._eager_rotary(
                query, key, value, attention_mask, hidden_states.dtype
            )
        else:
            attn_output, attention_probs = self._eager_alibi(
                query, key, value, attention_mask, alibi, hidden_states.dtype
            )
        attn_output = attn_output.permute(0, 2, 1, 3).reshape(
            batch_size, query_length, self.num_heads * self.head_dim
        )
        return self.dense(attn_output), attention_probs

    def _eager_rotary(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Falcon's eager rotary attention on `[b, H, *, d]` inputs -> `([b, H, q, d], scores [b, H, q, k])`."""
        attention_scores = query @ key.transpose(-1, -2)
        attention_scores /= math.sqrt(self.head_dim)
        attention_scores = F.softmax(
            attention_scores + additive_mask(attention_mask, attention_scores.dtype), dim=-1, dtype=dtype
        )
        return attention_scores @ value, attention_scores

    def _eager_alibi(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        alibi: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Falcon's eager ALiBi attention on `[b, H, *, d]` inputs -> `([b, H, q, d], probs [b, H, q, k])`."""
        batch_size, _, query_length, _ = query.shape
        attention_scores = query @ key.transpose(-1, -2)
        if attention_scores.dtype in (torch.float16, torch.bfloat16):
            attention_scores = attention_scores.to(torch.float32)
        attention_logits = attention_scores + alibi.view(batch_size, self.num_heads, 1, -1)
        attention_logits *= self.inv_norm_factor
        attention_probs = F.softmax(
            attention_logits + additive_mask(attention_mask, attention_logits.dtype), dim=-1, dtype=dtype
        )
        attention_probs = self.attention_dropout(attention_probs)
        return attention_probs @ value, attention_probs


def falcon_kv_heads(config: PretrainedConfig) -> int:
    """Key/value heads of transformers' `FalconAttention` built from `config` (its fused layout's `K`)."""
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


# -- the adapters --------------------------------------------------------------------------------------------------


class FalconAdapter(AttentionAdapter):
    """Falcon, new decoder architecture: natively GQA (`config.num_kv_heads`); installs `FalconGQAAttention` so
    that the cache holds only the grouped heads."""

    family = "falcon"
    lora_targets = ("query_key_value", "dense")
    key_value_inputs = ("query_key_value",)
    model_types = ("falcon",)
    native_gqa = True
    kv_heads_config_key = "num_kv_heads"
    new_decoder_architecture: ClassVar[bool] = True
    attention_classes = (FalconAttention,)  # FalconGQAAttention is a subclass
    # Plain transformers loads the converted checkpoint, but its module caches K/V repeated to every query head.
    rebuild_on_load = True

    def matches_config(self, config: PretrainedConfig) -> bool:
        return (
            getattr(config, "model_type", None) in self.model_types
            and bool(getattr(config, "new_decoder_architecture", False)) == self.new_decoder_architecture
        )

    def check_model(self, model: PreTrainedModel) -> None:
        check_own_attention(model, "Falcon", "load the model with attn_implementation='sdpa' (or 'eager').")

    def num_heads(self, module: nn.Module) -> int:
        return module.num_heads

    def num_kv_heads(self, module: nn.Module) -> int:
        if isinstance(module, FalconGQAAttention):
            return module.num_kv_heads
        return falcon_kv_heads(module.config)

    def head_dim(self, module: nn.Module) -> int:
        return module.head_dim

    def read(self, module: nn.Module) -> AttentionWeights:
        rotary = None if module.config.alibi else RotarySpec(module.head_dim, interleaved=False)
        return read_grouped_fused(module, self.num_heads(module), self.num_kv_heads(module), rotary)

    def build(self, module: nn.Module, weights: AttentionWeights) -> nn.Module:
        weight, bias = join_grouped_qkv(weights)
        if (bias is None) != (module.query_key_value.bias is None):
            raise UnsupportedArchitectureError(
                "The merge changed whether Falcon's query_key_value has a bias."
            )
        new = shallow_clone(module, FalconGQAAttention)
        new.query_key_value = new_like(weight, bias, like=module.query_key_value)
        new.dense = new_like(join_out_heads(weights.o), weights.o_bias, like=module.dense)
        new.num_kv_heads = weights.num_kv_heads
        new.num_key_value_groups = weights.num_heads // weights.num_kv_heads
        return new


class FalconLegacyAdapter(FalconAdapter):
    """Falcon, old decoder architecture (`multi_query=True`: one KV head; `False`: multi-head). transformers cannot
    express other KV head counts for it, so converted models need `hf_gqa.from_pretrained`; the config keeps
    describing the original architecture."""

    native_gqa = False
    kv_heads_config_key = None
    new_decoder_architecture = False
    rebuild_on_load = False


ADAPTERS = [FalconAdapter(), FalconLegacyAdapter()]
