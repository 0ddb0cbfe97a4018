"""Which parameters train for each uptraining method: LoRA wrapping, K/V-only masks, attention-only freezing.

    `"lora"`: a PEFT LoRA adapter on the converted attention projections of the family (`default_lora_targets`,
        from the family adapter's `lora_targets`); the result is a `peft.PeftModel`.
    `"kv"`: only the converted key/value projections train. Where a family fuses q, k and v in one weight
        (`c_attn`, `query_key_value`, `qkv_proj`), the whole fused weight has `requires_grad=True` but a gradient
        hook zeroes every entry that does not feed a key or value head (`kv_parameter_masks`), and those weights
        are kept out of weight decay, so the query rows stay bit-identical.
    `"attention"`: every parameter of the converted attention modules trains (`attention_parameter_names`);
        embeddings, MLPs and norms stay frozen.
    `"full"`: every parameter trains.

Which parameters hold a projection is found from the adapter's `read()`: an entry of a parameter feeds a canonical
tensor (`k`, `v`, ...) exactly when the canonical tensor's gradient with respect to it is nonzero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from ..architectures import AttentionAdapter, get_adapter
from ..errors import GQAError
from .config import METHODS


def base_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a `PeftModel` (or `model` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _read_dependence(
    adapter: AttentionAdapter, module: nn.Module, fields: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Which entries of `module`'s parameters the canonical `fields` (e.g. `k`, `v`) are read from.

    Differentiates the sum of the adapter's canonical tensors `fields` with respect to the module's parameters:
    an entry has a nonzero gradient exactly when a canonical entry is read from it (adapters read by reshaping
    and slicing). Returns `{parameter name relative to module: bool mask of the parameter's shape}` for every
    parameter with at least one such entry.
    """
    params = dict(module.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            weights = adapter.read(module)
            parts = [getattr(weights, f) for f in fields]
            total = sum(t.float().sum() for t in parts if t is not None)
            if not isinstance(total, torch.Tensor) or total.grad_fn is None:
                raise GQAError(
                    f"The {adapter.family} adapter's read() is not differentiable with respect to the module's "
                    "parameters, so hf_gqa cannot tell which parameters hold the key/value projections. Pass "
                    "target_modules= for LoRA, or use method='full'."
                )
            grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
    return {name: g != 0 for name, g in zip(params, grads) if g is not None and bool((g != 0).any())}


def kv_parameter_masks(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """The key/value projection parameters of every converted attention module.

    Returns `{qualified parameter name: mask}`, where `mask` is `None` when the whole parameter is a key/value
    projection (`k_proj.weight`), or a bool tensor of the parameter's shape marking the key/value rows of a fused
    projection (`c_attn.weight` `[hidden, H*d + 2*K*d]`: the last `2*K*d` columns).
    """
    base = base_model(model)
    adapter = get_adapter(base)
    masks: dict[str, torch.Tensor | None] = {}
    for name, module in adapter.attention_modules(base):
        for pname, mask in _read_dependence(adapter, module, ("k", "v", "k_bias", "v_bias")).items():
            masks[f"{name}.{pname}"] = None if bool(mask.all()) else mask
    return masks


def attention_projection_names(model: nn.Module) -> list[str]:
    """Short names of the submodules of an attention module that hold its q, k, v or output projections, found
    from the adapter's `read()` (e.g. `["k_proj", "o_proj", "q_proj", "v_proj"]`)."""
    base = base_model(model)
    adapter = get_adapter(base)
    modules = adapter.attention_modules(base)
    if not modules:
        return []
    fields = ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias")
    names = {pname.rpartition(".")[0] for pname in _read_dependence(adapter, modules[0][1], fields)}
    if "" in names:
        raise GQAError(
            f"{adapter.family} attention holds projection weights directly on the attention module; LoRA needs "
            "them in submodules. Pass target_modules= explicitly."
        )
    return sorted(names)


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def default_lora_targets(model: nn.Module) -> list[str]:
    """Qualified names of the attention projections that `uptrain(method="lora")` adapts by default.

    The short names are the family adapter's `lora_targets` (`get_adapter(model).lora_targets`), or, for an
    adapter that declares none, the submodules its `read()` takes q, k, v and o from
    (`attention_projection_names`). They are resolved inside each converted attention module, so that an MLP
    projection of the same short name is not adapted. Raises `GQAError` when none can be found.
    """
    base = base_model(model)
    adapter = get_adapter(base)
    short = tuple(getattr(adapter, "lora_targets", ())) or tuple(attention_projection_names(base))
    targets = []
    for name, module in adapter.attention_modules(base):
        targets.extend(f"{name}.{s}" for s in short if _has_submodule(module, s))
    if not targets:
        raise GQAError(
            f"No default LoRA targets for family {adapter.family!r}; pass target_modules= (names of the attention "
            "projections, e.g. ['q_proj', 'v_proj'])."
        )
    return targets


def _add_lora(
    model: PreTrainedModel,
    lora_r: int,
    lora_alpha: float | None,
    lora_dropout: float,
    target_modules: Sequence[str] | str | None,
) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    if target_modules is None:
        target_modules = default_lora_targets(model)
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_r,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _freeze_for_kv(model: nn.Module) -> tuple[list[torch.utils.hooks.RemovableHandle], list[str]]:
    """Freeze everything but the K/V projections; mask fused projections' gradients to their K/V entries.

    Returns the gradient hooks (to remove after training) and the names of the masked (fused) parameters.
    """
    masks = kv_parameter_masks(model)
    if not masks:
        raise GQAError("Found no key/value projection parameters to train.")
    hooks, fused = [], []
    for name, param in model.named_parameters():
        if name not in masks:
            param.requires_grad_(False)
            continue
        param.requires_grad_(True)
        mask = masks[name]
        if mask is not None:
            keep = mask.to(param.device)
            hooks.append(param.register_hook(lambda grad, keep=keep: grad * keep.to(grad.dtype)))
            fused.append(name)
    return hooks, fused


def attention_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of every parameter inside the converted attention modules (what `method="attention"`
    trains)."""
    base = base_model(model)
    adapter = get_adapter(base)
    return [
        f"{name}.{pname}"
        for name, module in adapter.attention_modules(base)
        for pname, _ in module.named_parameters()
    ]


def _freeze_outside_attention(model: nn.Module) -> None:
    """Freeze every parameter that is not inside a converted attention module."""
    names = set(attention_parameter_names(model))
    if not names:
        raise GQAError("Found no attention parameters to train.")
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


def prepare_for_method(
    model: nn.Module,
    method: str,
    lora_r: int = 16,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
) -> tuple[nn.Module, list[torch.utils.hooks.RemovableHandle], list[str]]:
    """Set which parameters train for `method`; returns `(model to train, gradient hooks, masked names)`.

    `"lora"` wraps `model` in a `PeftModel` (a `PeftModel` given is used as is); `"kv"` freezes all but the K/V
    projections (see `kv_parameter_masks`); `"attention"` freezes all but the converted attention modules;
    `"full"` makes every parameter trainable.
    """
    if method not in METHODS:
        raise GQAError(f"method must be one of {METHODS}, got {method!r}.")
    if method == "lora":
        if hasattr(model, "peft_config"):
            return model, [], []
        return _add_lora(model, lora_r, lora_alpha, lora_dropout, target_modules), [], []
    if hasattr(model, "peft_config"):
        raise ValueError(
            f"method={method!r} trains the model itself; pass the model before wrapping it with PEFT."
        )
    if method == "kv":
        hooks, fused = _freeze_for_kv(model)
        return model, hooks, fused
    if method == "attention":
        _freeze_outside_attention(model)
        return model, [], []
    for param in model.parameters():
        param.requires_grad_(True)
    return model, [], []


__all__ = [
    "attention_parameter_names",
    "attention_projection_names",
    "base_model",
    "default_lora_targets",
    "kv_parameter_masks",
    "prepare_for_method",
]
