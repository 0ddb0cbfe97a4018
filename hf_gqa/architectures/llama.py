"""Families whose transformers attention already supports `num_key_value_heads` with separate projections:
Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, OLMo (`q_proj, k_proj, v_proj, o_proj`) and Phi
(phi-1.5 / phi-2: `dense` output, partial rotary, optional per-head `qk_layernorm`).

OLMo2 is not supported: its `k_norm` is one RMSNorm over all KV heads together (weight `[K * d]`), so a
converted layer needs a merged norm weight, which the canonical layout does not carry.

Conversion only replaces `k_proj` / `v_proj` with smaller linears and sets `num_key_value_groups`; the
transformers forward infers the head count from the projection size, so a converted model is a standard
checkpoint of its family.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import PreTrainedModel

from ..canonical import (
    AttentionWeights,
)
from ..errors import UnsupportedArchitectureError
from .base import AttentionAdapter, shallow_clone
from .shared import (
    attention_classes_of,
    partial_rotary,
    read_separate_projections,
    set_separate_projections,
)


class SeparateProjectionAdapter(AttentionAdapter):
    """Native-GQA families with separate `q/k/v` linears and an output linear named `o_name`."""

    native_gqa = True
    kv_heads_config_key = "num_key_value_heads"
    q_name: ClassVar[str] = "q_proj"
    k_name: ClassVar[str] = "k_proj"
    v_name: ClassVar[str] = "v_proj"
    o_name: ClassVar[str] = "o_proj"

    def check_model(self, model: PreTrainedModel) -> None:
        """Refuse key norms that span several heads (weight `[K * d]`): resizing `k_proj` alone would break them."""
        for name, module in self.attention_modules(model):
            norm = getattr(module, "k_norm", None)
            weight = getattr(norm, "weight", None)
            if weight is not None and weight.numel() != module.head_dim:
                raise UnsupportedArchitectureError(
                    f"{name}.k_norm normalises all KV heads together (weight of {weight.numel()} values, head_dim "
                    f"{module.head_dim}); hf_gqa cannot convert {model.config.model_type!r} models."
                )

    def head_dim(self, module: nn.Module) -> int:
        return module.head_dim

    def num_heads(self, module: nn.Module) -> int:
        return getattr(module, self.q_name).out_features // module.head_dim

    def num_kv_heads(self, module: nn.Module) -> int:
        return getattr(module, self.k_name).out_features // module.head_dim

    def read(self, module: nn.Module) -> AttentionWeights:
        return read_separate_projections(
            module,
            (self.q_name, self.k_name, self.v_name, self.o_name),
            self.num_heads(module),
            self.num_kv_heads(module),
            partial_rotary(module),
            extras={"no_fold": self.fold_blocker(module)},
        )

    def fold_blocker(self, module: nn.Module) -> str | None:
        """A per-head normalisation of keys after the projection (Qwen3 `k_norm`, Phi `qk_layernorm`) or clipping
        of q/k/v (OLMo `clip_qkv`) makes the projection's output non-linear in the weights that the
        activation-aware merges rewrite."""
        if getattr(module, "k_norm", None) is not None or getattr(module, "k_layernorm", None) is not None:
            return "per-head key normalisation (q_norm/k_norm)"
        if getattr(module.config, "clip_qkv", None) is not None:
            return "clipping of q/k/v activations (clip_qkv)"
        return None

    def build(self, module: nn.Module, weights: AttentionWeights) -> nn.Module:
        new = shallow_clone(module)
        set_separate_projections(new, module, (self.q_name, self.k_name, self.v_name, self.o_name), weights)
        new.num_key_value_groups = weights.num_heads // weights.num_kv_heads
        if hasattr(module, "num_key_value_heads"):
            new.num_key_value_heads = weights.num_kv_heads
        return new


class LlamaAdapter(SeparateProjectionAdapter):
    family = "llama"
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo")
    attention_classes = attention_classes_of(
        "llama.modeling_llama:LlamaAttention",
        "mistral.modeling_mistral:MistralAttention",
        "qwen2.modeling_qwen2:Qwen2Attention",
        "qwen3.modeling_qwen3:Qwen3Attention",
        "gemma.modeling_gemma:GemmaAttention",
        "gemma2.modeling_gemma2:Gemma2Attention",
        "olmo.modeling_olmo:OlmoAttention",
    )


class PhiAdapter(SeparateProjectionAdapter):
    family = "phi"
    lora_targets = ("q_proj", "k_proj", "v_proj", "dense")
    model_types = ("phi",)
    o_name = "dense"
    attention_classes = attention_classes_of("phi.modeling_phi:PhiAttention")


ADAPTERS = [LlamaAdapter(), PhiAdapter()]
