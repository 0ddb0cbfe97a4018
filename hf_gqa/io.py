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
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .architectures import AttentionAdapter, get_adapter
from .attention import set_attention
from .cache import install_cache
from .memory import large_allocations_mapped
from .patch import META_KEY
from .remote import install_save_hook


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


def to_model_keys(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo the key renamings transformers applies when saving (e.g. GPT-NeoX's `lm_head.` saved as `embed_out.`)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:  # a transformers version without checkpoint conversion mappings
        return state
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    expected = model.state_dict().keys()
    return {(k if k in expected else apply_renamings(k, renamings)): v for k, v in state.items()}


def rebuild_layout(model: PreTrainedModel, kv_heads: list[int], meta: dict) -> None:
    """Give `model` (built as the original architecture, weights loaded or empty) the converted layout recorded in
    a checkpoint: each attention module becomes its family's converted module with `kv_heads[i]` KV heads, the
    config records `meta`, and `generate()` uses a `GQACache`. Converts no weights: load the saved ones next."""
    adapter: AttentionAdapter = get_adapter(model)
    modules = adapter.attention_modules(model)
    if len(modules) != len(kv_heads):
        raise ValueError(
            f"the checkpoint records {len(kv_heads)} attention layers; the model has {len(modules)}."
        )
    for (name, module), heads in zip(modules, kv_heads):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, adapter.rebuild(module, heads))
    config = model.config.get_text_config(decoder=True)
    for key, value in adapter.config_updates(config, kv_heads).items():
        setattr(config, key, value)
    setattr(config, META_KEY, meta)
    install_cache(model)
    install_save_hook(model)
    set_attention(model)


def empty_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model of `config` on the meta device (no weight in memory); where `config` records an hf_gqa
    conversion, the original architecture re-shaped to the converted layout (`rebuild_layout`). `config` is
    changed in place to describe that original architecture."""
    meta = getattr(config, META_KEY, None)
    if meta:
        _adapter_for_config(config).restore_config(config, meta)
        delattr(config, META_KEY)
    # init_empty_weights allocates each parameter on the CPU (untouched) before moving it to meta: mapped, not from
    # glibc's heap, where those blocks would stay free and later hold a layer's weights that stay resident when
    # freed (0.26 GiB of heap per 3B model built; an onloaded 3B run peaked 1.45 GiB after planning, 1.20 without)
    with large_allocations_mapped(), init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    if meta:
        rebuild_layout(model, list(meta["kv_heads"]), meta)
    return model


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
        if (
            meta and _adapter_for_config(config).rebuild_on_load
        ):  # the loaded weights, in our attention modules
            rebuild_layout(model, list(meta["kv_heads"]), meta)
        elif meta:
            install_cache(model)
            set_attention(model)
        return model.eval()

    # The saved GQA layout on empty weights, then filled.
    model = empty_model(config)
    model.load_state_dict(to_model_keys(model, _saved_state(Path(path))), strict=False, assign=True)
    model.tie_weights()
    left = [
        n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"
    ]
    if left:
        raise ValueError(f"{path} lacks tensors for {left[:5]}{'...' if len(left) > 5 else ''}")
    if dtype is not None:
        model = model.to(dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.eval()


def _saved_state(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in _state_dict_files(path):
        state.update(load_file(str(file)))
    return state
