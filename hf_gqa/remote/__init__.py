"""Converted checkpoints of multi-head-only families that load without hf_gqa (transformers remote code).

transformers cannot build GPT-2, OPT, GPT-NeoX, GPT-J, old-architecture Falcon or Bloom with fewer key/value
heads than query heads. A converted checkpoint of one of these families therefore carries its modeling code:
`modeling_hf_gqa.py` (this package's standalone module, which imports torch and transformers only) is copied into
the folder, and `config.json` gets

    "auto_map": {"AutoModel": "modeling_hf_gqa.<Family>GQAModel",
                 "AutoModelForCausalLM": "modeling_hf_gqa.<Family>GQA...ForCausalLM"},
    "architectures": ["<Family>GQA...ForCausalLM"],
    "num_key_value_heads": K                                    (every layer has K key/value heads), or
    "per_layer_config": {"0": {"num_key_value_heads": K_0}, ...}  (transformers' heterogeneous config)

so that `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (and `AutoModel`, the base model) loads
it anywhere transformers runs, and vLLM's Transformers backend serves GPT-2, OPT, GPT-NeoX and GPT-J checkpoints
with `trust_remote_code=True` (it builds the `AutoModel` class and sizes each layer's KV cache from the KV-head
entries, as transformers' static cache does). The layout itself is read from `config.hf_gqa["kv_heads"]`.
`hf_gqa.from_pretrained(path)` keeps loading it with hf_gqa's own modules (transformers prefers its built-in class
over the `auto_map` unless told to trust remote code). Natively-GQA families stay standard checkpoints: nothing is
added to them.

`patch` and `hf_gqa.from_pretrained` install `RemoteCodeSaver` as the model's `save_pretrained`, and the streamed
`convert_checkpoint` calls `add_remote_code` on its output; `add_remote_code(path)` also upgrades a checkpoint
saved before this existed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from ..architectures import ADAPTERS
from . import modeling_hf_gqa

logger = logging.getLogger("hf_gqa")

#: The file copied into checkpoints (the module's own source).
MODELING_FILE = Path(modeling_hf_gqa.__file__).name
#: The `auto_map` entry transformers reads for causal LMs.
AUTO_CLASS = "AutoModelForCausalLM"
#: The `auto_map` entries written, each with the classes of `modeling_hf_gqa.py` it names per `model_type`.
AUTO_CLASSES: dict[str, dict[str, type[PreTrainedModel]]] = {
    "AutoModel": modeling_hf_gqa.BASE_MODEL_CLASSES,
    AUTO_CLASS: modeling_hf_gqa.CAUSAL_LM_CLASSES,
}
#: The `config.json` entries that state the KV heads in transformers' terms (written by `kv_heads_config`).
KV_HEADS_KEYS = ("num_key_value_heads", "per_layer_config")


def remote_class_name(config: PretrainedConfig) -> str | None:
    """The class of `modeling_hf_gqa.py` that loads a checkpoint of `config` without hf_gqa, or None where none is
    needed (not converted by hf_gqa, or a natively-GQA family whose standard transformers class loads it)."""
    config = config.get_text_config(decoder=True)
    if not getattr(config, modeling_hf_gqa.META_KEY, None):
        return None
    adapter = next((a for a in ADAPTERS if a.matches_config(config)), None)
    if adapter is None or adapter.native_gqa:
        return None
    cls = modeling_hf_gqa.CAUSAL_LM_CLASSES.get(config.model_type)
    return cls.__name__ if cls is not None else None


def kv_heads_config(kv_heads: list[int]) -> dict[str, object]:
    """The `config.json` entries that state the key/value heads of each layer in transformers' terms, which vLLM
    (`get_total_num_kv_heads`, `get_per_layer_hf_configs`) and transformers' static cache (`get_head_shapes`) read:
    `{"num_key_value_heads": K}` when every layer has `K`, else transformers' heterogeneous config
    `{"per_layer_config": {"0": {"num_key_value_heads": K_0}, ...}}` (keys zero-padded as transformers writes
    them). The modeling file builds the layers from `config.hf_gqa["kv_heads"]`, never from these."""
    if len(set(kv_heads)) == 1:
        return {"num_key_value_heads": kv_heads[0]}
    digits = len(str(len(kv_heads) - 1))
    return {
        "per_layer_config": {str(i).zfill(digits): {"num_key_value_heads": k} for i, k in enumerate(kv_heads)}
    }


def add_remote_code(path: str | os.PathLike, config: PretrainedConfig | None = None) -> list[Path]:
    """Make the checkpoint folder `path` loadable without hf_gqa where its family needs it: copy
    `modeling_hf_gqa.py` into it, point `config.json`'s `auto_map` (`AutoModel`, `AutoModelForCausalLM`) and
    `architectures` at the family's classes, and state the KV heads per layer (`kv_heads_config`).

    Args:
        path: a folder with a `config.json` written by `save_pretrained` (or `convert_checkpoint`).
        config: the config saved there, if at hand (read from `path` otherwise).

    Returns:
        The files written (none for a checkpoint that plain transformers loads already).
    """
    path = Path(path)
    config = config if config is not None else AutoConfig.from_pretrained(path)
    name = remote_class_name(config)
    config_file = path / "config.json"
    saved = json.loads(config_file.read_text())
    auto_map = dict(saved.get("auto_map") or {})
    ours = {k for k, v in auto_map.items() if str(v).startswith(f"{Path(MODELING_FILE).stem}.")}
    if name is None:
        _warn_if_hf_gqa_only(config, path)
        if ours:  # stale entries of ours: the checkpoint is standard now
            for key in ours:
                del auto_map[key]
            if not _is_natively_gqa(config):  # a multi-head model again: its KV heads are its query heads
                for key in KV_HEADS_KEYS:
                    saved.pop(key, None)
            _write_config(config_file, saved, auto_map)
            return [config_file]
        return []
    model_type = config.get_text_config(decoder=True).model_type
    for auto_class, classes in AUTO_CLASSES.items():
        auto_map[auto_class] = f"{Path(MODELING_FILE).stem}.{classes[model_type].__name__}"
    saved["architectures"] = [name]
    for key in KV_HEADS_KEYS:
        saved.pop(key, None)
    kv_heads = [
        int(k) for k in getattr(config.get_text_config(decoder=True), modeling_hf_gqa.META_KEY)["kv_heads"]
    ]
    saved.update(kv_heads_config(kv_heads))
    _write_config(config_file, saved, auto_map)
    target = path / MODELING_FILE
    shutil.copyfile(modeling_hf_gqa.__file__, target)
    return [target, config_file]


def _is_natively_gqa(config: PretrainedConfig) -> bool:
    adapter = next((a for a in ADAPTERS if a.matches_config(config.get_text_config(decoder=True))), None)
    return adapter is not None and adapter.native_gqa


def _warn_if_hf_gqa_only(config: PretrainedConfig, path: Path) -> None:
    """Say so when a checkpoint loads with `hf_gqa.from_pretrained` only: a natively-GQA family with different KV
    heads per layer, which neither its transformers class (one `num_key_value_heads` for all layers) nor any remote
    code written here builds."""
    from ..io import needs_hf_gqa_to_load

    if needs_hf_gqa_to_load(config):
        logger.warning(
            "hf_gqa: %s holds a %s model with different KV heads per layer (%s): it loads with "
            "hf_gqa.from_pretrained only (transformers' class takes one KV head count for every layer). Convert "
            "with one KV head count for all layers for a standard checkpoint.",
            path,
            config.model_type,
            getattr(config.get_text_config(decoder=True), modeling_hf_gqa.META_KEY)["kv_heads"],
        )


def _write_config(config_file: Path, saved: dict, auto_map: dict[str, str]) -> None:
    """Write `saved` with `auto_map` (dropped when empty) as transformers writes `config.json`."""
    if auto_map:
        saved["auto_map"] = auto_map
    else:
        saved.pop("auto_map", None)
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


class RemoteCodeSaver:
    """A converted model's `save_pretrained`: the model class's own, then `add_remote_code` on the folder.

    An object rather than a closure, so that a patched model pickles and deep-copies (it holds the model it serves).
    `push_to_hub=True` saves locally first, then pushes with `model.push_to_hub` (which saves through this again).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, *args, **kwargs):
        model = self.model
        push = kwargs.pop("push_to_hub", False)
        hub = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "private") if k in kwargs}
        result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        saved = Path(save_directory, "config.json").is_file()
        if saved and kwargs.get("is_main_process", True) and not kwargs.get("distributed_checkpoint", False):
            add_remote_code(save_directory, model.config)
            if push:
                repo_id = hub.pop("repo_id", Path(save_directory).name)
                if "max_shard_size" in kwargs:
                    hub["max_shard_size"] = kwargs["max_shard_size"]
                model.push_to_hub(repo_id, token=kwargs.get("token"), **hub)
        return result


def install_save_hook(model: PreTrainedModel) -> None:
    """Make `model.save_pretrained` write the modeling code and `auto_map` a converted multi-head-only family needs
    to load without hf_gqa (a no-op at save time for everything else)."""
    model.save_pretrained = RemoteCodeSaver(model)


__all__ = ["RemoteCodeSaver", "add_remote_code", "install_save_hook", "kv_heads_config", "remote_class_name"]
