"""Loading models: the one place that knows checkpoints on disk, Hub ids, GGUF files, hf_gqa-converted folders and
the packaged default model. Every entry point (the command line, `compare`, `bench`, the lm-eval model, the
benchmarks) loads through `load_model` / `load_tokenizer`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .checks import is_dequantized_gguf

#: `model` name of the packaged default model (SmolLM2-135M-Instruct GGUF, see `hf_gqa.default_model`).
DEFAULT_MODEL = "smollm2"


def forget_gguf_quantizer(model: PreTrainedModel) -> None:
    """Drop the GGUF marker of a model transformers de-quantized on load, so that it converts, trains and saves
    as the ordinary float model it is (a no-op for any other model)."""
    if is_dequantized_gguf(model):
        model.hf_quantizer = None
        if "is_quantized" in model.__dict__:  # set as a plain attribute when transformers loads a GGUF file
            model.is_quantized = False
        model.config.__dict__.pop("quantization_config", None)


class ModelLoadError(OSError):
    """A model path that does not exist, or a model that transformers could not load."""


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
    `model` may be left out. `model="smollm2"` names the packaged SmolLM2-135M-Instruct (`hf_gqa.default_model`: its cached
    transformers folder, or the GGUF).
    """
    if model == DEFAULT_MODEL and gguf_file is None and not Path(model).exists():
        from .default_model import source

        return source()
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
    """Load a causal LM from a folder, a Hub id or a GGUF file; hf_gqa-converted checkpoints included, in eval mode.

    Args:
        model: a local folder, a Hub id, or `"smollm2"` (the packaged default model); see `split_gguf`.
        gguf_file: a GGUF file name inside `model`, or a path to one. GGUF weights are de-quantized to float32
            unless `dtype` says otherwise, and marked as the plain float model they then are.
        dtype: `"float32"`, `"bfloat16"`, `torch.float16`, `"auto"`, ... (default: as saved).
        device: where to put the model (default: where transformers loads it, the CPU).

    Raises:
        ModelLoadError: a local path that does not exist (at once, before any Hub request), or a model transformers
            could not load.
    """
    from .attention import set_attention
    from .cache import install_cache
    from .io import from_pretrained, needs_hf_gqa_to_load
    from .patch import is_patched

    model, gguf_file = split_gguf(model, gguf_file)
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
    forget_gguf_quantizer(loaded)
    if is_patched(loaded):
        install_cache(loaded)
        set_attention(loaded)
    if device:
        loaded.to(device)
    return loaded.eval()


def load_tokenizer(model: str, gguf_file: str | None = None):
    """The tokenizer of `model` (same arguments as `load_model`)."""
    model, gguf_file = split_gguf(model, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(model, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load a tokenizer from {model!r}: {err}") from err
