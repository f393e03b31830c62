#!/usr/bin/env bash
# llama.cpp's own converter (and, with --build, llama.cpp itself through llama-cpp-python) under vendor/,
# which git ignores. For the opt-in checks tools/check_llama_cpp_converter.py and tools/compare_llama_cpp.py, and
# for tools/make_conformance_fixtures.py;
# the test suite never needs them. Idempotent.
#
#   tools/setup_llama_cpp.sh            # download + unpack the llama-cpp-python 0.3.36 sdist (~75 MB), which
#                                       # vendors llama.cpp: convert_hf_to_gguf.py, conversion/, gguf-py/, src/
#   tools/setup_llama_cpp.sh --build    # also build llama-cpp-python into vendor/venv-llama (~10 min, 2 cores)
#
# The converter runs in the reference environment (.venv-ref: torch + transformers, tools/setup_reference.sh)
# with the vendored gguf-py on its path; tools/check_llama_cpp_converter.py does that.
set -euo pipefail

VERSION=0.3.36
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENDOR="$ROOT/vendor"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
SDIST="llama_cpp_python-$VERSION"

mkdir -p "$VENDOR"
cd "$VENDOR"
if [ ! -f "$SDIST.tar.gz" ]; then
    "$PYTHON" -m pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d .
fi
if [ ! -d "$SDIST" ]; then
    tar xzf "$SDIST.tar.gz"
fi
LLAMA="$VENDOR/$SDIST/vendor/llama.cpp"
test -f "$LLAMA/convert_hf_to_gguf.py"
echo "llama.cpp sources: $LLAMA"

if [ "${1:-}" = "--build" ]; then
    if [ ! -x "$VENDOR/venv-llama/bin/python" ]; then
        "$PYTHON" -m venv "$VENDOR/venv-llama"
    fi
    if ! "$VENDOR/venv-llama/bin/python" -c "import llama_cpp" 2>/dev/null; then
        CMAKE_ARGS="-DGGML_NATIVE=OFF" "$VENDOR/venv-llama/bin/pip" install "./$SDIST" numpy gguf safetensors
    fi
    # lfm2np's own dependencies, so that lfm2np runs there too (tools/make_conformance_fixtures.py runs
    # `lfm2np conformance run --backend llama.cpp` in this environment)
    "$VENDOR/venv-llama/bin/pip" install tokenizers huggingface_hub jinja2
    echo "llama-cpp-python: $VENDOR/venv-llama/bin/python (run tools/compare_llama_cpp.py with it)"
fi
