#!/usr/bin/env python
"""Regenerate llama.cpp's results for the tests' conformance pack (tests/golden/conformance-llama.cpp/).

Needs llama-cpp-python and lfm2np's own dependencies in one environment: ``tools/setup_llama_cpp.sh --build``
installs both into vendor/venv-llama. Then, from the repository's root::

    PYTHONPATH=. vendor/venv-llama/bin/python tools/make_conformance_fixtures.py

It
1. makes the pack the tests make (the embedded model, tests/data/conformance_prompts.json, float32), in a
   temporary directory;
2. writes the embedded model as an F32 GGUF with its tokenizer (:func:`lfm2np.io.gguf_write.write_gguf`: the
   metadata llama.cpp's converter writes), named ``tiny-lfm2-moe.gguf``;
3. runs ``lfm2np conformance run PACK --backend llama.cpp tiny-lfm2-moe.gguf`` (llama.cpp through llama-cpp-python:
   an F32 KV cache, no flash attention, every feed's logits, a rollback through ``llama_memory_seq_rm``) on the
   oneshot cases of the text and the conversation, every decoding scenario and llama.cpp's own prompt
   (``data/llamacpp-tiny-lfm2-moe.bin`` and ``-tokens.bin``, tokenized by llama.cpp);
4. keeps every row of the oneshot cases and the last row of each decoding feed (what ``conformance check``
   accepts: a backend may give either), so that the committed files stay small (~0.6 MB);
5. writes them, with ``results.json`` (the backend, llama-cpp-python's version, the pack's config hash), into
   tests/golden/conformance-llama.cpp/.

tests/test_conformance.py checks them against the pack it makes, without llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lfm2np  # noqa: E402
from lfm2np.cli import main as lfm2np_main  # noqa: E402
from lfm2np.embedded import embedded_model_path  # noqa: E402
from lfm2np.io.gguf_write import write_gguf  # noqa: E402
from lfm2np.oracle.dumps import read_arrays  # noqa: E402
from lfm2np.oracle.golden import save_arrays  # noqa: E402

PROMPTS = ROOT / "tests" / "data" / "conformance_prompts.json"
CASES = ["oneshot-text", "oneshot-chat", "decode-*", "llama.cpp"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "golden" / "conformance-llama.cpp")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lfm2np-conformance-") as tmp:
        tmp = Path(tmp)
        pack, results, gguf = tmp / "pack", tmp / "results", tmp / "tiny-lfm2-moe.gguf"
        assert lfm2np_main(["conformance", "make", "embedded", "--prompts", str(PROMPTS), "--out", str(pack)]) == 0
        source = embedded_model_path()
        model = lfm2np.load(source, memory_budget="all")
        params = {name: np.asarray(model.params[name]) for name in model.params}
        write_gguf(gguf, model.config, params, "F32", tokenizer=source, name="tiny-lfm2-moe")
        assert lfm2np_main(["conformance", "run", str(pack), "--backend", "llama.cpp", str(gguf), "--out",
                            str(results), "--cases", *CASES]) == 0
        if args.out.exists():
            shutil.rmtree(args.out)
        (args.out / "cases").mkdir(parents=True)
        (args.out / "data").mkdir()
        for f in sorted((results / "cases").glob("*.npz")):
            arrays = read_arrays(f, True)[0]
            if not f.stem.startswith("oneshot-"):
                arrays = {k: v[-1:] if k.startswith("logits.") else v for k, v in arrays.items()}
            save_arrays(arrays, args.out / "cases" / f.name)
        for f in sorted((results / "data").glob("llamacpp-*")):
            shutil.copyfile(f, args.out / "data" / f.name)
        meta = json.loads((results / "results.json").read_text())
        meta.update(pack="(the pack tests/test_conformance.py makes)", gguf=gguf.name,
                    trimmed="decoding feeds: their last row only")
        (args.out / "results.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote llama.cpp's results to {args.out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
