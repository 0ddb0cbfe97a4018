"""GPT-NeoX / Pythia (`GPTNeoXAttention`): multi-head only in transformers, so conversion installs
`GPTNeoXGQAAttention`.

GPT-NeoX computes q, k and v with one `nn.Linear` named `query_key_value` whose output rows are interleaved per
head: `[q_0, k_0, v_0, q_1, k_1, v_1, ...]`, each part `head_dim` rows. `GPTNeoXGQAAttention` keeps the name
`query_key_value` (so that PEFT `target_modules` written for GPT-NeoX still apply) and generalises that
interleaving to groups: the rows are interleaved per **key/value head** `j`, each group holding the `r = H // K`
query heads that share it, then its key and its value (the grouped fused layout of Megatron-LM's GQA):

    query_key_value.weight: [K * (r + 2) * d, hidden] = rows [q_0 .. q_{r-1}, k_0, v_0,  q_r .. q_{2r-1}, k_1, v_1, ...]
    query_key_value.bias:   [K * (r + 2) * d]          in the same order

with `H` query heads, `K` key/value heads and `d = head_dim`; query head `h` attends with key/value head `h // r`.
With `K == H` (`r = 1`) this is exactly GPT-NeoX's own layout, so an identity conversion saves a checkpoint that
plain transformers loads correctly; with `K < H` the fused weight has fewer rows, so plain transformers refuses it
(size mismatch) instead of misreading it. The cache stores only the `K` heads. Rotary embeddings (partial: the
first `rotary_ndims` dimensions of each head, `rotate_half` pairs) act on q and k exactly as in GPT-NeoX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import (
    GPTNeoXAttention,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .. import compat
from ..canonical import AttentionWeights, RotarySpec, join_out_heads
from .base import AttentionAdapter, new_linear, shallow_clone
from .shared import join_grouped_qkv, read_grouped_fused, split_grouped_states, with_repeated_kv

eager_gqa_attention_forward = with_repeated_kv(eager_attention_forward)


class GPTNeoXGQAAttention(GPTNeoXAttention):
    """GPT-NeoX self-attention with `num_key_value_heads` key/value heads (grouped-query attention).

    `query_key_value`: `nn.Linear` of weight `[K * (r + 2) * d, hidden]`, rows grouped per key/value head as
    `[q heads of the group, k, v]` (see the module docstring); `dense`: `[hidden, H * d]`, unchanged. Everything
    else (partial rotary, scaling, dropout, attention dispatch) is GPT-NeoX's.
    """

    def __init__(self, config, layer_idx: int | None = None, num_key_value_heads: int | None = None) -> None:
        super().__init__(config, layer_idx)
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = num_key_value_heads or self.num_heads
        if self.num_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_heads={self.num_heads}."
            )
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        out_features = (self.num_heads + 2 * self.num_key_value_heads) * self.head_size
        self.query_key_value = nn.Linear(config.hidden_size, out_features, bias=config.attention_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states [b, s, hidden]` -> `(output [b, s, hidden], attention weights [b, H, s, k] or None)`.

        `position_embeddings`: `(cos, sin)`, each `[b, s, rotary_ndims]`. The cache (`layer_past=`) receives keys
        and values `[b, K, s, d]`.
        """
        cache = compat.pop_cache(kwargs)
        input_shape = hidden_states.shape[:-1]
        query_states, key_states, value_states = (
            split_grouped_states(  # [b, H, s, d], [b, K, s, d], [b, K, s, d]
                self.query_key_value(hidden_states), self.num_heads, self.num_key_value_heads, self.head_size
            )
        )

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

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
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.attention_dropout,
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.dense(attn_output)
        return attn_output, attn_weights


class GPTNeoXAdapter(AttentionAdapter):
    """Converts `GPTNeoXAttention` (and `GPTNeoXGQAAttention`, to go further down) to `GPTNeoXGQAAttention`.

    Both modules share one fused layout, grouped per key/value head (GPT-NeoX's own is the case `K == H`), so
    `read` and `build` need no case for either.
    """

    family = "gpt_neox"
    lora_targets = ("query_key_value", "dense")
    key_value_inputs = ("query_key_value",)
    model_types = ("gpt_neox",)
    native_gqa = False
    attention_classes: ClassVar[tuple[type[nn.Module], ...]] = (GPTNeoXAttention,)

    def num_heads(self, module: nn.Module) -> int:
        return module.dense.in_features // module.head_size

    def num_kv_heads(self, module: nn.Module) -> int:
        return getattr(module, "num_key_value_heads", self.num_heads(module))

    def head_dim(self, module: nn.Module) -> int:
        return module.head_size

    def read(self, module: nn.Module) -> AttentionWeights:
        rotary = RotarySpec(rotary_dim=module.rotary_ndims, interleaved=False)
        return read_grouped_fused(module, self.num_heads(module), self.num_kv_heads(module), rotary)

    def build(self, module: nn.Module, weights: AttentionWeights) -> nn.Module:
        weight, bias = join_grouped_qkv(weights)
        new = shallow_clone(module, cls=GPTNeoXGQAAttention)
        new.query_key_value = new_linear(weight, bias, like=module.query_key_value)
        new.dense = new_linear(join_out_heads(weights.o), weights.o_bias, like=module.dense)
        new.num_heads = weights.num_heads
        new.num_key_value_heads = weights.num_kv_heads
        new.num_key_value_groups = weights.num_heads // weights.num_kv_heads
        return new


ADAPTERS = [GPTNeoXAdapter()]
