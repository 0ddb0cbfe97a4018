"""Perplexity of a causal LM on blocks of token ids: the one scoring loop shared by uptraining and the benchmarks.

    ids = tokenizer(text, return_tensors="pt").input_ids        # [1, tokens]
    hf_gqa.perplexity.perplexity(model, ids)                     # exp(mean next-token loss)

Callers choose the windows (packed blocks, the first windows of a held-out text, one paragraph); this module only
scores them: every block is scored on its own, from its first token, and the loss is averaged over all predicted
tokens of all blocks (not per block), so a block with more scored tokens weighs more.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def perplexity(
    model: nn.Module,
    input_ids_blocks: torch.Tensor,
    batch_size: int = 4,
    attention_mask: torch.Tensor | None = None,
) -> float:
    """`exp(mean next-token loss)` of `model` over every scored token of `input_ids_blocks`.

    The model runs in eval mode (its former mode is restored afterwards) without gradients, `batch_size` blocks
    per forward pass, on the device of its first parameter.

    Args:
        model: a causal LM whose forward takes `input_ids` (and `attention_mask`) and returns `.logits`
            `[batch, block, vocab]`.
        input_ids_blocks: `[n, block]` token ids (int64), `block >= 2`. Position `t + 1` of a block is predicted
            from positions `0..t` of the same block: `block - 1` predictions per block.
        batch_size: blocks per forward pass (the result does not depend on it, up to float rounding).
        attention_mask: optional `[n, block]`, 1 for real tokens and 0 for padding, for blocks of unequal length
            padded on the right. Passed to the model; a prediction is scored only where both the token it
            predicts from and the token it predicts are real.

    Returns:
        `exp(sum of token losses / number of scored tokens)`, the losses in float32 (natural log).
    """
    _check_blocks(input_ids_blocks, attention_mask, batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, input_ids_blocks.shape[0], batch_size):
            ids = input_ids_blocks[start : start + batch_size].to(device)
            mask = None
            if attention_mask is not None:
                mask = attention_mask[start : start + batch_size].to(device)
            loss_sum, scored = next_token_loss_sum(model, ids, mask)
            total += loss_sum
            count += scored
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("No token to score: every block is padding or a single token.")
    return math.exp(total / count)


@torch.no_grad()
def next_token_loss_sum(
    model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[float, int]:
    """`(sum of next-token losses, number of scored tokens)` of one batch.

    Args:
        ids: `[batch, block]` token ids, on the model's device.
        attention_mask: optional `[batch, block]` (1 real, 0 padding), as for `perplexity`.
    """
    inputs = {"input_ids": ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    logits = model(**inputs).logits.float()  # [batch, block, vocab]
    targets = ids[:, 1:]  # [batch, block - 1]: the token each position predicts
    if attention_mask is not None:
        scored = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)
        targets = targets.masked_fill(~scored, IGNORE_INDEX)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss.item(), int((targets != IGNORE_INDEX).sum())


def _check_blocks(blocks: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int) -> None:
    if not isinstance(blocks, torch.Tensor) or blocks.ndim != 2:
        shape = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ValueError(f"input_ids_blocks must be a [n, block] tensor of token ids, got {shape}.")
    if blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(
            f"input_ids_blocks {tuple(blocks.shape)} holds no prediction: need at least one block of 2 tokens."
        )
    if attention_mask is not None and attention_mask.shape != blocks.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids_blocks "
            f"{tuple(blocks.shape)}."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")


__all__ = ["next_token_loss_sum", "perplexity"]
