"""`patch(model, groups)`: convert a model's attention to grouped-query attention, in place.

Everything is validated and every new module is built before the model is touched; the swap itself is undone if
anything fails, so a failed call leaves the model exactly as it was.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from . import attention
from .architectures import AttentionAdapter, get_adapter
from .architectures.shared import SUPPORTED_IMPLEMENTATIONS
from .budget import choose_heads
from .cache import install_cache
from .calibration import calibration_blocks
from .canonical import AttentionWeights
from .convert import convert_calibrated, layer_sensitivity
from .errors import GQAError, GroupsError, UnconvertibleWeightsError, UnsupportedArchitectureError
from .grouping import CALIBRATED_GROUPINGS, check_partition, get_grouping, permutation_of
from .merging import CALIBRATED_MERGES, MergeFn, get_merge

logger = logging.getLogger("hf_gqa")

META_KEY = "hf_gqa"
#: What `patch` uses when given calibration data and no `merge` (the best method measured; see README).
DEFAULT_CALIBRATED_MERGE = "refine"
DEFAULT_REFINE_STEPS = 100
FORMAT_VERSION = 1


@dataclass
class LayerPlan:
    """What the patcher will do to one attention module."""

    name: str
    module: nn.Module
    num_heads: int
    kv_heads_before: int
    kv_heads_after: int
    head_dim: int


def patch(
    model: PreTrainedModel,
    groups: int | Sequence[int] | str,
    merge: str | MergeFn | None = None,
    grouping: str = "consecutive",
    calibration: object | None = None,
    tokenizer=None,
    *,
    calibration_tokens: int = 8192,
    block_size: int = 512,
    batch_size: int = 4,
    sequential: bool = True,
    refine_steps: int | None = None,
    refine_lr: float = 3e-4,
    refine_target: str = "residual",
    refine_scope: str = "layer",
    seed: int = 0,
    kv_budget: float | None = None,
    stats: dict[str, object] | None = None,
    attn_implementation: str | None = None,
    show_progress: bool = True,
    _allow_meta: bool = False,
) -> PreTrainedModel:
    """Convert `model`'s attention to GQA with `groups` key/value heads, in place, and return it.

    Args:
        model: a transformers causal LM of a supported family (see `hf_gqa.supported_model_types()`).
        groups: KV heads after conversion: one number for every layer, a list with one per layer, or `"auto"`
            (with `kv_budget` and calibration data) to choose per layer. Each must divide the layer's current KV
            head count (the query head count for a multi-head model).
        merge: how a group's K/V heads become one: `"mean"` (Ainslie et al. 2023), `"first"`, `"pca"`, `"score"`,
            `"procrustes"`, `"refine"` (the data-aware ones need `calibration`), another registered name, or a
            function of canonical weights (see `hf_gqa.merging`). Default: `"refine"` with calibration data,
            `"mean"` without.
        grouping: which KV heads share a group: `"consecutive"`, `"similarity"` (needs calibration) or another
            registered name.
        calibration: text, a list of texts, a `datasets.Dataset` with a `"text"` column, or token ids; enables
            the activation-aware merges. Text needs `tokenizer`.
        calibration_tokens, block_size, batch_size: how much calibration data, in blocks of how many tokens,
            run how many blocks at a time.
        sequential: calibrate each layer on the outputs of the already-converted layers before it.
        refine_steps: optimiser steps per layer fitting the converted block to the original's output on the
            calibration inputs (`merge="refine"` defaults to 100 on top of `"score"`); `refine_lr` its rate.
        refine_target: what refinement fits, with sequential calibration: `"residual"` (the original model's
            attention output plus the residual-stream drift left by earlier converted layers), `"original"`
            (the original model's attention output on its own inputs) or `"local"` (the original block on the
            same inputs). See `hf_gqa.convert.REFINE_TARGETS`.
        refine_scope: `"layer"` (default) refines a copy of each decoder layer around the converted attention
            (attention, MLP and norms) against the original layer's output, so the MLP weights change too and
            help carry what fewer KV heads cannot; `"attention"` refines the converted attention block alone
            and leaves every other weight as it was. See `hf_gqa.convert.REFINE_SCOPES`.
        seed: makes calibration sampling and refinement deterministic.
        kv_budget: with `groups="auto"`, the fraction of the original KV-cache bytes to keep; the heads per layer
            minimise the summed output error of the converted attention blocks (see `hf_gqa.budget`).
        stats: precomputed per-module calibration statistics, keyed by module name (instead of `calibration`).
        attn_implementation: attention implementation to set after conversion. By default a model on `"sdpa"`
            moves to `"hf_gqa_sdpa"` (identical numerics, no K/V copies for padded batches on CPU).

    Returns:
        The same model object, converted. `generate()` then uses an `hf_gqa.GQACache`.

    Raises:
        GroupsError, UnsupportedArchitectureError, UnconvertibleWeightsError: before any weight is touched.
    """
    calibrated = calibration is not None or stats is not None
    _check_options(calibration_tokens, block_size, batch_size, refine_steps, kv_budget, groups)
    adapter = _adapter_for(model)
    attn_implementation = _check_attn_implementation(model, attn_implementation)
    merge, refine_steps = _resolve_merge(merge, refine_steps, calibrated, adapter, model)
    merge_fn = get_merge(merge)
    grouping_fn = get_grouping(grouping)
    auto = isinstance(groups, str)
    if auto and (groups != "auto" or kv_budget is None or calibration is None):
        raise GroupsError(
            f"groups={groups!r}: use groups='auto' together with kv_budget=<fraction of the KV cache to keep> "
            "and calibration=texts, tokenizer=tokenizer; or give an int or a per-layer list."
        )
    if auto:
        modules = adapter.attention_modules(model)
        groups = [adapter.num_kv_heads(m) for _, m in modules]
    plans = plan_layers(model, adapter, groups, allow_meta=_allow_meta)
    if merge in CALIBRATED_MERGES or grouping in CALIBRATED_GROUPINGS or refine_steps:
        if not calibrated:
            raise GQAError(
                f"merge={merge!r} / grouping={grouping!r} need calibration data: pass calibration=texts, "
                "tokenizer=tokenizer (or merge='mean', which needs none)."
            )
    elif not calibrated:
        _notice_once()
    if calibration is not None:
        blocks = calibration_blocks(
            calibration, tokenizer, calibration_tokens, block_size, seed, vocab_size=_vocab_size(model)
        )

    def convert_layer(plan: LayerPlan, layer_stats: object | None) -> nn.Module:
        weights = convert_weights(
            adapter.read(plan.module), plan.kv_heads_after, merge_fn, grouping_fn, layer_stats
        )
        return adapter.build(plan.module, weights)

    modes = _eval_mode(model)  # calibration, refinement and sensitivity run without dropout
    try:
        if auto:
            errors = layer_sensitivity(model, plans, convert_layer, blocks, batch_size, show_progress)
            heads = choose_heads(
                errors, [p.kv_heads_before for p in plans], [p.head_dim for p in plans], kv_budget
            )
            plans = plan_layers(model, adapter, heads, allow_meta=_allow_meta)
            logger.info("hf_gqa: KV heads per layer under kv_budget=%s: %s", kv_budget, heads)
        if calibration is not None:
            replacements, logs = convert_calibrated(
                model,
                adapter,
                plans,
                convert_layer,
                blocks,
                batch_size,
                sequential,
                refine_steps or 0,
                refine_lr,
                show_progress,
                refine_target,
                refine_scope,
            )
        else:
            replacements, logs = [], []
            for plan in plans:
                parent_name, _, attr = plan.name.rpartition(".")
                new = convert_layer(plan, (stats or {}).get(plan.name))
                replacements.append((model.get_submodule(parent_name), attr, plan.module, new))
    finally:
        _restore_modes(model, modes)
    for _, _, old, new in replacements:
        _copy_modes(old, new)

    config = model.config.get_text_config(decoder=True)
    kv_after = [p.kv_heads_after for p in plans]
    updates = adapter.config_updates(config, kv_after)
    updates[META_KEY] = _metadata(
        config, adapter, plans, merge if not refine_steps else f"{merge}+refine", grouping
    )
    _apply(model, replacements, updates)

    model._hf_gqa_conversion_log = logs
    forget_gguf_quantizer(model)
    install_cache(model)
    _set_attention(model, attn_implementation)
    return model


def _resolve_merge(
    merge, refine_steps: int | None, calibrated: bool, adapter: AttentionAdapter, model: PreTrainedModel
) -> tuple[str | MergeFn, int | None]:
    """`merge=None` means the best method the inputs allow; `"refine"` is `"score"` plus refinement steps.

    The activation-aware merges fold maps through the query/key projections. Where the model forbids that (a
    per-head key norm, clipped q/k/v), the calibrated default refines a mean-pooled start instead, and an explicit
    request for such a merge is refused here, before any data is read, naming what the caller asked for.
    """
    default = merge is None
    if default:
        merge = DEFAULT_CALIBRATED_MERGE if calibrated else "mean"
    asked = f"merge={merge!r}" + (" (the default with calibration data)" if default else "")
    folding = merge == "refine" or merge in CALIBRATED_MERGES
    blocker = _fold_blocker(adapter, model) if folding else None
    if blocker and default:
        logger.info("hf_gqa: %s cannot fold maps through %s; refining a mean-pooled start.", asked, blocker)
        return "mean", DEFAULT_REFINE_STEPS if refine_steps is None else refine_steps
    if blocker:
        raise GQAError(
            f"{asked} cannot fold maps through the query/key projections of this {adapter.family} model: its "
            f"{blocker} forbids it. Use merge='mean' with refine_steps=100 (mean pooling fitted on the "
            "calibration data), or merge='mean' / 'first' without calibration."
        )
    if merge == "refine":
        return "score", DEFAULT_REFINE_STEPS if refine_steps is None else refine_steps
    return merge, refine_steps


def _fold_blocker(adapter: AttentionAdapter, model: PreTrainedModel) -> str | None:
    """Why maps cannot be folded through the model's q/k/v projections, or None (see `fold_blocker`)."""
    modules = adapter.attention_modules(model)
    return adapter.fold_blocker(modules[0][1]) if modules else None


_NOTICE_SHOWN = False


def _notice_once() -> None:
    global _NOTICE_SHOWN
    if not _NOTICE_SHOWN:
        _NOTICE_SHOWN = True
        logger.warning(
            "hf_gqa: converting by mean pooling (no calibration data); for a model that keeps working before "
            "uptraining pass calibration=texts, tokenizer=tokenizer."
        )


def _check_options(
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


def _check_attn_implementation(model: PreTrainedModel, requested: object) -> str | None:
    """Validate `attn_implementation` before conversion: a name this model can run (installed, registered)."""
    if requested is None:
        return None
    if not isinstance(requested, str):
        raise GQAError(
            f"attn_implementation must be a string such as 'sdpa', 'eager' or {attention.ATTN_IMPLEMENTATION!r}, "
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


def _vocab_size(model: PreTrainedModel) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None)


def _eval_mode(model: nn.Module) -> dict[str, bool]:
    """Put `model` in eval mode; return each submodule's former `training` flag by name."""
    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    return modes


def _restore_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    for name, m in model.named_modules():
        if name in modes:
            m.training = modes[name]


def _copy_modes(old: nn.Module, new: nn.Module) -> None:
    """Give a replacement module (and its new submodules) the train/eval mode of the module it replaces."""
    old_modes = {name: m.training for name, m in old.named_modules()}
    for name, m in new.named_modules():
        m.training = old_modes.get(name, old.training)


def _adapter_for(model: PreTrainedModel) -> AttentionAdapter:
    if not isinstance(model, PreTrainedModel):
        hint = " Patch the base model before wrapping it with PEFT." if hasattr(model, "peft_config") else ""
        raise UnsupportedArchitectureError(
            f"hf_gqa.patch expects a transformers PreTrainedModel, got {type(model).__name__}.{hint}"
        )
    return get_adapter(model)


def plan_layers(
    model: PreTrainedModel, adapter: AttentionAdapter, groups: int | Sequence[int], allow_meta: bool = False
) -> list[LayerPlan]:
    """Validate `groups` against every attention module and the weights; touch nothing."""
    modules = adapter.attention_modules(model)
    if not modules:
        raise UnsupportedArchitectureError(
            f"No {adapter.family} attention modules found in {type(model).__name__}; was it built by transformers?"
        )
    _check_weights(model, modules, allow_meta)
    targets = _targets(groups, len(modules))
    plans = []
    for i, ((name, module), g) in enumerate(zip(modules, targets)):
        heads, kv = adapter.num_heads(module), adapter.num_kv_heads(module)
        _check_groups(i, g, heads, kv)
        plans.append(LayerPlan(name, module, heads, kv, g, adapter.head_dim(module)))
    return plans


def _targets(groups: int | Sequence[int], layers: int) -> list[int]:
    if isinstance(groups, bool) or not isinstance(groups, (int, Sequence)) or isinstance(groups, str):
        raise GroupsError(
            f"groups must be a positive int or a list of {layers} ints (one per layer), got {groups!r}."
        )
    if isinstance(groups, int):
        return [groups] * layers
    targets = list(groups)
    if len(targets) != layers:
        raise GroupsError(f"groups has {len(targets)} entries but the model has {layers} attention layers.")
    if not all(isinstance(g, int) and not isinstance(g, bool) for g in targets):
        raise GroupsError(f"groups must hold ints, got {targets!r}.")
    return targets


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_groups(layer: int, g: int, heads: int, kv: int) -> None:
    if g < 1:
        raise GroupsError(
            f"groups must be at least 1 (1 = multi-query attention), got {g} for layer {layer}."
        )
    if kv == heads:
        if g > heads:
            raise GroupsError(
                f"groups={g} exceeds the {heads} query heads of layer {layer}; choose one of {_divisors(heads)}."
            )
        if heads % g:
            raise GroupsError(
                f"groups={g} does not divide the {heads} query heads of layer {layer}; choose one of {_divisors(heads)}."
            )
        return
    if g > kv or kv % g:
        raise GroupsError(
            f"layer {layer} already has {kv} KV heads for {heads} query heads (a GQA model, or already patched): "
            f"groups={g} must divide {kv}; choose one of {_divisors(kv)}."
        )


def _is_quantized_module(module: nn.Module) -> bool:
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


def _lora_wrapped(module: nn.Module) -> str | None:
    """The qualified name of a PEFT adapter layer inside `module`, or None."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    return next((name for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)), None)


def _is_dequantized_gguf(model: PreTrainedModel) -> bool:
    """GGUF checkpoints are de-quantized to a floating dtype when transformers loads them: plain weights."""
    method = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    return str(getattr(method, "quant_method", "")).lower().endswith("gguf")


def forget_gguf_quantizer(model: PreTrainedModel) -> None:
    """Drop the GGUF marker of a de-quantized model, so that it saves as an ordinary float checkpoint."""
    if _is_dequantized_gguf(model):
        model.hf_quantizer = None
        if "is_quantized" in model.__dict__:  # set as a plain attribute when transformers loads a GGUF file
            model.is_quantized = False
        model.config.__dict__.pop("quantization_config", None)


def _check_weights(
    model: PreTrainedModel, modules: list[tuple[str, nn.Module]], allow_meta: bool = False
) -> None:
    quantized = getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None
    if quantized and not _is_dequantized_gguf(model):
        raise UnconvertibleWeightsError(
            "This model's weights are quantized; hf_gqa cannot average quantized K/V projections. "
            "Load it in a floating dtype (e.g. dtype=torch.bfloat16 without a quantization_config), patch, "
            "then quantize the converted model."
        )
    for name, module in modules:
        if _is_quantized_module(module):
            raise UnconvertibleWeightsError(
                f"{name} holds quantized layers; load the model unquantized, patch, then quantize."
            )
        adapter_layer = _lora_wrapped(module)
        if adapter_layer is not None:
            raise UnconvertibleWeightsError(
                f"{name}.{adapter_layer} is a PEFT adapter layer: converting it would drop the trained adapter. "
                "Merge the adapters first (model = peft_model.merge_and_unload()), then patch."
            )
        for pname, p in module.named_parameters():
            if p.device.type == "meta" and not allow_meta:
                raise UnconvertibleWeightsError(
                    f"{name}.{pname} is on the meta device (weights not loaded or offloaded). Load the model with "
                    "its weights (no device_map offloading) before patching."
                )
            if not torch.is_floating_point(p):
                raise UnconvertibleWeightsError(
                    f"{name}.{pname} has dtype {p.dtype}; hf_gqa converts floating-point weights only. Load the "
                    "model unquantized, patch, then quantize."
                )
            if p.device.type != "meta" and not bool(torch.isfinite(p).all()):
                raise UnconvertibleWeightsError(
                    f"{name}.{pname} holds NaN or infinite values; merging them would spread them to every head "
                    "of the group. Check the checkpoint (or the dtype it was loaded in) before patching."
                )


def convert_weights(
    weights: AttentionWeights, groups: int, merge_fn: MergeFn, grouping_fn, stats: object | None
) -> AttentionWeights:
    """Group and merge one layer's canonical weights down to `groups` KV heads."""
    partition = grouping_fn(weights, groups, stats)
    check_partition(partition, weights.num_kv_heads)
    order = permutation_of(partition)
    if order != list(range(weights.num_kv_heads)):
        weights = weights.permute_kv(order)
    merged = merge_fn(weights, groups, stats)
    if merged.num_kv_heads != groups or merged.k.shape[1:] != weights.k.shape[1:]:
        raise GQAError(f"merge returned K of shape {tuple(merged.k.shape)}, expected {groups} heads")
    return merged


def _metadata(config, adapter: AttentionAdapter, plans: list[LayerPlan], merge, grouping) -> dict:
    previous = getattr(config, META_KEY, None) or {}
    return {
        "version": FORMAT_VERSION,
        "family": adapter.family,
        "num_heads": [p.num_heads for p in plans],
        "head_dim": [p.head_dim for p in plans],
        "original_kv_heads": previous.get("original_kv_heads", [p.kv_heads_before for p in plans]),
        "kv_heads": [p.kv_heads_after for p in plans],
        "merge": merge if isinstance(merge, str) else getattr(merge, "__name__", "custom"),
        "grouping": grouping,
    }


def _own_config(model: PreTrainedModel) -> list[tuple[dict, str, object]]:
    """Give `model` a config object of its own (a deep copy), so that conversion never writes into a config that
    another model shares (two models built from one config object). Every module attribute that held the old
    config, or one of its sub-configs, now holds the copy's. Returns `(module __dict__, key, old value)` to undo."""
    old = model.config
    new = copy.deepcopy(old)
    mapping = {id(old): new}
    old_text, new_text = old.get_text_config(decoder=True), new.get_text_config(decoder=True)
    mapping[id(old_text)] = new_text
    for key in getattr(old, "sub_configs", {}) or {}:
        if getattr(old, key, None) is not None:
            mapping[id(getattr(old, key))] = getattr(new, key)
    undo = []
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if id(value) in mapping:
                undo.append((vars(module), key, value))
                vars(module)[key] = mapping[id(value)]
    return undo


def _apply(model: PreTrainedModel, replacements, updates: dict[str, object]) -> None:
    """Swap every module and set every config attribute (on a config the model owns alone), or roll it all back."""
    done = []
    undo_config: list[tuple[dict, str, object]] = []
    try:
        for parent, attr, old, new in replacements:
            setattr(parent, attr, new)
            done.append((parent, attr, old))
        undo_config = _own_config(model)
        config = model.config.get_text_config(decoder=True)
        for key, value in updates.items():
            setattr(config, key, value)
    except Exception:
        for parent, attr, old in reversed(done):
            setattr(parent, attr, old)
        for owner, key, value in undo_config:
            owner[key] = value
        raise


def _set_attention(model: PreTrainedModel, attn_implementation: str | None) -> None:
    """Set the (already validated) attention implementation; by default move `"sdpa"` to `"hf_gqa_sdpa"`."""
    current = getattr(model.config, "_attn_implementation", None)
    settable = type(model)._can_set_attn_implementation()
    target = attn_implementation or (
        attention.ATTN_IMPLEMENTATION if current == "sdpa" and settable else None
    )
    if not target or target == current:
        return
    if settable:
        model.set_attn_implementation(target)
    else:  # families whose own attention code (ours, after patching) reads the config directly
        model.config._attn_implementation = target


def is_patched(model: PreTrainedModel) -> bool:
    """Whether `patch` converted this model (or it was loaded from a converted checkpoint)."""
    return getattr(model.config.get_text_config(decoder=True), META_KEY, None) is not None
