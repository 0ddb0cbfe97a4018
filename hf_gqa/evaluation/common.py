"""Helpers shared by `compare`, `bench` and the command line: KV layouts and the environment of a report."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..architectures import get_adapter
from ..cache import KVQuantization, kv_bytes_per_token
from ..loading import (  # noqa: F401  (re-exported: model loading lives in hf_gqa.loading)
    DEFAULT_MODEL,
    ModelLoadError,
    check_model_path,
    load_model,
    load_tokenizer,
    resolve_dtype,
    split_gguf,
)


@dataclass
class KVLayout:
    """Per attention layer: query heads, KV heads and head_dim of a model hf_gqa can convert."""

    num_heads: list[int]
    kv_heads: list[int]
    head_dim: list[int]

    def bytes_per_token(
        self, dtype: torch.dtype, cache_config: dict | KVQuantization | None = None
    ) -> int | float:
        """KV-cache bytes one token takes, all layers together: `sum(2 * kv_heads * head_dim * itemsize)`, or
        with a quantized cache (`cache_config` as `generate()` takes it) its packed codes, scales and zero-points
        (see `hf_gqa.cache.KVQuantization`)."""
        return sum(kv_bytes_per_token(self.kv_heads, self.head_dim, dtype, cache_config))

    def is_unchanged_by(self, groups: int | list[int]) -> bool:
        """Whether patching to `groups` KV heads would leave every layer's KV head count as it is."""
        targets = [groups] * len(self.kv_heads) if isinstance(groups, int) else list(groups)
        return targets == self.kv_heads


def kv_layout(model: PreTrainedModel) -> KVLayout:
    """The current attention layout of `model` (raises `UnsupportedArchitectureError` for unknown families)."""
    adapter = get_adapter(model)
    modules = [m for _, m in adapter.attention_modules(model)]
    return KVLayout(
        num_heads=[adapter.num_heads(m) for m in modules],
        kv_heads=[adapter.num_kv_heads(m) for m in modules],
        head_dim=[adapter.head_dim(m) for m in modules],
    )


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


#: Packages a report names only where they are installed (the `quant` extra's KV-cache backends).
OPTIONAL_PACKAGES = ("optimum-quanto", "hqq")


def environment(device: torch.device | str | None = None) -> dict:
    """Versions, machine and date, for reports."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {
            "python": sys.version.split()[0],
            **{
                name: _version(name)
                for name in (
                    "hf-gqa",
                    "torch",
                    "transformers",
                    "lm_eval",
                    "evaluate",
                    "datasets",
                    "accelerate",
                )
            },
        },
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "device": str(device),
    }
    for name in OPTIONAL_PACKAGES:  # the quantized-cache backends, where installed
        if _version(name) is not None:
            env["versions"][name] = _version(name)
    if device.type == "cuda" and torch.cuda.is_available():
        env["machine"]["gpu"] = torch.cuda.get_device_name(device)
    try:
        env["machine"]["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return env
