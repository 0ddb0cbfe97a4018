"""How closely a converted model's next-token distributions follow the original's.

Both functions take logits of the same positions, `[..., vocab]` (any leading shape, flattened to positions), and
are what the `evaluate` metrics in `hf_gqa/evaluation/metrics/` compute.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def _positions(logits: torch.Tensor) -> torch.Tensor:
    """`[..., vocab]` -> float32 `[positions, vocab]`."""
    logits = torch.as_tensor(logits)
    return logits.reshape(-1, logits.shape[-1]).float()


def next_token_agreement(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Fraction of positions where `argmax(logits) == argmax(reference_logits)`; both `[..., vocab]`."""
    pred, ref = _positions(logits), _positions(reference_logits)
    if pred.shape != ref.shape:
        raise ValueError(f"logits {tuple(pred.shape)} and reference {tuple(ref.shape)} differ in shape")
    return (pred.argmax(-1) == ref.argmax(-1)).float().mean().item()


def kl_divergence(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Mean over positions of `KL(P_reference || P)` in nats, `P = softmax(logits)`; both `[..., vocab]`."""
    pred, ref = _positions(logits), _positions(reference_logits)
    if pred.shape != ref.shape:
        raise ValueError(f"logits {tuple(pred.shape)} and reference {tuple(ref.shape)} differ in shape")
    log_p, log_q = ref.log_softmax(-1), pred.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


@torch.inference_mode()
def logits_on(model: PreTrainedModel, input_ids: torch.Tensor, window: int) -> torch.Tensor:
    """Float32 logits `[n, vocab]` of `input_ids` `[n]`, computed in independent windows of `window` tokens."""
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, input_ids.shape[0], window):
        ids = input_ids[start : start + window].unsqueeze(0).to(device)
        chunks.append(model(input_ids=ids, use_cache=False).logits[0].float().cpu())
    return torch.cat(chunks)
