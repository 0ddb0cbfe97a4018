"""Per-layer KV budgets: how many KV heads each layer keeps under a total KV-cache budget.

Sensitivity is measured on calibration data: for every layer and every admissible head count `g` (a divisor of
the layer's KV heads), the relative error of the converted attention block's output against the original's,
`e_l(g) = ||f_g(x) - f(x)||^2 / ||f(x)||^2`, on the layer's real inputs. The head counts are then chosen to
minimise the summed error under the budget (a multiple-choice knapsack over bytes, solved exactly by dynamic
programming over head_dim-weighted heads).
"""

from __future__ import annotations

import math

import torch

from .refine import call_output, relative_error


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def block_error(
    original: torch.nn.Module, converted: torch.nn.Module, inputs: list[tuple[tuple, dict]]
) -> float:
    """Relative squared error of `converted`'s output against `original`'s on captured inputs."""
    with torch.no_grad():
        targets = [call_output(original, args, kwargs) for args, kwargs in inputs]
    return relative_error(converted, inputs, targets)


def choose_heads(
    errors: list[dict[int, float]], kv_heads: list[int], head_dims: list[int], kv_budget: float
) -> list[int]:
    """Head counts per layer minimising `sum_l errors[l][g_l]` subject to
    `sum_l g_l * head_dims[l] <= kv_budget * sum_l kv_heads[l] * head_dims[l]`.

    Args:
        errors: per layer, `{g: error}` for each admissible `g`.
        kv_heads: per layer, the KV heads before conversion.
        head_dims: per layer, the head dimension (bytes per head are proportional to it).
        kv_budget: fraction of the original KV-cache bytes to keep, in `(0, 1]`.
    """
    if not 0 < kv_budget <= 1:
        raise ValueError(f"kv_budget must be in (0, 1], got {kv_budget}")
    unit = math.gcd(*head_dims)
    cost = [[g * d // unit for g in sorted(e)] for e, d in zip(errors, head_dims)]
    capacity = int(math.floor(kv_budget * sum(k * d for k, d in zip(kv_heads, head_dims)) / unit + 1e-9))
    minimum = sum(min(c) for c in cost)
    if capacity < minimum:
        raise ValueError(
            f"kv_budget={kv_budget} is below one KV head per layer ({minimum * unit} of "
            f"{sum(k * d for k, d in zip(kv_heads, head_dims))} head dims); raise it."
        )
    inf = float("inf")
    best = [0.0] + [inf] * capacity  # best[c]: least error of the layers so far using exactly c units
    choice: list[list[int | None]] = []
    for e, costs in zip(errors, cost):
        options = sorted(e)
        new = [inf] * (capacity + 1)
        pick: list[int | None] = [None] * (capacity + 1)
        for c in range(capacity + 1):
            if best[c] == inf:
                continue
            for g, w in zip(options, costs):
                if c + w <= capacity and best[c] + e[g] < new[c + w]:
                    new[c + w] = best[c] + e[g]
                    pick[c + w] = g
        best = new
        choice.append(pick)
    c = min(range(capacity + 1), key=lambda i: (best[i], i))
    heads = []
    for layer in range(len(errors) - 1, -1, -1):
        g = choice[layer][c]
        heads.append(g)
        c -= g * head_dims[layer] // unit
    return heads[::-1]
