"""Phi-3 (`Phi3Attention`): one fused `qkv_proj` whose output rows are `[q (H * d) | k (K * d) | v (K * d)]`,
and an `o_proj` output.

The transformers forward slices the fused output with `config.num_attention_heads` and the module's own
`num_key_value_heads`, so conversion rebuilds `qkv_proj` with the smaller key/value blocks and sets
`num_key_value_heads` / `num_key_value_groups` on the module: a uniformly converted model is a standard Phi-3
checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from ..canonical import (
    AttentionWeights,
    join_bias,
    join_heads,
    join_out_heads,
    split_bias,
    split_heads,
    split_out_heads,
)
from .base import AttentionAdapter, new_linear, shallow_clone
from .shared import attention_classes_of, partial_rotary


class Phi3Adapter(AttentionAdapter):
    """Phi-3 / Phi-3.5 / Phi-4 text models (`model_type == "phi3"`)."""

    family = "phi3"
    lora_targets = ("qkv_proj", "o_proj")
    key_value_inputs = ("qkv_proj",)
    model_types = ("phi3",)
    native_gqa = True
    kv_heads_config_key = "num_key_value_heads"
    attention_classes = attention_classes_of("phi3.modeling_phi3:Phi3Attention")

    def head_dim(self, module: nn.Module) -> int:
        return module.head_dim

    def num_heads(self, module: nn.Module) -> int:
        return module.config.num_attention_heads

    def num_kv_heads(self, module: nn.Module) -> int:
        return module.num_key_value_heads

    def _split_rows(
        self, module: nn.Module, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused `[(H + 2K) * d, ...]` rows -> `q [H * d, ...]`, `k [K * d, ...]`, `v [K * d, ...]`."""
        d = module.head_dim
        q_rows, kv_rows = self.num_heads(module) * d, self.num_kv_heads(module) * d
        return t[:q_rows], t[q_rows : q_rows + kv_rows], t[q_rows + kv_rows :]

    def read(self, module: nn.Module) -> AttentionWeights:
        heads, kv_heads = self.num_heads(module), self.num_kv_heads(module)
        qkv, o = module.qkv_proj, module.o_proj
        q, k, v = self._split_rows(module, qkv.weight)
        q_bias, k_bias, v_bias = self._split_rows(module, qkv.bias) if qkv.bias is not None else (None,) * 3
        return AttentionWeights(
            q=split_heads(q, heads),
            k=split_heads(k, kv_heads),
            v=split_heads(v, kv_heads),
            o=split_out_heads(o.weight, heads),
            q_bias=split_bias(q_bias, heads),
            k_bias=split_bias(k_bias, kv_heads),
            v_bias=split_bias(v_bias, kv_heads),
            o_bias=o.bias,
            rotary=partial_rotary(module),
        )

    def build(self, module: nn.Module, weights: AttentionWeights) -> nn.Module:
        """A new module whose `qkv_proj` is `[(H + 2G) * d, D]` for the `G` KV heads of `weights`."""
        new = shallow_clone(module)
        weight = torch.cat([join_heads(weights.q), join_heads(weights.k), join_heads(weights.v)], dim=0)
        biases = (weights.q_bias, weights.k_bias, weights.v_bias)
        bias = None if module.qkv_proj.bias is None else torch.cat([join_bias(b) for b in biases], dim=0)
        new.qkv_proj = new_linear(weight, bias, like=module.qkv_proj)
        new.o_proj = new_linear(join_out_heads(weights.o), weights.o_bias, like=module.o_proj)
        new.num_key_value_heads = weights.num_kv_heads
        new.num_key_value_groups = weights.num_heads // weights.num_kv_heads
        return new


ADAPTERS = [Phi3Adapter()]
