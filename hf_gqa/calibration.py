"""Calibration: the activation statistics that data-aware grouping and merging use, gathered with hooks.

For every attention module we accumulate the second moment of its (bias-augmented) input,
`sigma = E[x~ x~^T]` with `x~ = [x, 1]` (`[D + 1, D + 1]`, float64). Queries, keys and values are linear in `x~`,
so every statistic the merges need (key and value Gram matrices, query energies) follows from `sigma` and the
weights: memory stays bounded by one `[D + 1, D + 1]` matrix per layer whatever the number of tokens.

Sequential calibration (the default) runs the decoder layers one at a time on stored hidden states, so that each
layer is measured on the outputs of the already-converted layers before it; it costs about two forward passes of
the model in all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import compat
from .errors import GQAError

TextLike = str | Sequence[str]


@dataclass
class LayerStats:
    """Calibration statistics of one attention module.

    Attributes:
        sigma: `[D + 1, D + 1]` float64 second moment of the augmented input `[x, 1]`.
        tokens: number of tokens accumulated.
        inputs: captured `(args, kwargs)` of the module's calls (kept only when a method replays the block,
            e.g. `refine`); tensors on the calibration device.
    """

    sigma: torch.Tensor
    tokens: int = 0
    inputs: list[tuple[tuple, dict]] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate hidden states `x` of shape `[..., D]`."""
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        n = flat.shape[0]
        aug = torch.cat([flat, torch.ones(n, 1, dtype=flat.dtype, device=flat.device)], dim=1)
        total = self.tokens + n
        self.sigma.mul_(self.tokens / total).add_(aug.T @ aug, alpha=1.0 / total)
        self.tokens = total

    @classmethod
    def empty(cls, hidden: int, device: torch.device | str = "cpu") -> LayerStats:
        return cls(torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64, device=device))


def calibration_blocks(
    data: str | Iterable[str] | torch.Tensor | object,
    tokenizer=None,
    num_tokens: int = 8192,
    block_size: int = 512,
    seed: int = 0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Token blocks `[n_blocks, block_size]` for calibration.

    Args:
        data: a text, an iterable of texts (or a `datasets.Dataset` with a `"text"` column, which needs
            `tokenizer`), or token ids (`[n]` or `[batch, seq]` tensor or numpy array, or nested lists of ints).
        num_tokens: tokens to use (rounded down to whole blocks); blocks are drawn at random positions of the
            concatenated stream, deterministically under `seed`.
        vocab_size: the model's vocabulary size; token ids outside `[0, vocab_size)` are refused.

    Raises:
        GQAError: too little data, ids outside the vocabulary, or text without a tokenizer.
    """
    stream = _token_stream(data, tokenizer, num_tokens)
    if stream.numel() and (
        int(stream.min()) < 0 or (vocab_size is not None and int(stream.max()) >= vocab_size)
    ):
        raise GQAError(
            f"Calibration token ids must lie in [0, {vocab_size}) (the model's vocabulary), got ids from "
            f"{int(stream.min())} to {int(stream.max())}. Tokenize with the model's own tokenizer, or pass text "
            "with tokenizer=..."
        )
    if stream.numel() < block_size:
        raise GQAError(
            f"Calibration data has {stream.numel()} tokens; need at least block_size={block_size}."
        )
    n_blocks = max(1, min(num_tokens // block_size, stream.numel() // block_size))
    starts_all = stream.numel() - block_size + 1
    g = torch.Generator().manual_seed(seed)
    if n_blocks * block_size * 2 > stream.numel():  # not much text: take consecutive non-overlapping blocks
        starts = torch.arange(n_blocks) * block_size
    else:
        starts = torch.randperm(starts_all, generator=g)[:n_blocks].sort().values
    return torch.stack([stream[s : s + block_size] for s in starts.tolist()])


def _token_stream(data, tokenizer, num_tokens: int) -> torch.Tensor:
    """Calibration data as one stream of token ids `[n]` (text is tokenized, up to `4 * num_tokens` ids)."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
            raise GQAError(f"Calibration token ids must be integers, got a tensor of {data.dtype}.")
        return data.reshape(-1).long()
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], (int, list, tuple)):
        return torch.tensor([t for row in data for t in (row if isinstance(row, (list, tuple)) else [row])])
    if tokenizer is None:
        raise GQAError("Calibration text needs a tokenizer: pass tokenizer=... (or pass token ids).")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in _texts(data):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
        if len(ids) >= 4 * num_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def _texts(data) -> list[str]:
    if isinstance(data, str):
        return [data]
    column_names = getattr(data, "column_names", None)
    if column_names is not None:  # datasets.Dataset
        column = "text" if "text" in column_names else column_names[0]
        return list(data[column])
    return [str(t) for t in data]


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def run_layer(layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """Run a decoder layer on captured inputs and return its output hidden states."""
    with torch.no_grad():
        out = layer(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same call with its hidden states replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def collect_attention_stats(
    attention: nn.Module, layer: nn.Module, calls: list[tuple[tuple, dict]], keep_inputs: bool
) -> LayerStats:
    """Statistics of `attention`'s input while `layer` runs on each captured call (up to its attention call: the
    rest of the layer is not run)."""
    first = _first_arg(*calls[0])
    stats = LayerStats.empty(first.shape[-1], device=first.device)  # on the activations' device (cuda too)

    def hook(module, args, kwargs):
        stats.add(_first_arg(args, kwargs))
        if keep_inputs:
            kept = {k: v for k, v in kwargs.items() if k not in compat.CACHE_NAMES}
            stats.inputs.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kept))
        raise _Reached

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for args, kwargs in calls:
            try:
                run_layer(layer, args, kwargs)
            except _Reached:
                pass
    finally:
        handle.remove()
    return stats


class _Reached(Exception):
    """Raised by `collect_attention_stats`' hook once it has what it needs of a layer's call."""


def progress(iterable, total: int, desc: str, enabled: bool = True):
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)
