"""Loading converted checkpoints.

A natively-GQA family converted with the same KV head count in every layer saves as a standard checkpoint that
plain `AutoModelForCausalLM.from_pretrained` loads. Everything else (multi-head-only families, per-layer KV
counts) records its GQA layout under `config.hf_gqa`; `hf_gqa.from_pretrained` rebuilds that layout on empty
weights and loads the saved tensors into it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .cache import install_cache
from .patch import META_KEY, _set_attention, patch


def needs_hf_gqa_to_load(model_or_config) -> bool:
    """Whether plain transformers can NOT load the saved form of this converted model."""
    config = getattr(model_or_config, "config", model_or_config)
    meta = getattr(config, META_KEY, None)
    if not meta:
        return False
    from .architectures import ADAPTERS

    adapter = next((a for a in ADAPTERS if a.matches_config(config)), None)
    return not (adapter and adapter.native_gqa and len(set(meta["kv_heads"])) == 1)


def _adapter_for_config(config):
    from .architectures import ADAPTERS

    return next(a for a in ADAPTERS if a.matches_config(config))


def _state_dict_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"No model.safetensors (or index) in {path}.")


def _to_model_keys(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo the key renamings transformers applies when saving (e.g. GPT-NeoX's `lm_head.` saved as `embed_out.`)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:  # a transformers version without checkpoint conversion mappings
        return state
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    expected = model.state_dict().keys()
    return {(k if k in expected else apply_renamings(k, renamings)): v for k, v in state.items()}


def from_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, **kwargs
) -> PreTrainedModel:
    """Load a model converted and saved with hf_gqa, with identical weights and a GQA cache installed.

    Args:
        path: a local folder written by `save_pretrained` (or a Hub id where the Hub is reachable).
        dtype: dtype to cast to after loading (default: as saved).
        kwargs: passed to `AutoConfig.from_pretrained` / `AutoModelForCausalLM.from_pretrained`.
    """
    config = AutoConfig.from_pretrained(path, **kwargs)
    meta = getattr(config, META_KEY, None)
    if not needs_hf_gqa_to_load(config):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", **kwargs)
        if meta and _adapter_for_config(config).rebuild_on_load:
            patch(model, groups=list(meta["kv_heads"]), merge="first")  # same weights, our attention modules
            setattr(model.config.get_text_config(decoder=True), META_KEY, meta)
        elif meta:
            install_cache(model)
            _set_attention(model, None)
        return model

    # Build the original architecture on empty weights, re-shape it to the saved GQA layout, then fill it.
    adapter = _adapter_for_config(config)
    adapter.restore_config(config, meta)
    delattr(config, META_KEY)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    patch(model, groups=list(meta["kv_heads"]), merge="first", _allow_meta=True)
    config_meta = model.config.get_text_config(decoder=True)
    setattr(config_meta, META_KEY, meta)
    state = {}
    for file in _state_dict_files(Path(path)):
        state.update(load_file(str(file)))
    model.load_state_dict(_to_model_keys(model, state), strict=False, assign=True)
    model.tie_weights()
    left = [
        n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"
    ]
    if left:
        raise ValueError(f"{path} lacks tensors for {left[:5]}{'...' if len(left) > 5 else ''}")
    if dtype is not None:
        model = model.to(dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.eval()
    return model
