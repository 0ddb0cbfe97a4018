"""What differs between the transformers releases hf_gqa supports, in one place.

Supported and tested: transformers 5.23 and 5.24 (see the README's version table; CI runs both ends). The
differences that reach our code:

- **The cache argument.** 5.24 renamed `past_key_values` to `cache` in model, decoder-layer and attention
  forwards and in `generate()`'s model kwargs (the old keyword is deprecated until 5.40), and its `Cache.update`
  takes the caller's keyword arguments as `kwargs=`. GPT-NeoX, Falcon and Bloom still pass `layer_past` to their
  attention modules in both releases. `CACHE_KWARG`, `pop_cache` and `update_cache` hide all of this.
- **GPT-J.** 5.24 rewrote `GPTJAttention` onto the shared attention interface: the model computes the rotary
  `(sin, cos)` once and passes them as `position_embeddings`, and the module-level `eager_attention_forward` is
  new. 5.23 keeps a sinusoid table (`embed_positions`) on every attention module. `gptj_sin_cos` and
  `gptj_eager_attention_forward` give our GPT-J module the same pieces in both.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.generation import utils as generation_utils
from transformers.models.gptj import modeling_gptj

#: The transformers versions the test suite runs on (inclusive); `pyproject.toml` declares the same range.
TESTED_TRANSFORMERS = ("5.23.0", "5.24.0")

#: The keyword under which forwards take the cache and `generate()` keeps it in its model kwargs.
CACHE_KWARG: str = generation_utils.ALL_CACHE_NAMES[0]
#: Whether `Cache.update` receives the attention module's keyword arguments (`kwargs=`), as from 5.24.
_UPDATE_TAKES_KWARGS = CACHE_KWARG == "cache"
#: Every keyword a decoder layer of a supported family uses to hand the cache to its attention module.
CACHE_NAMES = ("cache", "past_key_values", "layer_past")


def pop_cache(kwargs: dict) -> Cache | None:
    """Remove and return the cache an attention module was called with, under whichever name the caller used."""
    found = None
    for name in CACHE_NAMES:
        value = kwargs.pop(name, None)
        if value is not None:
            found = value
    return found


def update_cache(
    cache: Cache, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache.update` for keys and values `[b, K, s, d]` of layer `layer_idx`, called as this release calls it.

    `kwargs` are the attention module's own keyword arguments (5.24 hands them to the cache layers).
    Returns the keys and values of every cached position, `[b, K, total, d]`.
    """
    if _UPDATE_TAKES_KWARGS:
        return cache.update(key, value, layer_idx, kwargs=kwargs)
    return cache.update(key, value, layer_idx)


def model_kwargs_cache(model_kwargs: dict) -> Cache | None:
    """The cache `generate()` prepared in its model kwargs (None where it prepared none)."""
    return model_kwargs.get(CACHE_KWARG)


def output_cache(output) -> Cache | None:
    """The cache a model output or a `generate()` output carries (`.cache` from 5.24, `.past_key_values` before)."""
    return getattr(output, CACHE_KWARG, None)


def cache_kwargs(cache: Cache | None) -> dict[str, Cache | None]:
    """`{name: cache}` to pass a cache to a model's forward under the name this release uses."""
    return {CACHE_KWARG: cache}


# -- GPT-J ---------------------------------------------------------------------------------------------------------
def gptj_sin_cos(
    module: nn.Module,
    position_ids: torch.LongTensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-J's rotary `(sin, cos)`, each `[b, s, rotary_dim // 2]`.

    From 5.24 the model passes them as `position_embeddings`; in 5.23 they are read from the sinusoid table
    `embed_positions` (`[max_positions, rotary_dim]`, sin half then cos half) that each attention module holds.
    """
    if position_embeddings is not None:
        return position_embeddings
    table = module.embed_positions.to(position_ids.device)[position_ids].to(dtype)
    sin, cos = torch.split(table, table.shape[-1] // 2, dim=-1)
    return sin, cos


def _gptj_eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-J's eager attention as 5.23 computes it inside `GPTJAttention` (5.24 exposes it as a function):
    `query`, `key`, `value` `[b, H, *, d]`, scores in float32 -> `([b, q, H, d], weights [b, H, q, k])`."""
    weights = torch.matmul(query.to(torch.float32), key.to(torch.float32).transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1).to(value.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


gptj_eager_attention_forward = getattr(
    modeling_gptj, "eager_attention_forward", _gptj_eager_attention_forward
)
