"""Grouped-query attention for the multi-head-only transformers families, as hf_gqa converts and saves them.

This file is self-contained remote code: it imports torch and transformers only, never hf_gqa. hf_gqa copies it
into every checkpoint it saves of a multi-head-only family (GPT-2, OPT, GPT-NeoX / Pythia, GPT-J, Falcon of the
old decoder architecture, Bloom), next to a `config.json` whose `auto_map` names two classes below, so that

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # `...GQA...ForCausalLM`
    AutoModel.from_pretrained(path, trust_remote_code=True)             # `...GQAModel`, the base model

load the converted model where hf_gqa is not installed. vLLM's Transformers backend builds the base model too
(`AutoModel.from_config`) for GPT-2, OPT, GPT-NeoX and GPT-J, whose attention dispatches through transformers'
attention interface; Falcon's and Bloom's compute their own attention (Bloom's and some Falcons' with ALiBi).

Each `...GQAModel` below is the family's transformers base model, built from the family's config as usual, whose
self-attention modules are then replaced by grouped-query ones: layer `i` gets `config.hf_gqa["kv_heads"][i]`
key/value heads (hf_gqa's metadata; the rest of the config describes the original multi-head model, plus the KV
heads in transformers' terms: `num_key_value_heads`, or a heterogeneous `per_layer_config` where layers differ).
Each `...GQA...ForCausalLM` is the family's causal LM with that base model. The grouped modules keep the family's
parameter names, with smaller key/value blocks, so that the saved tensors load by name:

- GPT-2: `c_attn` (`Conv1D`, weight `[hidden, H * d + 2 * K * d]`, columns `q | k | v`), `c_proj` unchanged;
- OPT, GPT-J: `q_proj` `[H * d, hidden]`, `k_proj` / `v_proj` `[K * d, hidden]`, `out_proj` `[hidden, H * d]`;
- GPT-NeoX, Falcon, Bloom: `query_key_value` `[(H + 2K) * d, hidden]` with rows grouped per key/value head
  (`[K, H // K + 2, d]`: a group's query heads, then its key head, then its value head), `dense` unchanged;

with `H` query heads, `K` key/value heads and `d = head_dim`; query head `h` attends with key/value head
`h // (H // K)`. The KV cache stores only the `K` heads of each layer, `[batch, K, seq, d]`. The arithmetic is each
family's own (transformers 5.23 and 5.24, which name the cache argument `past_key_values` and `cache`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.generation import utils as generation_utils
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bloom.modeling_bloom import BloomAttention, BloomForCausalLM, BloomModel, dropout_add
from transformers.models.falcon.modeling_falcon import FalconAttention, FalconForCausalLM, FalconModel
from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb as falcon_rotary
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2LMHeadModel, GPT2Model
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward as gpt2_eager
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, GPTNeoXForCausalLM, GPTNeoXModel
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_rotary
from transformers.models.gpt_neox.modeling_gpt_neox import eager_attention_forward as neox_eager
from transformers.models.gptj import modeling_gptj
from transformers.models.gptj.modeling_gptj import GPTJAttention, GPTJForCausalLM, GPTJModel
from transformers.models.opt.modeling_opt import OPTAttention, OPTForCausalLM, OPTModel
from transformers.models.opt.modeling_opt import eager_attention_forward as opt_eager
from transformers.pytorch_utils import Conv1D

#: The config attribute holding hf_gqa's metadata (`kv_heads`: key/value heads per attention layer).
META_KEY = "hf_gqa"
#: The metadata versions this file reads.
FORMAT_VERSIONS = (1,)

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

# -- what differs between transformers releases ----------------------------------------------------------------------
#: 5.24 renamed `past_key_values` to `cache` and hands the attention module's keyword arguments to `Cache.update`.
_UPDATE_TAKES_KWARGS = generation_utils.ALL_CACHE_NAMES[0] == "cache"
#: Every keyword a decoder layer of these families uses to hand the cache to its attention module.
_CACHE_NAMES = ("cache", "past_key_values", "layer_past")


def pop_cache(kwargs: dict) -> Cache | None:
    """Remove and return the cache an attention module was called with, under whichever name the caller used."""
    found = None
    for name in _CACHE_NAMES:
        value = kwargs.pop(name, None)
        if value is not None:
            found = value
    return found


def update_cache(
    cache: Cache, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache.update` for keys and values `[b, K, s, d]`, called as this transformers release calls it; returns the
    keys and values of every cached position, `[b, K, total, d]`."""
    if _UPDATE_TAKES_KWARGS:
        return cache.update(key, value, layer_idx, kwargs=kwargs)
    return cache.update(key, value, layer_idx)


# -- attention functions on grouped K/V --------------------------------------------------------------------------------
def with_repeated_kv(eager_attention_forward: AttentionFn) -> AttentionFn:
    """A family's eager attention function (written for as many K/V heads as query heads) on grouped K/V:
    `query [b, H, q, d]`, `key` / `value` `[b, K, k, d]` are repeated to the `H` query heads first. Returns what the
    family's function returns, `([b, q, H, d], weights [b, H, q, k])`."""

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

    return forward


def grouped_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA over `query [b, H, q, d]` and grouped `key` / `value` `[b, K, k, d]` -> `[b, q, H, d]`.

    A masked prefill on CPU runs torch's SDPA with `enable_gqa=True` (no repeated K/V); everything else goes to
    transformers' own SDPA function (which repeats K/V where it must)."""
    masked_prefill = attention_mask is not None and query.shape[2] > 1
    if query.shape[1] == key.shape[1] or not masked_prefill or query.device.type != "cpu":
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask[..., : key.shape[-2]],
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


def additive_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask `[b, 1, q, k]` (True = attend) as an additive one (0 or the minimum of `dtype`); float masks
    and None unchanged."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return attention_mask
    zero = torch.zeros((), device=attention_mask.device, dtype=dtype)
    return torch.where(attention_mask, zero, torch.finfo(dtype).min)


def split_grouped_states(
    fused_qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected `fused_qkv [b, s, (H + 2K) * d]` in the grouped layout -> `query [b, H, s, d]`,
    `key [b, K, s, d]`, `value [b, K, s, d]`."""
    batch, seq_len, _ = fused_qkv.shape
    per_group = heads // kv_heads
    qkv = fused_qkv.view(batch, seq_len, kv_heads, per_group + 2, head_dim)
    query = qkv[:, :, :, :per_group].reshape(batch, seq_len, heads, head_dim)
    key, value = qkv[:, :, :, per_group], qkv[:, :, :, per_group + 1]
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)


def check_divides(heads: int, kv_heads: int) -> None:
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{kv_heads} key/value heads must divide {heads} query heads.")


# -- GPT-2 -----------------------------------------------------------------------------------------------------------
gpt2_gqa_eager = with_repeated_kv(gpt2_eager)


class GPT2GQAAttention(GPT2Attention):
    """GPT-2 self-attention with `num_key_value_heads` key/value heads: `c_attn` is a `Conv1D` of weight
    `[hidden, H * d + 2 * K * d]` (column blocks `q | k | v`), `c_proj` is `[H * d, hidden]`. Everything else is
    GPT-2's."""

    def __init__(self, config: PretrainedConfig, layer_idx: int | None, num_key_value_heads: int) -> None:
        super().__init__(config, is_cross_attention=False, layer_idx=layer_idx)
        check_divides(self.num_heads, num_key_value_heads)
        self.num_key_value_heads = num_key_value_heads
        self.num_key_value_groups = self.num_heads // num_key_value_heads
        self.c_attn = Conv1D(self.embed_dim + 2 * num_key_value_heads * self.head_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states [b, s, hidden]` -> `(output [b, s, hidden], weights [b, H, s, k] or None)`; the cache
        receives keys and values `[b, K, s, d]`."""
        cache = pop_cache(kwargs)
        if encoder_hidden_states is not None:
            raise ValueError("GPT2GQAAttention is self-attention only.")
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache

        kv_size = self.num_key_value_heads * self.head_dim
        query, key, value = self.c_attn(hidden_states).split([self.embed_dim, kv_size, kv_size], dim=2)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query, key, value = (t.view(shape).transpose(1, 2) for t in (query, key, value))
        if cache is not None:
            key, value = update_cache(cache, key, value, self.layer_idx, kwargs)

        if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:
            attn_output, attn_weights = self._upcast_and_reordered_attn(
                query,
                repeat_kv(key, self.num_key_value_groups),
                repeat_kv(value, self.num_key_value_groups),
                attention_mask,
            )
        else:
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, gpt2_gqa_eager
            )
            attn_output, attn_weights = interface(
                self,
                query,
                key,
                value,
                attention_mask,
                dropout=self.attn_dropout.p if self.training else 0.0,
                scaling=self.scaling,
                **kwargs,
            )
        # By the input's shape (not the output's, as GPT-2 does): an attention function may return `[b * s, H * d]`.
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.resid_dropout(self.c_proj(attn_output)), attn_weights


# -- OPT -------------------------------------------------------------------------------------------------------------
opt_gqa_eager = with_repeated_kv(opt_eager)


class OPTGQAAttention(OPTAttention):
    """OPT self-attention with `num_key_value_heads` key/value heads: `k_proj` / `v_proj` are `[K * d, hidden]`.
    Queries are scaled by `head_dim ** -0.5` before attention, which then runs with `scaling=1.0` (as in OPT)."""

    def __init__(self, config: PretrainedConfig, layer_idx: int | None, num_key_value_heads: int) -> None:
        super().__init__(config, layer_idx=layer_idx)
        check_divides(self.num_heads, num_key_value_heads)
        self.num_key_value_heads = num_key_value_heads
        self.num_key_value_groups = self.num_heads // num_key_value_heads
        kv_size = num_key_value_heads * self.head_dim
        self.k_proj = nn.Linear(self.embed_dim, kv_size, bias=self.enable_bias)
        self.v_proj = nn.Linear(self.embed_dim, kv_size, bias=self.enable_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states [b, s, hidden]` -> `(output [b, s, hidden], weights [b, H, s, k] or None)`; the cache
        receives keys and values `[b, K, s, d]`."""
        cache = pop_cache(kwargs)
        bsz = hidden_states.shape[0]
        query = self.q_proj(hidden_states) * self.scaling
        query = query.view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
        key = (
            self.k_proj(hidden_states).view(bsz, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        )
        value = (
            self.v_proj(hidden_states).view(bsz, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        )
        if cache is not None:
            key, value = update_cache(cache, key, value, self.layer_idx, kwargs)

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, opt_gqa_eager)
        attn_output, attn_weights = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=1.0,
            **kwargs,
        )
        # By the input's shape: an attention function may return `[b * s, H * d]` (vLLM's does).
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.out_proj(attn_output), attn_weights


# -- GPT-NeoX --------------------------------------------------------------------------------------------------------
neox_gqa_eager = with_repeated_kv(neox_eager)


class GPTNeoXGQAAttention(GPTNeoXAttention):
    """GPT-NeoX self-attention with `num_key_value_heads` key/value heads: `query_key_value` is
    `[(H + 2K) * d, hidden]` in the grouped layout (GPT-NeoX's own `[q_h, k_h, v_h]` is the case `K == H`)."""

    def __init__(self, config: PretrainedConfig, layer_idx: int | None, num_key_value_heads: int) -> None:
        super().__init__(config, layer_idx)
        self.num_heads = config.num_attention_heads
        check_divides(self.num_heads, num_key_value_heads)
        self.num_key_value_heads = num_key_value_heads
        self.num_key_value_groups = self.num_heads // num_key_value_heads
        out_features = (self.num_heads + 2 * num_key_value_heads) * self.head_size
        self.query_key_value = nn.Linear(config.hidden_size, out_features, bias=config.attention_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states [b, s, hidden]`, rotary `(cos, sin)` each `[b, s, rotary_ndims]` -> `(output [b, s,
        hidden], weights [b, H, s, k] or None)`; the cache receives keys and values `[b, K, s, d]`."""
        cache = pop_cache(kwargs)
        input_shape = hidden_states.shape[:-1]
        query, key, value = split_grouped_states(
            self.query_key_value(hidden_states), self.num_heads, self.num_key_value_heads, self.head_size
        )
        cos, sin = position_embeddings
        query, key = neox_rotary(query, key, cos, sin)
        if cache is not None:
            key, value = update_cache(cache, key, value, self.layer_idx, kwargs)

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, neox_gqa_eager)
        attn_output, attn_weights = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.attention_dropout,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.dense(attn_output), attn_weights


# -- GPT-J -----------------------------------------------------------------------------------------------------------
def _gptj_eager(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-J's eager attention as transformers 5.23 computes it inside its module (5.24 exposes it as a function):
    `[b, H, *, d]` inputs, scores in float32 -> `([b, q, H, d], weights [b, H, q, k])`."""
    weights = torch.matmul(query.to(torch.float32), key.to(torch.float32).transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1).to(value.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


gptj_gqa_eager = with_repeated_kv(getattr(modeling_gptj, "eager_attention_forward", _gptj_eager))


class GPTJGQAAttention(GPTJAttention):
    """GPT-J self-attention with `num_key_value_heads` key/value heads: `k_proj` / `v_proj` are `[K * d, hidden]`,
    no biases. Interleaved rotary on the first `rotary_dim` dimensions of each head, float32 scores, as GPT-J."""

    def __init__(self, config: PretrainedConfig, layer_idx: int | None, num_key_value_heads: int) -> None:
        super().__init__(config, layer_idx)
        check_divides(self.num_attention_heads, num_key_value_heads)
        self.num_key_value_heads = num_key_value_heads
        self.num_key_value_groups = self.num_attention_heads // num_key_value_heads
        self.k_proj = nn.Linear(self.embed_dim, num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(self.embed_dim, num_key_value_heads * self.head_dim, bias=False)
        # An attribute, not an expression at the call: vLLM's Transformers backend reads `scaling=` from the source
        # and resolves only literals and `self.<attribute>`.
        self.scaling = self.head_dim**-0.5

    def _sin_cos(
        self,
        position_ids: torch.LongTensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary `(sin, cos)`, each `[b, s, rotary_dim // 2]`: passed by the model from transformers 5.24, read
        from the module's sinusoid table `embed_positions` (`[positions, rotary_dim]`) in 5.23."""
        if position_embeddings is not None:
            return position_embeddings
        table = self.embed_positions.to(position_ids.device)[position_ids].to(dtype)
        sin, cos = torch.split(table, table.shape[-1] // 2, dim=-1)
        return sin, cos

    def _rotate(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """GPT-J's rotary embedding on `x [b, s, heads, d]` (the first `rotary_dim` dimensions of each head)."""
        if self.rotary_dim is None:
            return modeling_gptj.apply_rotary_pos_emb(x, sin, cos)
        rotated = modeling_gptj.apply_rotary_pos_emb(x[..., : self.rotary_dim], sin, cos)
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
        """`hidden_states [b, s, hidden]` -> `(output [b, s, hidden], weights [b, H, s, k] or None)`; the cache
        receives keys and values `[b, K, s, d]`. `attention_mask` `[b, 1, s, k]`: additive float or boolean."""
        cache = pop_cache(kwargs)
        kwargs.pop("use_cache", None)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape)
        key = self.k_proj(hidden_states).view(shape)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        sin, cos = self._sin_cos(position_ids, position_embeddings, key.dtype)
        query = self._rotate(query, sin, cos).transpose(1, 2)
        key = self._rotate(key, sin, cos).transpose(1, 2)
        if cache is not None:
            key, value = update_cache(cache, key, value, self.layer_idx, kwargs)

        implementation = self.config._attn_implementation
        if output_attentions or implementation is None:
            implementation = "eager"
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, gptj_gqa_eager)
        attn_output, attn_weights = interface(
            self,
            query,
            key,
            value,
            attention_mask if implementation != "eager" else additive_mask(attention_mask, torch.float32),
            dropout=self.config.attn_pdrop if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.out_proj(attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous())
        return self.resid_dropout(attn_output), attn_weights


# -- Falcon (old decoder architecture) ---------------------------------------------------------------------------------
def _uses_sdpa(config: PretrainedConfig, output_attentions: bool | None) -> bool:
    return config._attn_implementation in ("sdpa", "hf_gqa_sdpa") and not output_attentions


class FalconGQAAttention(FalconAttention):
    """Falcon self-attention with `num_kv_heads` key/value heads: `query_key_value` is `[(H + 2K) * d, hidden]` in
    the grouped layout (Falcon's `multi_query` layout is `K = 1`, its multi-head one `K = H`). Rotary or ALiBi,
    eager or SDPA, as Falcon."""

    def __init__(self, config: PretrainedConfig, layer_idx: int | None, num_kv_heads: int) -> None:
        super().__init__(config, layer_idx)
        check_divides(self.num_heads, num_kv_heads)
        self.num_kv_heads = num_kv_heads
        self.num_key_value_groups = self.num_heads // num_kv_heads
        out_features = (self.num_heads + 2 * num_kv_heads) * self.head_dim
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
        `alibi` `[b * H, 1, k]` or None (rotary: `position_embeddings` `(cos, sin)`, each `[b, s, d]`); the cache
        receives keys and values `[b, K, s, d]`."""
        cache = pop_cache(kwargs)
        fused_qkv = self.query_key_value(hidden_states)
        query, key, value = split_grouped_states(fused_qkv, self.num_heads, self.num_kv_heads, self.head_dim)
        batch_size, _, query_length, _ = query.shape
        if alibi is None:
            cos, sin = position_embeddings
            query, key = falcon_rotary(query, key, cos, sin)
        if cache is not None:
            key, value = update_cache(cache, key, value, self.layer_idx, kwargs)

        if _uses_sdpa(self.config, output_attentions):
            dropout = self.attention_dropout.p if (alibi is not None and self.training) else 0.0
            attn_output, probs = grouped_sdpa_attention(
                self, query, key, value, attention_mask, dropout=dropout
            )
            attn_output = attn_output.reshape(batch_size, query_length, self.num_heads * self.head_dim)
            return self.dense(attn_output), probs

        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        if alibi is None:
            scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_dim)
            probs = F.softmax(
                scores + additive_mask(attention_mask, scores.dtype), dim=-1, dtype=hidden_states.dtype
            )
        else:
            scores = query @ key.transpose(-1, -2)
            if scores.dtype in (torch.float16, torch.bfloat16):
                scores = scores.to(torch.float32)
            logits = (scores + alibi.view(batch_size, self.num_heads, 1, -1)) * self.inv_norm_factor
            probs = F.softmax(
                logits + additive_mask(attention_mask, logits.dtype), dim=-1, dtype=hidden_states.dtype
            )
            probs = self.attention_dropout(probs)
        attn_output = (probs @ value).permute(0, 2, 1, 3)
        attn_output = attn_output.reshape(batch_size, query_length, self.num_heads * self.head_dim)
        return self.dense(attn_output), probs


# -- Bloom -----------------------------------------------------------------------------------------------------------
def alibi_sdpa_mask(
    alibi: torch.Tensor, attention_mask: torch.Tensor | None, query_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """ALiBi `[b, H, 1, k]` and the model's mask (boolean `[b, 1, q, k]`, additive float, or None for plain
    causal attention) -> one additive float mask `[b, H, q, k]` for SDPA."""
    alibi = alibi.to(dtype)
    key_length = alibi.shape[-1]
    if attention_mask is None:
        attention_mask = torch.ones(query_length, key_length, dtype=torch.bool, device=alibi.device).tril(
            key_length - query_length
        )
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, alibi, torch.finfo(dtype).min)
    return alibi + attention_mask.to(dtype)


class BloomGQAAttention(BloomAttention):
    """Bloom self-attention with `num_kv_heads` key/value heads: `query_key_value` is `[(H + 2K) * d, hidden]`
    (+ bias) in the grouped layout (Bloom's own `[q_h, k_h, v_h]` is the case `K == H`). ALiBi per query head."""

    is_causal = True

    def __init__(self, config: PretrainedConfig, layer_idx: int | None, num_kv_heads: int) -> None:
        super().__init__(config, layer_idx)
        check_divides(self.num_heads, num_kv_heads)
        self.num_kv_heads = num_kv_heads
        self.num_key_value_groups = self.num_heads // num_kv_heads
        out_features = (self.num_heads + 2 * num_kv_heads) * self.head_dim
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
        """`hidden_states [b, s, hidden]` (+ `residual`), `alibi [b * H, 1, k]` -> `(output [b, s, hidden], probs
        [b, H, s, k] or None)`; the cache receives keys and values `[b, K, s, d]`."""
        cache = pop_cache(kwargs)
        batch_size, q_length, _ = hidden_states.shape
        fused_qkv = self.query_key_value(hidden_states)
        query, key, value = split_grouped_states(fused_qkv, self.num_heads, self.num_kv_heads, self.head_dim)
        if cache is not None:
            key, value = update_cache(cache, key, value, self.layer_idx, kwargs)

        # The mask tells which implementation the model built it for: eager masks are additive floats.
        if (attention_mask is None or attention_mask.dtype == torch.bool) and not output_attentions:
            mask = alibi_sdpa_mask(
                alibi.view(batch_size, self.num_heads, 1, -1), attention_mask, q_length, query.dtype
            )
            context, probs = grouped_sdpa_attention(
                self,
                query,
                key,
                value,
                mask,
                dropout=self.attention_dropout.p if self.training else 0.0,
                scaling=self.inv_norm_factor,
            )
            context = context.reshape(batch_size, q_length, self.num_heads * self.head_dim)
        else:
            context, probs = self._eager(query, key, value, alibi, attention_mask)

        if self.pretraining_tp > 1 and self.slow_but_exact:
            slices = self.hidden_size / self.pretraining_tp
            output = torch.zeros_like(context)
            for i in range(self.pretraining_tp):
                output = output + F.linear(
                    context[:, :, int(i * slices) : int((i + 1) * slices)],
                    self.dense.weight[:, int(i * slices) : int((i + 1) * slices)],
                )
        else:
            output = self.dense(context)
        return dropout_add(output, residual, self.hidden_dropout, self.training), probs

    def _eager(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        alibi: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bloom's eager attention: `query [b, H, q, d]`, `key` / `value` `[b, K, k, d]`, `alibi [b * H, 1, k]` ->
        `(context [b, q, H * d], probs [b, H, q, k])`."""
        batch_size, _, q_length, _ = query.shape
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        query_layer = query.reshape(batch_size * self.num_heads, -1, self.head_dim)
        key_layer = key.reshape(batch_size * self.num_heads, -1, self.head_dim).transpose(-1, -2)
        value_layer = value.reshape(batch_size * self.num_heads, -1, self.head_dim)
        scores = alibi.baddbmm(
            batch1=query_layer, batch2=key_layer, beta=self.beta, alpha=self.inv_norm_factor
        )
        weights = scores.view(batch_size, self.num_heads, q_length, -1)
        if attention_mask is not None:
            weights = weights + additive_mask(attention_mask, weights.dtype)
        probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(query_layer.dtype)
        probs = self.attention_dropout(probs)
        context = torch.bmm(probs.view(batch_size * self.num_heads, q_length, -1), value_layer)
        return self._merge_heads(context), probs


# -- the models --------------------------------------------------------------------------------------------------------
def kv_heads_per_layer(config: PretrainedConfig, layers: int) -> list[int]:
    """Key/value heads of each of `layers` attention layers, from hf_gqa's metadata in `config`."""
    meta = getattr(config, META_KEY, None)
    if not isinstance(meta, dict) or "kv_heads" not in meta:
        raise ValueError(
            f"this config has no {META_KEY!r} entry with 'kv_heads': it does not describe a model converted by "
            "hf_gqa, and these classes build nothing else."
        )
    if meta.get("version", 1) not in FORMAT_VERSIONS:
        raise ValueError(
            f"{META_KEY} metadata version {meta.get('version')} is newer than this modeling file reads "
            f"({FORMAT_VERSIONS}); save the checkpoint again with the hf_gqa that wrote it."
        )
    heads = [int(k) for k in meta["kv_heads"]]
    if len(heads) != layers:
        raise ValueError(f"{META_KEY}['kv_heads'] lists {len(heads)} layers; the model has {layers}.")
    return heads


def group_attention(
    model: PreTrainedModel,
    is_target: Callable[[nn.Module], bool],
    build: Callable[[PretrainedConfig, int | None, int], nn.Module],
) -> None:
    """Replace every module of `model` for which `is_target` holds (the self-attention modules, in layer order) by
    `build(config, layer_idx, kv_heads)`, with the key/value heads hf_gqa's metadata records for its layer."""
    config = model.config.get_text_config(decoder=True)
    targets = [(name, m) for name, m in model.named_modules() if is_target(m)]
    for (name, module), heads in zip(targets, kv_heads_per_layer(config, len(targets))):
        parent, _, attr = name.rpartition(".")
        layer_idx = getattr(module, "layer_idx", None)
        setattr(model.get_submodule(parent), attr, build(config, layer_idx, heads))


def use_base_model(model: PreTrainedModel, base_class: type[PreTrainedModel]) -> None:
    """Make `base_class(config)` the base model of the causal LM `model` (the attribute `base_model_prefix` names,
    so that parameter names and checkpoint keys stay the family's), then run `post_init` again: the tied LM head
    and the keys to ignore on load follow the new base model."""
    setattr(model, model.base_model_prefix, base_class(model.config))
    for name in (
        "_keys_to_ignore_on_load_unexpected",
        "_keys_to_ignore_on_load_missing",
        "_keys_to_ignore_on_save",
    ):
        model.__dict__.pop(name, None)  # gathered from the replaced base model by the first `post_init`
    model.post_init()


def is_gpt2_self_attention(module: nn.Module) -> bool:
    return isinstance(module, GPT2Attention) and not module.is_cross_attention


# Base models: what `AutoModel.from_pretrained(path, trust_remote_code=True)` returns, and what vLLM's Transformers
# backend builds (`AutoModel.from_config`; it adds its own LM head and KV cache). `_supports_attention_backend`:
# their attention modules dispatch through `ALL_ATTENTION_FUNCTIONS` once per forward, with an integer `layer_idx`
# and `scaling=` a literal or `self.scaling`, and reshape the output by the input's shape.
class GPT2GQAModel(GPT2Model):
    """GPT-2's base model with grouped-query self-attention (`GPT2GQAAttention`); cross-attention stays
    multi-head."""

    _supports_attention_backend = True
    # GPT-2's own `["attn.bias", "crossattention.bias"]`, anchored: vLLM's Transformers backend searches checkpoint
    # keys with them as regular expressions, and "attn.bias" also matches the real `h.0.attn.c_attn.bias`.
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.bias$", r"\.crossattention\.bias$"]

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        group_attention(self, is_gpt2_self_attention, GPT2GQAAttention)


class OPTGQAModel(OPTModel):
    """OPT's base model with grouped-query attention (`OPTGQAAttention`)."""

    _supports_attention_backend = True

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        group_attention(self, lambda m: isinstance(m, OPTAttention), OPTGQAAttention)


class GPTNeoXGQAModel(GPTNeoXModel):
    """GPT-NeoX / Pythia base model with grouped-query attention (`GPTNeoXGQAAttention`)."""

    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r"\.attention\.bias$", r"\.attention\.masked_bias$"]

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        group_attention(self, lambda m: isinstance(m, GPTNeoXAttention), GPTNeoXGQAAttention)


@contextmanager
def gptj_blocks_buildable(config: PretrainedConfig) -> Iterator[None]:
    """Build GPT-J's blocks whatever attention function `config` names.

    transformers before GPT-J's rewrite (5.23, and 5.19 in vLLM 0.32's environment) picks each block's attention
    class from `GPTJ_ATTENTION_CLASSES[config._attn_implementation]` (eager, flash-attention 2), which knows no other
    registered function: vLLM's "vllm" raises a `KeyError`. There the blocks are built eager; the grouped modules
    that replace their attention read `config._attn_implementation` (restored) at every call."""
    classes = getattr(modeling_gptj, "GPTJ_ATTENTION_CLASSES", None)
    implementation = config._attn_implementation
    if classes is None or implementation is None or implementation in classes:
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = implementation


class GPTJGQAModel(GPTJModel):
    """GPT-J's base model with grouped-query attention (`GPTJGQAAttention`)."""

    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.bias$", r"\.attn\.masked_bias$"]

    def __init__(self, config: PretrainedConfig) -> None:
        with gptj_blocks_buildable(config):
            super().__init__(config)
        group_attention(self, lambda m: isinstance(m, GPTJAttention), GPTJGQAAttention)


def check_old_falcon(config: PretrainedConfig) -> None:
    if config.new_decoder_architecture:
        raise ValueError(
            "The FalconGQA classes build Falcon of the old decoder architecture; a new-architecture checkpoint is "
            "natively GQA (config.num_kv_heads) and loads with transformers' Falcon classes."
        )


class FalconGQAModel(FalconModel):
    """Falcon's base model (old decoder architecture) with grouped-query attention (`FalconGQAAttention`). Its
    attention runs its own arithmetic (ALiBi or rotary), not the attention interface: vLLM's Transformers backend
    cannot serve it."""

    def __init__(self, config: PretrainedConfig) -> None:
        check_old_falcon(config)
        super().__init__(config)
        group_attention(self, lambda m: isinstance(m, FalconAttention), FalconGQAAttention)


class BloomGQAModel(BloomModel):
    """Bloom's base model with grouped-query attention (`BloomGQAAttention`; ALiBi, its own arithmetic: vLLM's
    Transformers backend cannot serve it)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        group_attention(self, lambda m: isinstance(m, BloomAttention), BloomGQAAttention)


# Causal LMs: the family's class with the grouped base model above (same parameter names, same checkpoint keys).
class GPT2GQALMHeadModel(GPT2LMHeadModel):
    """GPT-2 with grouped-query self-attention: `transformer` is a `GPT2GQAModel`."""

    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = GPT2GQAModel._keys_to_ignore_on_load_unexpected

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        use_base_model(self, GPT2GQAModel)


class OPTGQAForCausalLM(OPTForCausalLM):
    """OPT with grouped-query attention: `model` is an `OPTGQAModel`."""

    _supports_attention_backend = True

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        use_base_model(self, OPTGQAModel)


class GPTNeoXGQAForCausalLM(GPTNeoXForCausalLM):
    """GPT-NeoX / Pythia with grouped-query attention: `gpt_neox` is a `GPTNeoXGQAModel`."""

    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = GPTNeoXGQAModel._keys_to_ignore_on_load_unexpected

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        use_base_model(self, GPTNeoXGQAModel)


class GPTJGQAForCausalLM(GPTJForCausalLM):
    """GPT-J with grouped-query attention: `transformer` is a `GPTJGQAModel`."""

    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = GPTJGQAModel._keys_to_ignore_on_load_unexpected

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        use_base_model(self, GPTJGQAModel)


class FalconGQAForCausalLM(FalconForCausalLM):
    """Falcon of the old decoder architecture (multi-head or `multi_query`) with grouped-query attention:
    `transformer` is a `FalconGQAModel`. The new decoder architecture is natively GQA and loads without this file."""

    def __init__(self, config: PretrainedConfig) -> None:
        check_old_falcon(config)
        super().__init__(config)
        use_base_model(self, FalconGQAModel)


class BloomGQAForCausalLM(BloomForCausalLM):
    """Bloom with grouped-query attention: `transformer` is a `BloomGQAModel`."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        use_base_model(self, BloomGQAModel)


#: The causal-LM class of each `config.model_type` (Falcon: old decoder architecture only), for `config.json`'s
#: `auto_map["AutoModelForCausalLM"]`.
CAUSAL_LM_CLASSES: dict[str, type[PreTrainedModel]] = {
    "gpt2": GPT2GQALMHeadModel,
    "opt": OPTGQAForCausalLM,
    "gpt_neox": GPTNeoXGQAForCausalLM,
    "gptj": GPTJGQAForCausalLM,
    "falcon": FalconGQAForCausalLM,
    "bloom": BloomGQAForCausalLM,
}
#: The base-model class of each `config.model_type`, for `auto_map["AutoModel"]`.
BASE_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "gpt2": GPT2GQAModel,
    "opt": OPTGQAModel,
    "gpt_neox": GPTNeoXGQAModel,
    "gptj": GPTJGQAModel,
    "falcon": FalconGQAModel,
    "bloom": BloomGQAModel,
}
#: The families whose grouped attention dispatches through transformers' attention interface, so that vLLM's
#: Transformers backend serves them (Falcon's and Bloom's compute their own attention; Bloom's carries ALiBi).
ATTENTION_INTERFACE_FAMILIES = ("gpt2", "opt", "gpt_neox", "gptj")


def register_checkpoint_renamings() -> None:
    """Give each class above the checkpoint key renamings of the transformers class it extends.

    transformers renames keys between its classes and their checkpoints (GPT-NeoX saves `lm_head.` as `embed_out.`),
    but skips the renamings for classes outside transformers unless they are registered under the class's name.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers release without conversion mappings renames nothing
        return
    for cls in (*CAUSAL_LM_CLASSES.values(), *BASE_MODEL_CLASSES.values()):
        mapping = get_checkpoint_conversion_mapping(cls.__mro__[1].__name__)
        if mapping:
            register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)


register_checkpoint_renamings()
