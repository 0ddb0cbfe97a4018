"""The adapter interface: one small class per model family.

An adapter finds a family's attention modules, reads their weights into the canonical per-head layout
(`hf_gqa.canonical.AttentionWeights`) and builds the converted module from canonical weights. It never mutates
the module it reads: `build` returns a new module (which may share untouched submodules with the old one), so
that the patcher can swap all modules at once, or none.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..canonical import AttentionWeights


class AttentionAdapter:
    """Base class of the per-family adapters.

    Class attributes:
        family: short name shown to users ("llama", "gpt2", ...).
        model_types: the `config.model_type` values this adapter handles.
        native_gqa: whether the family's transformers class already supports fewer KV heads, so that a converted
            model saves as a standard checkpoint that plain transformers loads.
        attention_classes: the attention module classes to convert (the family's own and, for multi-head-only
            families, our GQA module, so that a patched model can be patched further).
        lora_targets: names, inside one attention module, of its q/k/v/output projections: what
            `hf_gqa.uptrain(method="lora")` adapts by default (resolved inside attention modules only, so that an
            MLP projection of the same name is left alone).
        key_value_inputs: names, inside one attention module, of the projections that compute keys or values
            (fused ones included): the only parts of a decoder layer that read every token position for the
            output at one position, so that a refine step scored on a few positions computes the rest of the
            layer on those positions only (`hf_gqa.refine.PositionSubset`).
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    native_gqa: ClassVar[bool] = False
    attention_classes: ClassVar[tuple[type[nn.Module], ...]] = ()
    lora_targets: ClassVar[tuple[str, ...]] = ()
    key_value_inputs: ClassVar[tuple[str, ...]] = ("k_proj", "v_proj")
    # The config attribute holding the KV head count, for families whose transformers class reads one
    # (`num_key_value_heads`, Falcon's `num_kv_heads`); None where the config cannot express it.
    kv_heads_config_key: ClassVar[str | None] = None
    # The family's transformers module loads a converted checkpoint but caches K/V repeated to every query head:
    # `hf_gqa.from_pretrained` then swaps in the adapter's module (Falcon's new decoder architecture).
    rebuild_on_load: ClassVar[bool] = False

    # -- discovery -------------------------------------------------------------------------------------------
    def matches_config(self, config: PretrainedConfig) -> bool:
        """Whether this adapter handles models of `config` (also used when loading, before a model exists)."""
        return getattr(config, "model_type", None) in self.model_types

    def matches(self, model: PreTrainedModel) -> bool:
        return self.matches_config(model.config)

    def attention_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The attention modules to convert, in layer order, as `(qualified name, module)`."""
        return [(name, m) for name, m in model.named_modules() if isinstance(m, self.attention_classes)]

    def check_model(self, model: PreTrainedModel) -> None:
        """Raise `UnsupportedArchitectureError` for configurations of this family that cannot be converted."""

    # -- per module ------------------------------------------------------------------------------------------
    def fold_blocker(self, module: nn.Module) -> str | None:
        """Why maps cannot be folded through `module`'s q/k/v projections (the activation-aware merges need
        that), or None where they can."""
        return None

    def num_heads(self, module: nn.Module) -> int:
        raise NotImplementedError

    def num_kv_heads(self, module: nn.Module) -> int:
        raise NotImplementedError

    def head_dim(self, module: nn.Module) -> int:
        raise NotImplementedError

    def read(self, module: nn.Module) -> AttentionWeights:
        """Canonical weights of `module` (new tensors or views; never modified by callers)."""
        raise NotImplementedError

    def build(self, module: nn.Module, weights: AttentionWeights) -> nn.Module:
        """A new attention module computing attention with `weights` (which may have fewer KV heads)."""
        raise NotImplementedError

    def rebuild(self, module: nn.Module, kv_heads: int) -> nn.Module:
        """An empty converted module with `kv_heads` KV heads and `module`'s layout, to load saved converted
        weights into (`hf_gqa.from_pretrained`): its tensors hold the first head of each group of `module`'s,
        meta tensors stay on the meta device."""
        from ..merging import merge_first

        return self.build(module, merge_first(self.read(module), kv_heads))

    # -- model level -----------------------------------------------------------------------------------------
    def config_updates(self, config: PretrainedConfig, kv_heads: list[int]) -> dict[str, object]:
        """Config attributes to set once every layer has `kv_heads[i]` KV heads (applied by the patcher)."""
        return {self.kv_heads_config_key: max(kv_heads)} if self.kv_heads_config_key else {}

    def restore_config(self, config: PretrainedConfig, meta: dict) -> None:
        """Put `config` back to the pre-conversion shape recorded in `meta` (used by `hf_gqa.from_pretrained`)."""
        if self.kv_heads_config_key:
            setattr(config, self.kv_heads_config_key, max(meta["original_kv_heads"]))


# -- helpers shared by adapters ---------------------------------------------------------------------------------
def shallow_clone(module: nn.Module, cls: type[nn.Module] | None = None) -> nn.Module:
    """A new module object sharing parameters and submodules with `module`, whose own dicts can be changed
    without touching `module`.

    Args:
        cls: the clone's class, when it differs from `module`'s (a subclass with its own `forward`).

    An accelerate hook on `module` (a model dispatched with a `device_map`) binds `module.forward` to `module`
    itself; it is attached anew to the clone, which would otherwise run the old module.
    """
    new = copy.copy(module)
    if cls is not None:
        new.__class__ = cls
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    hook = module.__dict__.get("_hf_hook")
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        for name in ("forward", "_old_forward", "_hf_hook"):
            new.__dict__.pop(name, None)
        add_hook_to_module(new, hook)
    return new


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """An `nn.Linear` holding `weight` `[out, in]` and `bias` `[out]`, on the device and dtype of `like`."""
    device, dtype = like.weight.device, like.weight.dtype
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(
        weight.detach().to(device=device, dtype=dtype).contiguous(), requires_grad=like.weight.requires_grad
    )
    if bias is not None:
        linear.bias = nn.Parameter(
            bias.detach().to(device=device, dtype=dtype).contiguous(), requires_grad=like.weight.requires_grad
        )
    linear.train(like.training)
    return linear
