"""The two conversion pipelines `patch` chooses between, from what the method declares it needs.

- `run_data_free`: every layer converted from its weights alone (mean pooling, first head, custom merges).
- `run_sequential`: layer by layer on real activations. The decoder layers are replayed one at a time on stored
  hidden states (captured once at the input of each layer's call, with that layer's own keyword arguments: masks,
  position embeddings). For each layer the attention input statistics are gathered, the layer is grouped, merged
  and, for `Refine`, fitted, and the next layer's input is computed with the converted layer (sequential) or the
  original one.

Both return the module replacements without applying them: `patch` swaps them all in at once, or none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import PretrainedConfig

from . import compat
from .calibration import LayerStats, collect_attention_stats, progress, run_layer, with_hidden
from .methods import Refine
from .refine import PositionSubset, refine_module

logger = logging.getLogger("hf_gqa")


class _Stop(Exception):
    pass


#: A module swap: `(parent, attribute name, old module, new module)`.
Replacement = tuple[nn.Module, str, nn.Module, nn.Module]
ConvertLayer = Callable[[object, "LayerStats | None"], nn.Module]


def run_data_free(model: nn.Module, plans: list, convert_layer: ConvertLayer) -> list[Replacement]:
    """Convert each planned attention module from its weights alone; returns the replacements."""
    replacements = []
    for plan in plans:
        parent_name, _, attr = plan.name.rpartition(".")
        replacements.append((model.get_submodule(parent_name), attr, plan.module, convert_layer(plan, None)))
    return replacements


def _original_step(
    attention: nn.Module,
    layer: nn.Module,
    calls: list[tuple[tuple, dict]],
    original_hidden: list[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One step of the original model's own trajectory: the original `layer` (holding its original `attention`)
    run once on `original_hidden`. Returns `(attention outputs, layer outputs)`, per captured batch."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        outputs.append((output[0] if isinstance(output, (tuple, list)) else output).detach())

    handle = attention.register_forward_hook(hook, with_kwargs=True)
    try:
        next_hidden = [run_layer(layer, *with_hidden(a, k, h)) for (a, k), h in zip(calls, original_hidden)]
    finally:
        handle.remove()
    return outputs, next_hidden


def _drift_targets(
    attention_outputs: list[torch.Tensor],
    original_hidden: list[torch.Tensor],
    hidden: list[torch.Tensor],
    refine_target: str,
) -> list[torch.Tensor]:
    """Targets for the converted attention block from the original model's own trajectory."""
    if refine_target == "residual":
        return [
            o + (h_orig - h).to(o.dtype) for o, h_orig, h in zip(attention_outputs, original_hidden, hidden)
        ]
    return attention_outputs


def _release(
    release_original: Callable[[str], None] | None, attention_name: str, settings: SequentialSettings
) -> Callable[[], None] | None:
    """What `_refine_layer` calls once its copy exists: `release_original` of the decoder layer holding
    `attention_name` or of the attention alone, as `settings` allow (see `sequential_step`)."""
    if release_original is None:
        return None
    if settings.frees_original_layer:
        return partial(release_original, attention_name.rpartition(".")[0])
    if settings.frees_original_attention:
        return partial(release_original, attention_name)
    return None


def _refine_layer(
    layer: nn.Module,
    parent: nn.Module,
    attr: str,
    new: nn.Module,
    layer_calls: list[tuple[tuple, dict]],
    targets: list[torch.Tensor],
    refine: Refine,
    seed: int,
    key_value_inputs: tuple[str, ...],
    outputs: list[torch.Tensor] | None = None,
    release: Callable[[], None] | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """A copy of decoder `layer` holding the converted attention `new` (in place of `parent.attr`), refined as a
    whole to `targets` on `layer_calls` (with `refine.train == "attention"` the copy shares every other parameter
    with `layer` and only the attention is trained); `release`, if given, is called once the copy exists (the
    caller may free `layer`'s weights: the fit needs only the copy and `targets`); the copy's outputs on `layer_calls` are appended to `outputs`. `layer`
    itself is left as it was. The copy shares the model's config objects (a copied config would not follow
    later changes of the model's, such as its attention implementation)."""
    import copy

    old = getattr(parent, attr)
    setattr(parent, attr, new)
    try:
        path = next(name for name, module in layer.named_modules() if module is new)
        memo = _shared_configs(layer)
        # the converted attention's own new tensors are the caller's to give away: the copy takes them, not copies
        # of them (those it shares with the original attention, such as a key norm, are copied as before)
        originals = {id(t) for t in (*old.parameters(), *old.buffers())}
        memo.update({id(t): t for t in (*new.parameters(), *new.buffers()) if id(t) not in originals})
        if refine.train == "attention":
            # the MLP and norms stay the original's tensors: refine_module trains what is not shared
            kept = {id(p) for p in new.parameters()}
            memo.update({id(p): p for p in layer.parameters() if id(p) not in kept})
        new_layer = copy.deepcopy(layer, memo=memo)
    finally:
        setattr(parent, attr, old)
    if release is not None:
        release()
    subset = None
    if refine.positions is not None:
        subset = PositionSubset.of(new_layer, new_layer.get_submodule(path), key_value_inputs)
    fit = refine_module(
        layer,
        new_layer,
        layer_calls,
        steps=refine.steps,
        lr=refine.lr,
        warmup=refine.warmup,
        seed=seed,
        targets=targets,
        positions=refine.positions,
        subset=subset,
        outputs=outputs,
    )
    return new_layer, fit


def _shared_configs(module: nn.Module) -> dict[int, object]:
    """A `copy.deepcopy` memo that keeps every `PretrainedConfig` held by `module`'s submodules shared."""
    return {
        id(value): value
        for sub in module.modules()
        for value in vars(sub).values()
        if isinstance(value, PretrainedConfig)
    }


def kept_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A decoder layer's captured call as the replay uses it: cache arguments dropped, `use_cache=False`, and the
    hidden states left out (`None`; they are recomputed during the replay)."""
    kept = {k: v for k, v in kwargs.items() if k not in compat.CACHE_NAMES}
    if "use_cache" in kept:
        kept["use_cache"] = False
    return with_hidden(args, kept, None)


def capture_all_layer_calls(
    model: nn.Module,
    layers: list[nn.Module],
    blocks: torch.Tensor,
    batch_size: int,
    device: str | torch.device | None = None,
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """One forward pass per batch that records every decoder layer's call without computing any layer.

    Each layer in `layers` has its `forward` replaced, for the pass, by a recorder that keeps the call and returns
    its hidden states unchanged: every supported family computes the layers' keyword arguments (masks, position
    embeddings, ALiBi) before its loop over the layers, so they do not depend on what the layers return, and the
    replay recomputes the hidden states anyway. The pass stops at the last layer; it costs the embeddings and the
    mask construction, not a forward of the model (also what a model whose layers hold no weights needs, see
    `hf_gqa.onload`). An instance-level `forward` already there (accelerate's offload hooks) is put back after.

    Returns `(hidden, calls)`: `hidden[b]` `[batch, seq, hidden]` is batch `b`'s input to `layers[0]`,
    `calls[i][b]` the `(args, kwargs)` of layer `i` on batch `b` with its hidden states left out.
    """
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
    hidden: list[torch.Tensor] = []

    def recorder(i: int):
        def forward(*args, **kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                hidden.append(h.detach())
            calls[i].append(kept_call(args, kwargs))
            if i == len(layers) - 1:
                raise _Stop
            return h

        return forward

    own = [vars(layer).get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        run_until_stop(model, blocks, batch_size, device or next(model.parameters()).device)
    finally:
        for layer, forward in zip(layers, own):
            del layer.forward
            if forward is not None:
                layer.forward = forward
    return hidden, calls


def run_until_stop(
    model: nn.Module, blocks: torch.Tensor, batch_size: int, device: str | torch.device
) -> None:
    """One forward pass of `model` per batch of `blocks` (`[n, block_size]` token ids), each ended by the first
    `_Stop` a hook raises (the capture has what it needs by then)."""
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            try:
                model(input_ids=blocks[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass


@dataclass(frozen=True)
class SequentialSettings:
    """How `sequential_step` converts a layer: calibrate on the converted stream (`sequential`) and the `Refine`
    settings, if any."""

    sequential: bool = True
    refine: Refine | None = None
    key_value_inputs: tuple[str, ...] = ("k_proj", "v_proj")

    @property
    def refine_steps(self) -> int:
        return self.refine.steps if self.refine is not None else 0

    @property
    def refine_lr(self) -> float:
        return self.refine.lr if self.refine is not None else 0.0

    @property
    def refine_target(self) -> str:
        return self.refine.target if self.refine is not None else "residual"

    @property
    def refine_scope(self) -> str:
        return self.refine.scope if self.refine is not None else "attention"

    @property
    def tracks_original(self) -> bool:
        """Whether the original model's own trajectory is carried along (drift-corrected refine targets)."""
        return self.sequential and self.refine_steps > 0 and self.refine_target != "local"

    @property
    def trains_layer_copy(self) -> bool:
        """Whether refine trains a whole copy of each decoder layer (scope and train "layer")."""
        return self.refine_steps > 0 and self.refine_scope == "layer" and self.refine.train == "layer"

    @property
    def frees_original_layer(self) -> bool:
        """Whether `sequential_step` releases the original decoder layer's weights before the fit: a sequential
        run that trains a whole copy of the layer reads nothing of the original layer once the copy exists."""
        return self.sequential and self.trains_layer_copy

    @property
    def frees_original_attention(self) -> bool:
        """Whether `sequential_step` releases the original attention's weights before the fit: a sequential
        layer-scope run that trains the converted attention alone shares the rest of the layer with the original
        and reads nothing of the original attention once the copy exists."""
        return (
            self.sequential
            and self.refine_steps > 0
            and self.refine_scope == "layer"
            and self.refine.train == "attention"
        )


@dataclass
class LayerStep:
    """What `sequential_step` did for one decoder layer.

    Attributes:
        replacement: the module swap `(parent, attribute, old, new)`; with `sequential` it is already swapped in.
        log: `{"layer", "tokens"}` and the refine fit (`before`, `after`, `reverted`) where refined.
        hidden: per batch, the next layer's input hidden states `[batch, seq, hidden]`.
        original_hidden: per batch, the original model's next hidden states, or None when not tracked.
    """

    replacement: Replacement
    log: dict
    hidden: list[torch.Tensor]
    original_hidden: list[torch.Tensor] | None


def sequential_step(
    model: nn.Module,
    index: int,
    plan,
    layer: nn.Module,
    calls: list[tuple[tuple, dict]],
    hidden: list[torch.Tensor],
    original_hidden: list[torch.Tensor] | None,
    convert_layer: ConvertLayer,
    settings: SequentialSettings,
    release_original: Callable[[str], None] | None = None,
) -> LayerStep:
    """Convert decoder layer `index` (holding `plan.module`) on its captured `calls` (hidden states left out)
    and its input `hidden` (per batch, `[batch, seq, hidden]`): gather the attention input statistics, merge,
    refine where asked (to the original trajectory `original_hidden` where tracked), swap the result in when
    `settings.sequential`, and compute the next layer's input. The one per-layer step of `run_sequential` and of
    the onloaded conversion of checkpoints (`hf_gqa.onload`).

    `release_original(name)`: called with the name of the module (the decoder layer, or its attention) whose
    original weights nothing reads any more, once the refine copy exists: the layer when a sequential refine trains
    a whole copy of it, the attention when it trains the converted attention alone (`SequentialSettings.
    frees_original_layer`, `frees_original_attention`); never called otherwise. The onloaded conversion frees
    them there: one float32 layer (or attention) less during the fit."""
    refine_steps, refine_lr = settings.refine_steps, settings.refine_lr
    refine_target, refine_scope = settings.refine_target, settings.refine_scope
    layer_calls = [with_hidden(a, k, h) for (a, k), h in zip(calls, hidden)]
    refine_attention = refine_steps > 0 and refine_scope == "attention"
    stats = collect_attention_stats(plan.module, layer, layer_calls, keep_inputs=refine_attention)
    new = convert_layer(plan, stats)
    log = {"layer": index, "tokens": stats.tokens}
    attention_inputs = stats.inputs
    del stats  # the merge has read its second moment (`[D+1, D+1]` float64: 0.5 GiB at D = 8192)
    refined_outputs: list[torch.Tensor] = []
    parent_name, _, attr = plan.name.rpartition(".")
    parent = model.get_submodule(parent_name)
    next_original = None
    if original_hidden is not None:
        attention_outputs, next_original = _original_step(plan.module, layer, calls, original_hidden)
    if refine_steps > 0 and refine_scope == "layer":
        targets = next_original
        if targets is None:
            targets = [run_layer(layer, a, k) for a, k in layer_calls]
        new_layer, fit = _refine_layer(
            layer,
            parent,
            attr,
            new,
            layer_calls,
            targets,
            settings.refine,
            index,
            settings.key_value_inputs,
            refined_outputs,
            _release(release_original, plan.name, settings),
        )
        log.update(fit)
        layers_parent_name, _, layer_attr = plan.name.rpartition(".")[0].rpartition(".")
        swap_parent, swap_attr, old_module, new_module = (
            model.get_submodule(layers_parent_name),
            layer_attr,
            layer,
            new_layer,
        )
    else:
        if refine_attention:
            targets = None
            if next_original is not None:
                targets = _drift_targets(attention_outputs, original_hidden, hidden, refine_target)
            fit = refine_module(
                plan.module,
                new,
                attention_inputs,
                steps=refine_steps,
                lr=refine_lr,
                warmup=settings.refine.warmup,
                seed=index,
                targets=targets,
            )
            log.update(fit)
        swap_parent, swap_attr, old_module, new_module = parent, attr, plan.module, new
    attention_inputs.clear()
    if settings.sequential:
        setattr(swap_parent, swap_attr, new_module)
    # a swapped decoder layer is a new object; a swapped attention module lives inside `layer`
    runner = new_module if settings.sequential and old_module is layer else layer
    try:
        if runner is new_module and refined_outputs:
            # the refined layer's outputs on these calls, computed for its fit's error: no second forward
            next_hidden = refined_outputs
        else:
            next_hidden = [run_layer(runner, a, k) for a, k in layer_calls]
    except BaseException:
        setattr(swap_parent, swap_attr, old_module)  # a failed step leaves the model as it found it
        raise
    return LayerStep(
        (swap_parent, swap_attr, old_module, new_module),
        log,
        next_hidden,
        next_original if next_original is not None else original_hidden,
    )


def run_sequential(
    model: nn.Module,
    plans: list,
    convert_layer: ConvertLayer,
    blocks: torch.Tensor,
    batch_size: int = 4,
    sequential: bool = True,
    refine: Refine | None = None,
    show_progress: bool = True,
    key_value_inputs: tuple[str, ...] = ("k_proj", "v_proj"),
) -> tuple[list[Replacement], list[dict]]:
    """Convert every planned layer on calibration `blocks` (`[n, block_size]` token ids); returns the module
    replacements and per-layer logs.

    The model is left unchanged: replacements are swapped in only for the replay and swapped back out before
    returning (the caller applies them all at once). With a `Refine` of `scope="layer"` a replacement is a whole
    decoder layer (a refined copy holding the converted attention), otherwise the attention module.
    `key_value_inputs`: the family's key/value projections inside an attention module (the adapter's), which
    a refine step scored on a few positions still runs on every position.
    """
    settings = SequentialSettings(sequential, refine, key_value_inputs)
    layers = [model.get_submodule(p.name.rpartition(".")[0]) for p in plans]
    hidden, calls = capture_all_layer_calls(model, layers, blocks, batch_size)
    original_hidden = list(hidden) if settings.tracks_original else None
    replacements, logs = [], []
    try:
        for i in progress(range(len(plans)), len(plans), "hf_gqa: converting layers", show_progress):
            step = sequential_step(
                model, i, plans[i], layers[i], calls[i], hidden, original_hidden, convert_layer, settings
            )
            replacements.append(step.replacement)
            hidden, original_hidden = step.hidden, step.original_hidden
            logs.append(step.log)
            logger.debug("layer %d: %s", i, step.log)
    finally:
        for parent, attr, old, _ in replacements:
            setattr(parent, attr, old)
    return replacements, logs


def layer_sensitivity(
    model: nn.Module,
    plans: list,
    convert_layer: Callable[[object, LayerStats], nn.Module],
    blocks: torch.Tensor,
    batch_size: int = 4,
    show_progress: bool = True,
) -> list[dict[int, float]]:
    """Per layer, `{g: relative output error of the attention block converted to g KV heads}` for every divisor
    `g` of its KV heads, measured on the original model's activations (see `hf_gqa.budget`)."""
    from dataclasses import replace

    from .budget import block_error, divisors

    layers = [model.get_submodule(p.name.rpartition(".")[0]) for p in plans]
    hidden, calls = capture_all_layer_calls(model, layers, blocks, batch_size)
    errors = []
    for i in progress(range(len(plans)), len(plans), "hf_gqa: layer sensitivity", show_progress):
        plan, layer = plans[i], layers[i]
        layer_calls = [with_hidden(a, k, h) for (a, k), h in zip(calls[i], hidden)]
        stats = collect_attention_stats(plan.module, layer, layer_calls, keep_inputs=True)
        errors.append(
            {
                g: block_error(
                    plan.module, convert_layer(replace(plan, kv_heads_after=g), stats), stats.inputs
                )
                for g in divisors(plan.kv_heads_before)
            }
        )
        hidden = [run_layer(layer, a, k) for a, k in layer_calls]
    return errors
