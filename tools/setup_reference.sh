#!/usr/bin/env bash
# Create (or update) the reference environment used to regenerate golden fixtures:
# a virtual environment at .venv-ref/ (git-ignored via `.venv-*/`) holding the CPU build of torch,
# a pinned transformers, and lfm2np itself in editable mode.
#
#   bash tools/setup_reference.sh          # then: .venv-ref/bin/python tools/make_fixtures.py
#
# Safe to run again: an existing .venv-ref/ is reused, and pip only installs what is missing.
#
# Pins:
#   torch==2.13.0         the CPU wheel (2.13.0+cpu). A bare "torch" would pull a multi-GB CUDA build.
#   transformers==5.24.0  the release whose models/lfm3/ the LFM3 fixtures and notes were read from.
#                         (5.24.0 is the only 5.24.x release.)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LFM2NP_REF_VENV:-$repo/.venv-ref}"
python="${PYTHON:-python3}"

TORCH_PIN="torch==2.13.0"
TRANSFORMERS_PIN="transformers==5.24.0"

if [ -x "$venv/bin/python" ]; then
    echo "setup_reference: reusing $venv"
else
    echo "setup_reference: creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi

pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip
# torch first and on its own, so the pin decides which build is chosen before anything depends on it.
"${pip[@]}" install --quiet "$TORCH_PIN"
"${pip[@]}" install --quiet \
    "$TORCH_PIN" \
    "$TRANSFORMERS_PIN" \
    numpy \
    safetensors \
    tokenizers \
    jinja2 \
    gguf
# lfm2np itself, editable, without re-resolving its dependencies (they are installed above).
"${pip[@]}" install --quiet --no-deps -e "$repo"

"$venv/bin/python" - <<'EOF'
import torch, transformers, numpy, safetensors, tokenizers, jinja2, gguf, lfm2np
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert torch.version.cuda is None, f"expected the CPU build of torch, got CUDA {torch.version.cuda}"
from transformers import Lfm3Config, Lfm3ForCausalLM  # noqa: F401  (LFM3 is present in this release)
print(f"setup_reference: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"numpy {numpy.__version__}, lfm2np from {lfm2np.__file__}")
EOF
