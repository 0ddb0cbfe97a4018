"""`refine`: layer-wise reconstruction of a converted attention block.

Starting from a closed-form merge, optimise the converted module's own parameters (its new q/k/v/o
projections; parameters it shares with the original, such as norms, stay fixed) so that its output reproduces
the original block's output on the captured calibration inputs. One layer at a time, no backpropagation
through the model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.pytorch_utils import Conv1D


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def call_output(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """`module(*args, **kwargs)`'s main output (the first element where it returns a tuple)."""
    return _output(module(*args, **kwargs))


def _rows(obj, index: int, batch: int, key: str | None = None):
    """`obj` (a tensor, or tuples/lists/dicts of them) restricted to batch row `index` where its first dim is
    the batch; everything else is passed through. ALiBi biases (`alibi`, `[batch * heads, ...]`, batch-major in
    Bloom and Falcon) are restricted to that row's heads."""
    if isinstance(obj, torch.Tensor):
        if batch <= 1 or not obj.dim():
            return obj
        if key == "alibi" and obj.shape[0] % batch == 0:
            per_row = obj.shape[0] // batch
            return obj[index * per_row : (index + 1) * per_row]
        return obj[index : index + 1] if obj.shape[0] == batch else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rows(o, index, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: _rows(v, index, batch, k) for k, v in obj.items()}
    return obj


#: The attention implementation a refine step switches an SDPA attention module to (see `PositionSubset`).
ROWS_ATTENTION = "hf_gqa_rows"
_ROWS: ContextVar[torch.Tensor | None] = ContextVar("hf_gqa_rows", default=None)
_SDPA_NAMES = ("sdpa", "hf_gqa_sdpa")


def rows_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA for the query positions of the active `PositionSubset` only.

    `query [b, H, T, d]`, `key`/`value [b, K, T, d]`; returns `[b, T, H, d]`, zeros at the other query positions.
    Outside a subset (or for a decode step), plain SDPA."""
    rows = _ROWS.get()
    if rows is None or query.shape[2] != key.shape[2] or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    length = key.shape[2]
    if attention_mask is None:  # causal: key j is visible from query position i when j <= i
        mask = torch.arange(length, device=query.device)[None, :] <= rows[:, None]
    else:
        mask = attention_mask[..., :length].index_select(-2, rows)
        if mask.dtype != torch.bool and mask.dtype != query.dtype:
            mask = mask.to(query.dtype)
    out = _grouped_sdpa(query.index_select(2, rows), key, value, mask, scaling)  # [b, H, n, d]
    return query.new_zeros(query.shape).index_copy(2, rows, out).transpose(1, 2).contiguous(), None


def _grouped_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """SDPA of `query [b, H, n, d]` on `key`/`value [b, K, T, d]` (query head `h` reads key head `h // (H / K)`)
    under `mask [..., n, T]`; returns `[b, H, n, d]`.

    With fewer key heads than query heads and a mask shared by the heads, the `H / K` query heads of a key head
    are stacked into one of `H / K * n` rows: the same arithmetic row for row, in larger products (CPU forward and
    backward about a quarter faster than SDPA's `enable_gqa` at 9 query heads on 1 key head)."""
    batch, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    if kv_heads == heads or heads % kv_heads or (mask.dim() > 2 and mask.shape[-3] != 1):
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True
        )
    per_key = heads // kv_heads
    stacked = query.reshape(
        batch, kv_heads, per_key * rows, dim
    )  # row j * n + i: head k * per_key + j, query i
    tiled = mask.repeat(*([1] * (mask.dim() - 2)), per_key, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        stacked, key, value, attn_mask=tiled, scale=scaling
    )
    return out.reshape(batch, heads, rows, dim)


AttentionInterface.register(ROWS_ATTENTION, rows_attention_forward)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _dispatches(attention: nn.Module) -> bool:
    """Whether `attention`'s forward looks its attention function up in transformers' interface (the same test
    transformers applies before letting a model switch implementations)."""
    try:
        source = inspect.getsource(type(attention).forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


@dataclass
class PositionSubset:
    """What of a decoder layer may compute only the token positions a loss reads.

    After attention nothing in a decoder layer mixes positions, and inside attention only keys and values are read
    at every position. So a refine step scored on `n` of a sequence's `T` positions runs the layer's position-wise
    linear maps (`modules`: MLP, query and output projections) on those `n` rows only and, where `attention`
    dispatches through transformers' SDPA, attends from those `n` queries only; keys and values still cover all
    `T` positions. Exact at the scored positions; the others come out wrong and are never read.
    """

    modules: list[nn.Module]
    attention: nn.Module | None = None

    @classmethod
    def of(cls, layer: nn.Module, attention: nn.Module, key_value_inputs: tuple[str, ...]) -> PositionSubset:
        """The subset of decoder `layer` around `attention`, whose submodules named in `key_value_inputs` (k/v
        projections, fused qkv projections) read every position.

        A child of `layer` other than the attention that holds linear maps (the MLP) is position-wise as a whole
        and computes the scored rows only, its activations included; the attention's other linear maps (query and
        output projections) are restricted one by one."""
        reads_all = {id(m) for name in key_value_inputs if (m := getattr(attention, name, None)) is not None}
        blocks = [
            child
            for child in layer.children()
            if not any(m is attention for m in child.modules()) and any(map(_is_linear, child.modules()))
        ]
        inside = {id(m) for block in blocks for m in block.modules()}
        modules = blocks + [
            m for m in layer.modules() if _is_linear(m) and id(m) not in reads_all and id(m) not in inside
        ]
        config = getattr(attention, "config", None)
        sdpa = getattr(config, "_attn_implementation", None) in _SDPA_NAMES and _dispatches(attention)
        return cls(modules, attention if sdpa else None)

    @contextmanager
    def only(self, rows: torch.Tensor) -> Iterator[None]:
        """Within the block, compute positions `rows` (`[n]`, sorted indices into `T`) only."""
        shapes: dict[int, int] = {}

        def before(module, args, kwargs):
            first = next(x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor) and x.dim() >= 2)
            length = shapes[id(module)] = first.shape[-2]

            def pick(x):  # every per-position input (Bloom's MLP also takes the residual)
                is_rows = isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-2] == length
                return x.index_select(-2, rows) if is_rows else x

            return tuple(map(pick, args)), {k: pick(v) for k, v in kwargs.items()}

        def after(module, args, kwargs, output):
            full = list(output.shape)
            full[-2] = shapes.pop(id(module))
            return output.new_zeros(full).index_copy(output.dim() - 2, rows, output)

        handles = []
        config = self.attention.config if self.attention is not None else None
        implementation = config._attn_implementation if config is not None else None
        token = _ROWS.set(rows)
        try:
            for m in self.modules:
                handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
                handles.append(m.register_forward_hook(after, with_kwargs=True))
            if config is not None:
                config._attn_implementation = ROWS_ATTENTION
            yield
        finally:
            if config is not None:
                config._attn_implementation = implementation
            _ROWS.reset(token)
            for h in handles:
                h.remove()


def relative_error(
    module: nn.Module,
    inputs: list[tuple[tuple, dict]],
    targets: list[torch.Tensor],
    outputs: list[torch.Tensor] | None = None,
) -> float:
    """`sum ||module(x) - target||^2 / sum ||target||^2` over captured `(args, kwargs)` calls and their targets;
    `module`'s outputs are appended to `outputs` when a list is given."""
    num = den = 0.0
    with torch.no_grad():
        for (args, kwargs), target in zip(inputs, targets):
            out = call_output(module, args, kwargs)
            if outputs is not None:
                outputs.append(out)
            num += float(((out.float() - target.float()) ** 2).sum())
            den += float((target.float() ** 2).sum())
    return num / max(den, 1e-30)


def refine_module(
    original: nn.Module,
    converted: nn.Module,
    inputs: list[tuple[tuple, dict]],
    steps: int = 200,
    lr: float = 3e-4,
    seed: int = 0,
    targets: list[torch.Tensor] | None = None,
    warmup: int = 0,
    positions: int | None = None,
    subset: PositionSubset | None = None,
    outputs: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Fit `converted` to `original` on `inputs` (captured `(args, kwargs)` of the attention calls).

    Minimises the relative squared error `||f_conv(x) - f_orig(x)||^2 / ||f_orig(x)||^2` with Adam, cycling over
    the captured batches, in the model's dtype (convert in float32 for best results). Only the parameters of
    `converted` that it does not share with `original` are trained; the shared ones are frozen for the fit.

    Memory: besides the trained parameters, Adam's two moments of each and the start kept to undo a bad fit
    (stored in bfloat16 / float16 where that holds its values exactly, as weights read from a bf16 checkpoint
    do). Each parameter takes its Adam step as soon as its gradient is complete and drops it, so the gradients of
    the whole module never exist at once.

    Args:
        targets: the output to fit for each captured call; by default the original module's output on the same
            inputs (a purely local fit). Calibrated conversion passes drift-corrected targets instead.

    Returns:
        `{"before": relative error before, "after": relative error after, "reverted": bool}` on all captured
        inputs. A fit that ends worse than it started is undone (`reverted`), so refine never makes a block worse
        on the calibration data.
    """
    shared = {id(p) for p in original.parameters()}
    params = [p for p in converted.parameters() if id(p) not in shared]
    if not params or steps <= 0:
        return {}
    frozen = [p for p in converted.parameters() if id(p) in shared]
    was_training = converted.training
    converted.eval()
    if targets is None:
        with torch.no_grad():
            targets = [call_output(original, a, k).float() for a, k in inputs]
    targets = [t.float() for t in targets]
    grads = {p: p.requires_grad for p in params + frozen}
    for p in params:
        p.requires_grad_(True)
    for p in frozen:
        p.requires_grad_(False)
    try:
        return _fit(converted, params, inputs, targets, steps, lr, seed, positions, subset, outputs, warmup)
    finally:
        for p, grad in grads.items():
            p.requires_grad_(grad)
            p.grad = None
        converted.train(was_training)


def _fit(
    converted: nn.Module,
    params: list[nn.Parameter],
    inputs: list[tuple[tuple, dict]],
    targets: list[torch.Tensor],
    steps: int,
    lr: float,
    seed: int,
    positions: int | None,
    subset: PositionSubset | None,
    outputs: list[torch.Tensor] | None,
    warmup: int = 0,
) -> dict[str, float]:
    """`refine_module`'s fit of `params` (set to require gradients) once its targets are known."""
    start: list[torch.Tensor] = []
    before = relative_error(converted, inputs, targets, start)
    if before < 1e-10:  # exact to float precision (e.g. groups == heads): Adam steps would only add noise
        if outputs is not None:
            outputs.extend(start)
        return {"before": before, "after": before, "reverted": False}
    initial = [_compact_copy(p) for p in params]
    optimizers = {p: torch.optim.Adam([p], lr=lr) for p in params}
    schedules = [_schedule(o, steps, warmup) for o in optimizers.values()]

    def step_now(p: torch.Tensor) -> None:  # the parameter's gradient is complete: step, then drop it
        optimizers[p].step()
        p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(step_now) for p in params]
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(len(inputs), (steps,), generator=g).tolist()
    try:
        for i in order:
            # one sequence of a captured batch per step: cheaper steps, same expected gradient
            args, kwargs = inputs[i]
            batch = targets[i].shape[0]
            row = int(torch.randint(batch, (1,), generator=g))
            args, kwargs, target = (
                _rows(args, row, batch),
                _rows(kwargs, row, batch),
                targets[i][row : row + 1],
            )
            value = _step_loss(converted, args, kwargs, target, positions, subset, g)
            value.backward()  # each parameter steps in its hook
            del value
            for schedule in schedules:
                schedule.step()
    finally:
        for hook in hooks:
            hook.remove()
    optimizers.clear()  # Adam's moments are not needed for the final error
    schedules.clear()
    end: list[torch.Tensor] = []
    after = relative_error(converted, inputs, targets, end)
    reverted = after >= before  # never leave a block worse on the calibration data than its closed form
    if reverted:
        with torch.no_grad():
            for p, value in zip(params, initial):
                p.copy_(value)
        after = before
    if outputs is not None:
        outputs.extend(start if reverted else end)
    return {"before": before, "after": after, "reverted": reverted}


def _step_loss(
    converted: nn.Module,
    args: tuple,
    kwargs: dict,
    target: torch.Tensor,
    positions: int | None,
    subset: PositionSubset | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """One refine step's relative squared error on one sequence (`target [1, length, hidden]`), on all its
    positions or estimated from `positions` of them (`_scored_positions`; the layer computes only those where
    `subset` is given)."""
    length = target.shape[-2]
    if positions is None or positions >= length:
        out = call_output(converted, args, kwargs).float()
        return ((out - target) ** 2).sum() / (target**2).sum()
    picked, weights = _scored_positions(length, positions, generator)
    with subset.only(picked) if subset is not None else nullcontext():
        out = call_output(converted, args, kwargs).float().index_select(-2, picked)
    error = ((out - target.index_select(-2, picked)) ** 2).sum(-1)  # [1, positions]
    return (error * weights).sum() / (target**2).sum()


def _scored_positions(
    length: int, positions: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token positions a refine step is scored on and the weight of each: the first position always (weight 1:
    from a few layers in, decoder models keep a large share of the hidden states' energy there, an attention
    sink, and a fit that sees it in only some steps breaks it) and `positions - 1` of the others drawn at random
    (weight `(length - 1) / (positions - 1)` each), so that the weighted error is an unbiased estimate of the whole
    sequence's. A single position is one drawn at random, weighted `length` (always the first would leave every
    other position unscored). Returns `(picked [positions] sorted, weights [positions])`."""
    if positions < 2:
        return torch.randint(length, (1,), generator=generator), torch.full((1,), float(length))
    others = torch.randperm(length - 1, generator=generator)[: positions - 1].sort().values + 1
    picked = torch.cat([others.new_zeros(1), others])
    weights = torch.full((positions,), (length - 1) / (positions - 1))
    weights[0] = 1.0
    return picked, weights


def _schedule(
    optimizer: torch.optim.Optimizer, steps: int, warmup: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The rate over `steps`: cosine decay to zero; with `warmup`, the first `warmup` steps also scale it by
    `(step + 1) / warmup` (Adam's first steps move every weight by about the rate at once)."""
    if warmup <= 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _compact_copy(p: torch.Tensor) -> torch.Tensor:
    """A copy of `p`'s values in the narrowest floating dtype that holds them exactly (a float32 weight read from
    a bf16 checkpoint is kept in bf16: half the bytes)."""
    value = p.detach()
    if value.dtype == torch.float32:
        for narrow in (torch.bfloat16, torch.float16):
            candidate = value.to(narrow)
            if torch.equal(candidate.to(value.dtype), value):
                return candidate
            del candidate
    return value.clone()
