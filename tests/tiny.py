"""Small helpers several test files share: a tiny multi-head Llama, calibration ids, logits."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from .cases import TINY


def tiny_llama(kv: int = 8, **kw):
    """A tiny random Llama (8 query heads, `kv` KV heads, vocabulary 256), seeded, in eval mode, on SDPA."""
    torch.manual_seed(0)
    config = LlamaConfig(**TINY, intermediate_size=128, num_attention_heads=8, num_key_value_heads=kv, **kw)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def calibration_ids(n: int = 512) -> torch.Tensor:
    """`[n]` token ids in `[3, 200)`, the same every call."""
    return torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(5))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
