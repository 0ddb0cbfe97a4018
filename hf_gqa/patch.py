"""`patch(model, groups)`: convert a model's attention to grouped-query attention, in place.

`patch` resolves what to do (the family adapter, the conversion method and what it needs, the attention
implementation), plans every layer, runs the data-free or the sequential calibrated pipeline, and applies the
result. Everything is validated and every new module is built before the model is touched; the swap itself is
undone if anything fails, so a failed call leaves the model exactly as it was.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .architectures import AttentionAdapter, get_adapter
from .attention import set_attention
from .budget import choose_heads
from .cache import install_cache
from .calibration import LayerStats, calibration_blocks
from .checks import check_attn_implementation, check_options
from .errors import GQAError, GroupsError, UnsupportedArchitectureError
from .grouping import CALIBRATED_GROUPINGS, GroupingFn, get_grouping
from .loading import forget_gguf_quantizer
from .methods import ConversionMethod, MergeFn, Refine, get_method
from .pipeline import layer_sensitivity, run_data_free, run_sequential
from .planning import LayerPlan, convert_weights, plan_layers
from .remote import install_save_hook

logger = logging.getLogger("hf_gqa")

META_KEY = "hf_gqa"
#: What `patch` uses when given calibration data and no method (the best method measured; see README).
DEFAULT_CALIBRATED_METHOD = "refine"
FORMAT_VERSION = 1


@dataclass
class Conversion:
    """Everything `patch` resolved before touching the model."""

    adapter: AttentionAdapter
    method: ConversionMethod
    grouping: str
    grouping_fn: GroupingFn
    blocks: torch.Tensor | None  # calibration token blocks `[n, block_size]`, or None (data-free)
    batch_size: int
    sequential: bool
    attn_implementation: str | None
    show_progress: bool

    def convert_layer(self, plan: LayerPlan, stats: LayerStats | None) -> nn.Module:
        """The converted module of one planned layer (not yet swapped in)."""
        weights = convert_weights(
            self.adapter.read(plan.module), plan.kv_heads_after, self.method, self.grouping_fn, stats
        )
        return self.adapter.build(plan.module, weights)


def patch(
    model: PreTrainedModel,
    groups: int | Sequence[int] | str,
    merge: str | MergeFn | None = None,
    grouping: str = "consecutive",
    calibration: object | None = None,
    tokenizer=None,
    *,
    method: str | ConversionMethod | None = None,
    calibration_tokens: int = 8192,
    block_size: int = 512,
    batch_size: int = 4,
    sequential: bool = True,
    seed: int = 0,
    kv_budget: float | None = None,
    attn_implementation: str | None = None,
    show_progress: bool = True,
    refine_steps: int | None = None,
    refine_lr: float | None = None,
    refine_target: str | None = None,
    refine_scope: str | None = None,
    refine_positions: int | None = None,
    refine_train: str | None = None,
    refine_warmup: int | None = None,
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
            `"mean"` without. `method=` is the same, and also takes a method object (`hf_gqa.methods.Refine(
            steps=300)`); pass one of the two.
        grouping: which KV heads share a group: `"consecutive"`, `"similarity"` (needs calibration) or another
            registered name.
        calibration: text, a list of texts, a `datasets.Dataset` with a `"text"` column, or token ids; enables
            the activation-aware merges. Text needs `tokenizer`.
        calibration_tokens, block_size, batch_size: how much calibration data, in blocks of how many tokens,
            run how many blocks at a time.
        sequential: calibrate each layer on the outputs of the already-converted layers before it.
        seed: makes calibration sampling and refinement deterministic.
        kv_budget: with `groups="auto"`, the fraction of the original KV-cache bytes to keep; the heads per layer
            minimise the summed output error of the converted attention blocks (see `hf_gqa.budget`).
        attn_implementation: attention implementation to set after conversion. By default a model on `"sdpa"`
            moves to `"hf_gqa_sdpa"` (identical numerics, no K/V copies for padded batches on CPU).
        refine_steps, refine_lr, refine_target, refine_scope, refine_positions, refine_train, refine_warmup: the
            short spelling of `method=Refine(steps=..., lr=..., target=..., scope=..., positions=..., train=...,
            warmup=...)` (see `hf_gqa.methods.Refine`); `refine_steps` with another merge refines from that merge
            (`merge="mean", refine_steps=100`).

    Returns:
        The same model object, converted. `generate()` then uses an `hf_gqa.GQACache`.

    Raises:
        GroupsError, UnsupportedArchitectureError, UnconvertibleWeightsError: before any weight is touched.
    """
    check_options(calibration_tokens, block_size, batch_size, refine_steps, kv_budget, groups)
    conversion = _resolve(
        model,
        groups == "auto",
        merge if method is None else method,
        merge is not None and method is not None,
        grouping,
        calibration,
        tokenizer,
        dict(
            steps=refine_steps,
            lr=refine_lr,
            target=refine_target,
            scope=refine_scope,
            positions=refine_positions,
            train=refine_train,
            warmup=refine_warmup,
        ),
        dict(tokens=calibration_tokens, block_size=block_size, seed=seed),
        batch_size,
        sequential,
        attn_implementation,
        show_progress,
    )
    plans = _plan(model, conversion, groups, kv_budget)
    replacements, logs = _run(model, conversion, plans)
    _apply(model, conversion, plans, replacements)
    model._hf_gqa_conversion_log = logs
    return model


# -- resolve ------------------------------------------------------------------------------------------------------
def _resolve(
    model: PreTrainedModel,
    auto: bool,
    spec: str | ConversionMethod | MergeFn | None,
    both_given: bool,
    grouping: str,
    calibration: object | None,
    tokenizer,
    refine: dict[str, object],
    data: dict[str, int],
    batch_size: int,
    sequential: bool,
    attn_implementation: object,
    show_progress: bool,
) -> Conversion:
    """Everything that can be decided before touching the model, each bad input refused with what to do."""
    if both_given:
        raise GQAError("pass merge= or method=, not both (method= is the newer spelling of merge=).")
    adapter = _adapter_for(model)
    attn_implementation = check_attn_implementation(model, attn_implementation)
    method = resolve_method(spec, refine, calibration is not None, adapter, model)
    grouping_fn = get_grouping(grouping)
    needs_data = method.needs_calibration or grouping in CALIBRATED_GROUPINGS
    if needs_data and calibration is None:
        raise GQAError(
            f"method {method.label!r} / grouping={grouping!r} need calibration data: pass calibration=texts, "
            "tokenizer=tokenizer (or merge='mean', which needs none)."
        )
    if calibration is None and method.name == "mean":
        _notice_once()
    blocks = None
    if needs_data or (auto and calibration is not None):
        blocks = calibration_blocks(
            calibration, tokenizer, data["tokens"], data["block_size"], data["seed"], vocab_size=_vocab(model)
        )
    return Conversion(
        adapter,
        method,
        grouping,
        grouping_fn,
        blocks,
        batch_size,
        sequential,
        attn_implementation,
        show_progress,
    )


def resolve_method(
    spec: str | ConversionMethod | MergeFn | None,
    refine: dict[str, object],
    calibrated: bool,
    adapter: AttentionAdapter,
    model: PreTrainedModel,
) -> ConversionMethod:
    """The method `patch` runs: `spec` (a name, a method object or a merge function), the default when None
    (`Refine()` with calibration data, mean pooling without), with the older `refine_*` keywords applied.

    The activation-aware merges fold maps through the query/key projections. Where the model forbids that (a
    per-head key norm, clipped q/k/v), the calibrated default refines a mean-pooled start instead, and an explicit
    request for such a method is refused here, before any data is read, naming what the caller asked for.
    """
    default = spec is None
    if default:
        spec = DEFAULT_CALIBRATED_METHOD if calibrated else "mean"
    settings = {key: value for key, value in refine.items() if value is not None}
    method = get_method(spec)
    if isinstance(method, Refine):
        method = get_method(method, **settings)
    elif settings.get("steps"):  # merge="mean", refine_steps=100: refine from that merge
        method = Refine(init=method, **settings)
    asked = f"merge={method.label if not isinstance(spec, str) else spec!r}"
    asked += " (the default with calibration data)" if default else ""
    blocker = _fold_blocker(adapter, model) if method.folds_maps else None
    if blocker and default and isinstance(method, Refine):
        logger.info("hf_gqa: %s cannot fold maps through %s; refining a mean-pooled start.", asked, blocker)
        return get_method(method, init=get_method("mean"))
    if blocker:
        raise GQAError(
            f"{asked} cannot fold maps through the query/key projections of this {adapter.family} model: its "
            f"{blocker} forbids it. Use merge='mean' with refine_steps=100 (mean pooling fitted on the "
            "calibration data), or merge='mean' / 'first' without calibration."
        )
    return method


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


def _vocab(model: PreTrainedModel) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None)


def _adapter_for(model: PreTrainedModel) -> AttentionAdapter:
    if not isinstance(model, PreTrainedModel):
        hint = " Patch the base model before wrapping it with PEFT." if hasattr(model, "peft_config") else ""
        raise UnsupportedArchitectureError(
            f"hf_gqa.patch expects a transformers PreTrainedModel, got {type(model).__name__}.{hint}"
        )
    return get_adapter(model)


# -- plan -----------------------------------------------------------------------------------------------------------
def _plan(
    model: PreTrainedModel, conversion: Conversion, groups: int | Sequence[int] | str, kv_budget: float | None
) -> list[LayerPlan]:
    """Per-layer plans; `groups="auto"` chooses the heads per layer from a measured sensitivity under `kv_budget`."""
    adapter = conversion.adapter
    if not isinstance(groups, str):
        return plan_layers(model, adapter, groups)
    if groups != "auto" or kv_budget is None or conversion.blocks is None:
        raise GroupsError(
            f"groups={groups!r}: use groups='auto' together with kv_budget=<fraction of the KV cache to keep> "
            "and calibration=texts, tokenizer=tokenizer; or give an int or a per-layer list."
        )
    plans = plan_layers(
        model, adapter, [adapter.num_kv_heads(m) for _, m in adapter.attention_modules(model)]
    )
    with _eval_mode(model):
        errors = layer_sensitivity(
            model,
            plans,
            conversion.convert_layer,
            conversion.blocks,
            conversion.batch_size,
            conversion.show_progress,
        )
    heads = choose_heads(errors, [p.kv_heads_before for p in plans], [p.head_dim for p in plans], kv_budget)
    logger.info("hf_gqa: KV heads per layer under kv_budget=%s: %s", kv_budget, heads)
    return plan_layers(model, adapter, heads)


# -- run ------------------------------------------------------------------------------------------------------------
def _run(model: PreTrainedModel, conversion: Conversion, plans: list[LayerPlan]):
    """The data-free or the sequential pipeline, as the method and grouping declare; model in eval mode meanwhile
    (no dropout in calibration or refinement), each replacement in the mode of the module it replaces."""
    with _eval_mode(model):
        if conversion.blocks is None:
            replacements, logs = run_data_free(model, plans, conversion.convert_layer), []
        else:
            method = conversion.method
            replacements, logs = run_sequential(
                model,
                plans,
                conversion.convert_layer,
                conversion.blocks,
                conversion.batch_size,
                conversion.sequential,
                method if isinstance(method, Refine) else None,
                conversion.show_progress,
                conversion.adapter.key_value_inputs,
            )
    for _, _, old, new in replacements:
        _copy_modes(old, new)
    return replacements, logs


class _eval_mode:
    """Context: `model` in eval mode, every submodule's own `training` flag restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = {name: m.training for name, m in self.model.named_modules()}
        self.model.eval()

    def __exit__(self, *exc) -> None:
        for name, m in self.model.named_modules():
            if name in self.modes:
                m.training = self.modes[name]


def _copy_modes(old: nn.Module, new: nn.Module) -> None:
    """Give a replacement module (and its new submodules) the train/eval mode of the module it replaces."""
    old_modes = {name: m.training for name, m in old.named_modules()}
    for name, m in new.named_modules():
        m.training = old_modes.get(name, old.training)


# -- apply ----------------------------------------------------------------------------------------------------------
def _apply(model: PreTrainedModel, conversion: Conversion, plans: list[LayerPlan], replacements) -> None:
    """Swap every module and set every config attribute, or roll it all back; then the cache and attention."""
    config = model.config.get_text_config(decoder=True)
    updates = converted_config(
        config, conversion.adapter, plans, conversion.method.label, conversion.grouping
    )
    _swap(model, replacements, updates)
    forget_gguf_quantizer(model)
    install_cache(model)
    install_save_hook(model)  # multi-head-only families save the modeling code that loads them without hf_gqa
    set_attention(model, conversion.attn_implementation)


def converted_config(
    config, adapter: AttentionAdapter, plans: list[LayerPlan], method_label: str, grouping: str
) -> dict[str, object]:
    """The attributes a converted model's (text) config gets: the family's KV head count and hf_gqa's metadata
    (`META_KEY`), which keeps the original KV heads across repeated conversions. Used by `patch` and by the
    streamed conversion of checkpoints."""
    previous = getattr(config, META_KEY, None) or {}
    updates = adapter.config_updates(config, [p.kv_heads_after for p in plans])
    updates[META_KEY] = {
        "version": FORMAT_VERSION,
        "family": adapter.family,
        "num_heads": [p.num_heads for p in plans],
        "head_dim": [p.head_dim for p in plans],
        "original_kv_heads": previous.get("original_kv_heads", [p.kv_heads_before for p in plans]),
        "kv_heads": [p.kv_heads_after for p in plans],
        "merge": method_label,
        "grouping": grouping,
    }
    return updates


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


def _swap(model: PreTrainedModel, replacements, updates: dict[str, object]) -> None:
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


def is_patched(model: PreTrainedModel) -> bool:
    """Whether `patch` converted this model (or it was loaded from a converted checkpoint)."""
    return getattr(model.config.get_text_config(decoder=True), META_KEY, None) is not None


__all__ = ["META_KEY", "Conversion", "is_patched", "patch", "resolve_method"]
