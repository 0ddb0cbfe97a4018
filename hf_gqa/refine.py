"""`refine`: layer-wise reconstruction of a converted attention block.

Starting from a closed-form merge, optimise the converted module's own parameters (its new q/k/v/o
projections; parameters it shares with the original, such as norms, stay fixed) so that its output reproduces
the original block's output on the captured calibration inputs. One layer at a time, no backpropagation
through the model.
"""

from __future__ import annotations

import torch
from torch import nn


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


def relative_error(module: nn.Module, inputs: list[tuple[tuple, dict]], targets: list[torch.Tensor]) -> float:
    """`sum ||module(x) - target||^2 / sum ||target||^2` over captured `(args, kwargs)` calls and their targets."""
    num = den = 0.0
    with torch.no_grad():
        for (args, kwargs), target in zip(inputs, targets):
            num += float(((call_output(module, args, kwargs).float() - target.float()) ** 2).sum())
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
) -> dict[str, float]:
    """Fit `converted` to `original` on `inputs` (captured `(args, kwargs)` of the attention calls).

    Minimises the relative squared error `||f_conv(x) - f_orig(x)||^2 / ||f_orig(x)||^2` with Adam, cycling over
    the captured batches, in the model's dtype (convert in float32 for best results).

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
    was_training = converted.training
    converted.eval()
    if targets is None:
        with torch.no_grad():
            targets = [call_output(original, a, k).float() for a, k in inputs]
    targets = [t.float() for t in targets]
    grads = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)

    before = relative_error(converted, inputs, targets)
    if before < 1e-10:  # exact to float precision (e.g. groups == heads): Adam steps would only add noise
        for p, grad in zip(params, grads):
            p.requires_grad_(grad)
        converted.train(was_training)
        return {"before": before, "after": before, "reverted": False}
    initial = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(len(inputs), (steps,), generator=g).tolist()
    for i in order:
        # one sequence of a captured batch per step: cheaper steps, same expected gradient
        args, kwargs = inputs[i]
        batch = targets[i].shape[0]
        row = int(torch.randint(batch, (1,), generator=g))
        args, kwargs, target = _rows(args, row, batch), _rows(kwargs, row, batch), targets[i][row : row + 1]
        out = call_output(converted, args, kwargs).float()
        loss = ((out - target) ** 2).sum() / (target**2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    after = relative_error(converted, inputs, targets)
    reverted = after >= before  # never leave a block worse on the calibration data than its closed form
    if reverted:
        with torch.no_grad():
            for p, value in zip(params, initial):
                p.copy_(value)
        after = before
    for p, grad in zip(params, grads):
        p.requires_grad_(grad)
        p.grad = None
    converted.train(was_training)
    return {"before": before, "after": after, "reverted": reverted}
