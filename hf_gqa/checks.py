"""Checks `patch` runs before anything is read, run or touched: options, the attention implementation, and
whether the attention weights can be converted at all."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .architectures.shared import SUPPORTED_IMPLEMENTATIONS
from .attention import ATTN_IMPLEMENTATION
from .errors import GQAError, GroupsError, UnconvertibleWeightsError


def check_options(
    calibration_tokens: int,
    block_size: int,
    batch_size: int,
    refine_steps: int | None,
    kv_budget: object,
    groups: object,
) -> None:
    """Reject bad numeric options before anything is read or run."""
    for name, value in (
        ("calibration_tokens", calibration_tokens),
        ("block_size", block_size),
        ("batch_size", batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GQAError(f"{name} must be a positive int, got {value!r}.")
    if refine_steps is not None and (
        isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0
    ):
        raise GQAError(f"refine_steps must be an int >= 0, got {refine_steps!r}.")
    if kv_budget is not None:
        if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, float)) or not 0 < kv_budget <= 1:
            raise GroupsError(
                f"kv_budget must be a number in (0, 1] (the fraction of the KV cache to keep), got {kv_budget!r}."
            )
        if groups != "auto":
            raise GroupsError("kv_budget goes with groups='auto'.")


def check_attn_implementation(model: PreTrainedModel, requested: object) -> str | None:
    """Validate `attn_implementation` before conversion: a name this model can run (installed, registered)."""
    if requested is None:
        return None
    if not isinstance(requested, str):
        raise GQAError(
            f"attn_implementation must be a string such as 'sdpa', 'eager' or {ATTN_IMPLEMENTATION!r}, "
            f"got {requested!r}."
        )
    if not type(model)._can_set_attn_implementation():  # our own modules dispatch (Falcon, Bloom, GPT-J 5.23)
        if requested not in SUPPORTED_IMPLEMENTATIONS:
            raise GQAError(
                f"attn_implementation={requested!r} is not available for {type(model).__name__}; choose one of "
                f"{[i for i in SUPPORTED_IMPLEMENTATIONS if i]}."
            )
        return requested
    try:
        return model.get_correct_attn_implementation(requested)
    except (ValueError, ImportError) as err:
        raise GQAError(f"attn_implementation={requested!r} cannot be used with this model: {err}") from err


def is_quantized_module(module: nn.Module) -> bool:
    """Whether `module` holds quantized layers: bitsandbytes, GPTQ/AWQ, FP8, or torch's own
    (`torch.ao.quantization.quantize_dynamic`, whose `Linear.weight` is a method, not a tensor)."""
    quantized_names = (
        "Linear8bitLt",
        "Linear4bit",
        "QuantLinear",
        "QLinear",
        "WQLinear",
        "QuantizedLinear",
        "FP8Linear",
    )
    for m in module.modules():
        name = type(m).__name__
        if name.startswith(quantized_names) or "Quant" in name:
            return True
        if ".quantized" in type(m).__module__ or callable(getattr(m, "weight", None)):
            return True
    return False


def lora_wrapped(module: nn.Module) -> str | None:
    """The qualified name of a PEFT adapter layer inside `module`, or None."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    return next((name for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)), None)


def is_dequantized_gguf(model: PreTrainedModel) -> bool:
    """GGUF checkpoints are de-quantized to a floating dtype when transformers loads them: plain weights."""
    method = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    return str(getattr(method, "quant_method", "")).lower().endswith("gguf")


def check_weights(model: PreTrainedModel, modules: list[tuple[str, nn.Module]]) -> None:
    """Refuse weights hf_gqa cannot convert: quantized (unless a de-quantized GGUF), PEFT adapter layers, meta
    (not loaded), non-floating, NaN or infinite."""
    quantized = getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None
    if quantized and not is_dequantized_gguf(model):
        raise UnconvertibleWeightsError(
            "This model's weights are quantized; hf_gqa cannot average quantized K/V projections. "
            "Load it in a floating dtype (e.g. dtype=torch.bfloat16 without a quantization_config), patch, "
            "then quantize the converted model."
        )
    for name, module in modules:
        if is_quantized_module(module):
            raise UnconvertibleWeightsError(
                f"{name} holds quantized layers; load the model unquantized, patch, then quantize."
            )
        adapter_layer = lora_wrapped(module)
        if adapter_layer is not None:
            raise UnconvertibleWeightsError(
                f"{name}.{adapter_layer} is a PEFT adapter layer: converting it would drop the trained adapter. "
                "Merge the adapters first (model = peft_model.merge_and_unload()), then patch."
            )
        for pname, p in module.named_parameters():
            if p.device.type == "meta":
                raise UnconvertibleWeightsError(
                    f"{name}.{pname} is on the meta device (weights not loaded or offloaded). Load the model with "
                    "its weights (no device_map offloading) before patching."
                )
            if not torch.is_floating_point(p):
                raise UnconvertibleWeightsError(
                    f"{name}.{pname} has dtype {p.dtype}; hf_gqa converts floating-point weights only. Load the "
                    "model unquantized, patch, then quantize."
                )
            if not bool(torch.isfinite(p).all()):
                raise UnconvertibleWeightsError(
                    f"{name}.{pname} holds NaN or infinite values; merging them would spread them to every head "
                    "of the group. Check the checkpoint (or the dtype it was loaded in) before patching."
                )
