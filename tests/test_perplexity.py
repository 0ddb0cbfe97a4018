"""`hf_gqa.perplexity.perplexity` against a hand computation with `torch.nn.functional.cross_entropy`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_gqa.perplexity import perplexity


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    return AutoModelForCausalLM.from_config(config).eval()


def token_losses(model, sequence: torch.Tensor) -> torch.Tensor:
    """Next-token losses `[len - 1]` of one unpadded sequence `[len]`, scored on its own."""
    with torch.no_grad():
        logits = model(input_ids=sequence[None]).logits[0].float()  # [len, vocab]
    return F.cross_entropy(logits[:-1], sequence[1:], reduction="none")


def blocks(n: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, length), generator=g)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_equals_exp_mean_token_cross_entropy(model, batch_size):
    ids = blocks(5, 12)
    losses = torch.cat([token_losses(model, row) for row in ids])
    assert losses.numel() == 5 * 11
    expected = math.exp(losses.double().mean().item())
    assert perplexity(model, ids, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)


def test_right_padded_rows_of_unequal_length_score_only_their_real_tokens(model):
    lengths = [12, 7, 3]
    ids = blocks(3, 12, seed=1)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    padded = ids.masked_fill(mask == 0, 0)
    losses = torch.cat([token_losses(model, padded[row, :length]) for row, length in enumerate(lengths)])
    assert losses.numel() == sum(length - 1 for length in lengths)
    expected = math.exp(losses.double().mean().item())
    for batch_size in (1, 3):
        got = perplexity(model, padded, batch_size=batch_size, attention_mask=mask)
        assert got == pytest.approx(expected, rel=1e-5)


def test_mean_is_over_tokens_not_blocks(model):
    """Two blocks with 11 and 2 scored tokens: the longer one weighs 11/13, not 1/2."""
    ids = blocks(2, 12, seed=2)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    long, short = token_losses(model, ids[0]), token_losses(model, ids[1, :3])
    expected = math.exp((long.double().sum() + short.double().sum()).item() / 13)
    assert perplexity(model, ids, attention_mask=mask) == pytest.approx(expected, rel=1e-5)


def test_restores_training_mode_and_takes_no_gradient(model):
    ids = blocks(2, 8)
    model.train()
    try:
        with torch.enable_grad():
            value = perplexity(model, ids)
        assert model.training
        assert isinstance(value, float) and value > 1
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


@pytest.mark.parametrize(
    "ids, mask",
    [
        (torch.zeros(8, dtype=torch.long), None),  # not [n, block]
        (torch.zeros(2, 1, dtype=torch.long), None),  # one token: nothing to predict
        (torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 7)),  # mask shape
        (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8)),  # every token is padding
    ],
)
def test_rejects_blocks_without_predictions(model, ids, mask):
    with pytest.raises(ValueError):
        perplexity(model, ids, attention_mask=mask)
