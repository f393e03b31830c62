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
#   transformers==5.25.0  has lfm2, lfm2_moe, lfm3 and lfm2_vl (the LFM3 fixtures were made with 5.24.0, whose
#                         models/lfm3/ computes the same; 5.25 adds nothing there that the fixtures see).
#   torchvision==0.28.0   transformers' LFM2-VL image processor imports it. Its only wheel for torch 2.13 is a CUDA
#                         build: installed without dependencies (it would pull CUDA torch) and imported through
#                         tools/torchvision_cpu.py, which makes its fake-operator registrations tolerant on CPU torch.
#   pillow                to decode images, as transformers' load_image does.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LFM2NP_REF_VENV:-$repo/.venv-ref}"
python="${PYTHON:-python3}"

TORCH_PIN="torch==2.13.0"
TRANSFORMERS_PIN="transformers==5.25.0"
TORCHVISION_PIN="torchvision==0.28.0"

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
    pillow \
    gguf
"${pip[@]}" install --quiet --no-deps "$TORCHVISION_PIN"
# lfm2np itself, editable, without re-resolving its dependencies (they are installed above).
"${pip[@]}" install --quiet --no-deps -e "$repo"

"$venv/bin/python" - "$repo/tools" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import torchvision_cpu  # noqa: F401  (torchvision's CUDA wheel, imported on CPU torch)
import torch, transformers, numpy, safetensors, tokenizers, jinja2, gguf, lfm2np
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert torch.version.cuda is None, f"expected the CPU build of torch, got CUDA {torch.version.cuda}"
from transformers import Lfm3Config, Lfm3ForCausalLM  # noqa: F401  (LFM3 is present in this release)
from transformers import Lfm2VlForConditionalGeneration  # noqa: F401  (and LFM2-VL)
print(f"setup_reference: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"numpy {numpy.__version__}, lfm2np from {lfm2np.__file__}")
EOF
