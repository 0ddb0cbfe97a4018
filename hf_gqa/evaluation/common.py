"""Helpers shared by `compare`, `bench` and the command line: model loading, KV layouts, the environment."""

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
from ..cache import kv_bytes_per_token

#: `--model` name of the packaged default model (SmolLM2-135M-Instruct GGUF, see `hf_gqa.default_model`).
DEFAULT_MODEL = "smollm2"


class ModelLoadError(OSError):
    """A model path that does not exist, or a model that transformers could not load."""


@dataclass
class KVLayout:
    """Per attention layer: query heads, KV heads and head_dim of a model hf_gqa can convert."""

    num_heads: list[int]
    kv_heads: list[int]
    head_dim: list[int]

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV-cache bytes one token takes, all layers together: `sum(2 * kv_heads * head_dim * itemsize)`."""
        return sum(kv_bytes_per_token(self.kv_heads, self.head_dim, dtype))

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


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """`"bfloat16"` -> `torch.bfloat16`; `"auto"` and None pass through."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto.")
    return value


def split_gguf(model: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    """`(folder or Hub id, GGUF file name)` from `--model` and `--gguf-file`.

    `gguf_file` is a file name inside the `model` folder (or Hub repository), or a path to the file, in which case
    `model` may be left out. `model="smollm2"` names the packaged SmolLM2-135M-Instruct GGUF (`hf_gqa.default_model`).
    """
    if model == DEFAULT_MODEL and gguf_file is None and not Path(model).exists():
        from ..default_model import GGUF_FILE, gguf_dir

        return str(gguf_dir()), GGUF_FILE
    if gguf_file and (model is None or os.sep in gguf_file or "/" in gguf_file):
        path = Path(gguf_file).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {gguf_file}")
        return str(path.resolve().parent), path.name
    if model is None:
        raise ModelLoadError("no model given: pass --model (a folder or a Hub id) or --gguf-file PATH.gguf.")
    return model, gguf_file


def check_model_path(model: str, gguf_file: str | None = None) -> None:
    """Raise `ModelLoadError` for a local model path that does not exist (a Hub id such as `org/name` passes)."""
    path = Path(model).expanduser()
    local = model.startswith((".", "/", "~")) or path.exists() or model.count("/") > 1
    if local and not path.exists():
        raise ModelLoadError(f"no such model folder: {model}")
    if local and path.is_dir() and gguf_file is None and not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds GGUF files ({', '.join(ggufs)}): pass --gguf-file." if ggufs else ""
        raise ModelLoadError(f"{model} has no config.json, so it is not a transformers model folder.{hint}")
    if gguf_file is not None and path.is_dir() and not (path / gguf_file).exists():
        raise ModelLoadError(f"no GGUF file {gguf_file!r} in {model}")


def load_model(
    model: str,
    gguf_file: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a folder, a Hub id or a GGUF file; hf_gqa-converted checkpoints included.

    GGUF weights are de-quantized to float32 unless `dtype` says otherwise.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..cache import install_cache
    from ..io import from_pretrained, needs_hf_gqa_to_load
    from ..patch import _set_attention, is_patched

    check_model_path(model, gguf_file)
    torch_dtype = resolve_dtype(dtype)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(model, **kwargs)
        if needs_hf_gqa_to_load(config):
            loaded = from_pretrained(model, dtype=None if torch_dtype == "auto" else torch_dtype)
        else:
            if torch_dtype is None:
                torch_dtype = torch.float32 if gguf_file else "auto"
            loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, **kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"could not load {model!r}{f' ({gguf_file})' if gguf_file else ''}: it is neither a local model folder "
            f"nor a model the Hugging Face Hub could provide ({err})"
        ) from err
    if gguf_file:
        _forget_gguf_quantizer(loaded)
    if is_patched(loaded):
        install_cache(loaded)
        _set_attention(loaded, None)
    if device:
        loaded.to(device)
    return loaded.eval()


def _forget_gguf_quantizer(model: PreTrainedModel) -> None:
    """A GGUF checkpoint is de-quantized to floats on load; drop its quantizer marker so that it converts and saves
    like any float model."""
    model.hf_quantizer = None
    model.is_quantized = False  # an instance attribute transformers sets while loading
    model.config.__dict__.pop("quantization_config", None)


def load_tokenizer(model: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(model, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load a tokenizer from {model!r}: {err}") from err


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
    if device.type == "cuda" and torch.cuda.is_available():
        env["machine"]["gpu"] = torch.cuda.get_device_name(device)
    try:
        env["machine"]["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return env
