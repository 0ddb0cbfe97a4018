"""GPT-2 (`GPT2Attention`): multi-head only in transformers, so conversion installs `GPT2GQAAttention`.

GPT-2 computes q, k and v with one `Conv1D` named `c_attn` of weight `[hidden, 3 * hidden]` (a `Conv1D` weight
is `[in, out]`, the transpose of an `nn.Linear` weight) whose output columns are three contiguous blocks
`q | k | v`, each `heads * head_dim` wide, head `h` at columns `h * head_dim:(h + 1) * head_dim` of its block.
`GPT2GQAAttention` keeps the names `c_attn` and `c_proj` (so that PEFT `target_modules` written for GPT-2 still
apply) and the same block layout with smaller key and value blocks:

    c_attn.weight: [hidden, H * d + 2 * K * d] = [q (H * d) | k (K * d) | v (K * d)]
    c_attn.bias:   [H * d + 2 * K * d]          in the same order

with `H` query heads, `K` key/value heads and `d = head_dim`. Query head `h` attends with key/value head
`h // (H // K)`. The cache stores only the `K` heads. With `K == H` this is GPT-2's own layout (plain transformers
loads such a checkpoint); with `K < H` plain transformers refuses the checkpoint (size mismatch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, eager_attention_forward
from transformers.pytorch_utils import Conv1D

from .. import compat
from ..canonical import AttentionWeights
from .base import AttentionAdapter, shallow_clone
from .shared import with_repeated_kv

eager_gqa_attention_forward = with_repeated_kv(eager_attention_forward)


class GPT2GQAAttention(GPT2Attention):
    """GPT-2 self-attention with `num_key_value_heads` key/value heads (grouped-query attention).

    `c_attn` is a `Conv1D` of weight `[hidden, H * d + 2 * K * d]` (blocks `q | k | v`), `c_proj` is unchanged
    (`[H * d, hidden]`). Everything else (scaling, `scale_attn_by_inverse_layer_idx`, `reorder_and_upcast_attn`,
    dropouts, attention dispatch) is GPT-2's. Self-attention only.
    """

    def __init__(self, config, layer_idx: int | None = None, num_key_value_heads: int | None = None) -> None:
        super().__init__(config, is_cross_attention=False, layer_idx=layer_idx)
        self.num_key_value_heads = num_key_value_heads or self.num_heads
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_heads={self.num_heads}."
            )
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.c_attn = Conv1D(self.embed_dim + 2 * self.num_key_value_heads * self.head_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states [b, s, hidden]` -> `(output [b, s, hidden], attention weights [b, H, s, k] or None)`.

        The cache (`cache=` or `past_key_values=`, as the transformers release names it) receives keys and values
        `[b, K, s, d]`.
        """
        cache = compat.pop_cache(kwargs)
        if encoder_hidden_states is not None:
            raise ValueError(
                "GPT2GQAAttention is self-attention only; cross-attention layers stay GPT2Attention."
            )
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache

        kv_size = self.num_key_value_heads * self.head_dim
        query_states, key_states, value_states = self.c_attn(hidden_states).split(
            [self.num_heads * self.head_dim, kv_size, kv_size], dim=2
        )
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query_states = query_states.view(shape).transpose(1, 2)
        key_states = key_states.view(shape).transpose(1, 2)
        value_states = value_states.view(shape).transpose(1, 2)

        if cache is not None:
            key_states, value_states = compat.update_cache(
                cache, key_states, value_states, self.layer_idx, kwargs
            )

        using_eager = self.config._attn_implementation == "eager"
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_gqa_attention_forward
        )

        if using_eager and self.reorder_and_upcast_attn:
            attn_output, attn_weights = self._upcast_and_reordered_attn(
                query_states,
                repeat_kv(key_states, self.num_key_value_groups),
                repeat_kv(value_states, self.num_key_value_groups),
                attention_mask,
            )
        else:
            attn_output, attn_weights = attention_interface(
                self,
                query_states,
                key_states,
                value_states,
                attention_mask,
                dropout=self.attn_dropout.p if self.training else 0.0,
                scaling=self.scaling,
                **kwargs,
            )

        attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()
        attn_output = self.c_proj(attn_output)
        attn_output = self.resid_dropout(attn_output)
        return attn_output, attn_weights


def new_conv1d(weight: torch.Tensor, bias: torch.Tensor, like: Conv1D) -> Conv1D:
    """A `Conv1D` holding `weight` `[in, out]` and `bias` `[out]`, on the device and dtype of `like`."""
    device, dtype = like.weight.device, like.weight.dtype
    with torch.device("meta"):
        conv = Conv1D(weight.shape[1], weight.shape[0])
    requires_grad = like.weight.requires_grad
    conv.weight = nn.Parameter(weight.detach().to(device=device, dtype=dtype).contiguous(), requires_grad)
    conv.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).contiguous(), requires_grad)
    conv.train(like.training)
    return conv


class GPT2Adapter(AttentionAdapter):
    """Converts `GPT2Attention` self-attention (and `GPT2GQAAttention`, to go further down) to `GPT2GQAAttention`."""

    family = "gpt2"
    lora_targets = ("c_attn", "c_proj")
    key_value_inputs = ("c_attn",)
    model_types = ("gpt2",)
    native_gqa = False
    attention_classes: ClassVar[tuple[type[nn.Module], ...]] = (GPT2Attention,)

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Self-attention modules only: cross-attention (`add_cross_attention=True`) stays multi-head."""
        return [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, GPT2Attention) and not m.is_cross_attention
        ]

    def num_heads(self, module: nn.Module) -> int:
        return module.num_heads

    def num_kv_heads(self, module: nn.Module) -> int:
        return getattr(module, "num_key_value_heads", module.num_heads)

    def head_dim(self, module: nn.Module) -> int:
        return module.head_dim

    def read(self, module: nn.Module) -> AttentionWeights:
        heads, kv_heads, d = self.num_heads(module), self.num_kv_heads(module), module.head_dim
        sizes = [heads * d, kv_heads * d, kv_heads * d]
        hidden = module.c_attn.weight.shape[0]
        q, k, v = module.c_attn.weight.split(sizes, dim=1)  # each [hidden, heads_of_block * d]
        q_bias, k_bias, v_bias = module.c_attn.bias.split(sizes)
        return AttentionWeights(
            q=q.t().reshape(heads, d, hidden),
            k=k.t().reshape(kv_heads, d, hidden),
            v=v.t().reshape(kv_heads, d, hidden),
            o=module.c_proj.weight.reshape(heads, d, hidden),
            q_bias=q_bias.reshape(heads, d),
            k_bias=k_bias.reshape(kv_heads, d),
            v_bias=v_bias.reshape(kv_heads, d),
            o_bias=module.c_proj.bias,
            rotary=None,
        )

    def build(self, module: nn.Module, weights: AttentionWeights) -> nn.Module:
        new = shallow_clone(module, cls=GPT2GQAAttention)
        blocks = [weights.q, weights.k, weights.v]
        biases = [weights.q_bias, weights.k_bias, weights.v_bias]
        biases = [b if b is not None else w.new_zeros(w.shape[:2]) for w, b in zip(blocks, biases)]
        c_attn_weight = torch.cat([w.reshape(-1, w.shape[-1]) for w in blocks], dim=0).t()
        new.c_attn = new_conv1d(c_attn_weight, torch.cat([b.reshape(-1) for b in biases]), like=module.c_attn)
        o_bias = weights.o_bias if weights.o_bias is not None else weights.o.new_zeros(weights.hidden_size)
        new.c_proj = new_conv1d(weights.o.reshape(-1, weights.hidden_size), o_bias, like=module.c_proj)
        new.num_key_value_heads = weights.num_kv_heads
        new.num_key_value_groups = weights.num_heads // weights.num_kv_heads
        return new


ADAPTERS = [GPT2Adapter()]
