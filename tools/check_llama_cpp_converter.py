#!/usr/bin/env python
"""Opt-in check against llama.cpp's own converter (not part of CI): GGUF files made by ``convert_hf_to_gguf.py``
from tiny LFM2 checkpoints, read by lfm2np.

    tools/setup_llama_cpp.sh                       # the llama.cpp sources under vendor/ (git-ignored)
    tools/setup_reference.sh                       # .venv-ref: torch + transformers, which the converter needs
    .venv/bin/python tools/check_llama_cpp_converter.py [--keep DIR]

For two checkpoints -- the embedded tiny LFM2-MoE (lfm2np/data/tiny-lfm2-moe: a real-layout 3072-token
tokenizer, its tokenizer_config.json and chat template, bf16 weights) and a tiny random dense LFM2 carrying the
same tokenizer files -- and for each of ``--outtype f32`` and ``q8_0``, with and without ``--fuse-qkv``, it runs
the vendored converter in the reference environment and checks:

1. lfm2np.io.gguf_write.write_gguf(..., tokenizer=checkpoint, fuse_qkv=...) writes the same metadata (every
   key but the informational ``general.*`` ones: name, file type, size label) and the same tensors, bit for
   bit, as the converter;
2. lfm2np.load(file) gives the checkpoint's config and (f32) exactly the checkpoint's logits, (q8_0) exactly
   the logits of gguf-py's dequantisation;
3. Tokenizer.from_gguf(file) encodes and decodes the test texts exactly as the checkpoint's tokenizer.json,
   renders the same chat template, and greedy generation from the f32 file equals the checkpoint's;
4. with ``--llama-python`` (default: vendor/venv-llama/bin/python when tools/setup_llama_cpp.sh --build made
   it), llama.cpp itself loads each f32 file: its logits for the test ids (one batch, F32 KV cache) against
   lfm2np's, and its tokenization of the test texts (``special=True``) against the tokenizer.json's; the one
   known difference is printed, not failed (llama.cpp's regex has ASCII-only contractions: ``'ſ``).

One patch is applied to the converter: ``get_vocab_base_pre`` recognises tokenizers by a hash of the token
ids of a check text, which only the real LFM2 tokenizers match; these test tokenizers have LFM2's layout
and pre-tokenizer but another vocabulary, so the patch returns ``"lfm2"``, the name the real hash gives.
Prints one line per case and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import lfm2np  # noqa: E402
from lfm2np.embedded import embedded_model_path  # noqa: E402
from lfm2np.generate import generate  # noqa: E402
from lfm2np.io.gguf_file import GgufFile  # noqa: E402
from lfm2np.io.gguf_write import write_gguf  # noqa: E402
from lfm2np.io.safetensors import save_checkpoint  # noqa: E402
from lfm2np.io.tokenizer import Tokenizer  # noqa: E402
from lfm2np.synthetic import random_params  # noqa: E402
from tokenizer_fixture import TEXTS  # noqa: E402

LLAMA = ROOT / "vendor" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
IDS = np.array([1, 5, 17, 42, 3, 96, 0, 64, 7, 11, 2, 30])
#: Run inside the reference environment: the converter with the pre-tokenizer hash patched (see above).
RUNNER = """
import runpy, sys
llama = sys.argv[1]
sys.path[:0] = [llama, llama + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "lfm2"
sys.argv = [llama + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


#: Run with llama-cpp-python: tokenize the texts, evaluate the ids as one batch with an F32 KV cache.
LLAMA_CHILD = """
import ctypes, json, sys
import numpy as np
import llama_cpp
quiet = llama_cpp.llama_log_callback(lambda *a: None)
llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
path, work = sys.argv[1], sys.argv[2]
texts, ids = json.load(open(work + "/texts.json")), json.load(open(work + "/ids.json"))
llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=len(ids), n_ubatch=len(ids), logits_all=True,
                      n_threads=2, verbose=False, type_k=0, type_v=0)
json.dump([llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts],
          open(work + "/tokens.json", "w"))
llm.eval(ids)
np.save(work + "/logits.npy", np.array(llm.scores[:len(ids), :llm.n_vocab()], dtype=np.float64))
"""


def llama_cpp_check(llama_python: str, path: Path, work: Path) -> list[str]:
    """llama.cpp's logits and tokenization against lfm2np's (see the module docstring, check 4)."""
    import json

    tok = Tokenizer.from_gguf(path)
    (work / "texts.json").write_text(json.dumps(TEXTS))
    (work / "ids.json").write_text(json.dumps([int(i) for i in IDS]))
    result = subprocess.run([llama_python, "-c", LLAMA_CHILD, str(path), str(work)], capture_output=True, text=True)
    if result.returncode:
        return [f"llama.cpp failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else '?'}"]
    theirs = np.load(work / "logits.npy")
    ours = lfm2np.load(path, dtype="float64").forward(IDS)
    problems, notes = [], []
    rel = float(np.abs(ours - theirs).max() / np.abs(ours).max())
    if rel > 1e-5 or not (ours.argmax(-1) == theirs.argmax(-1)).all():
        problems.append(f"llama.cpp logits (max rel diff {rel:.1e})")
    differ = [t for t, ids in zip(TEXTS, json.loads((work / "tokens.json").read_text())) if ids != tok.encode(t)]
    for t in differ:
        (notes if "\u017f" in t else problems).append(f"llama.cpp tokenizes {t[:24]!r} differently")
    print(f"    llama.cpp: logits max rel diff {rel:.1e}; tokenization equal on {len(TEXTS) - len(differ)}/"
          f"{len(TEXTS)} texts{' (' + '; '.join(notes) + ': the known ASCII-contraction difference)' if notes else ''}")
    return problems


def checkpoints(root: Path) -> dict[str, Path]:
    moe = root / "moe"
    shutil.copytree(embedded_model_path(), moe)
    dense = root / "dense"
    c = lfm2np.load_config("tiny-dense").replace(vocab_size=3072, hidden_size=64, num_attention_heads=4,
                                                 num_key_value_heads=2, intermediate_size=128, bos_token_id=1,
                                                 eos_token_id=(7,), pad_token_id=0)
    save_checkpoint(dense, c, random_params(c, seed=3))
    for name in TOKENIZER_FILES:
        shutil.copy(moe / name, dense / name)
    return {"moe": moe, "dense": dense}


def convert(ref_python: str, checkpoint: Path, out: Path, outtype: str, fuse: bool) -> None:
    argv = [ref_python, "-c", RUNNER, str(LLAMA), str(checkpoint), "--outfile", str(out), "--outtype", outtype]
    result = subprocess.run(argv + (["--fuse-qkv"] if fuse else []), capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"convert_hf_to_gguf.py failed on {checkpoint}:\n{result.stderr[-3000:]}")


def same_file(real: Path, ours: Path) -> list[str]:
    problems = []
    with GgufFile(real) as a, GgufFile(ours) as b:
        keys = {k for k in set(a.metadata) | set(b.metadata) if not k.startswith("general.")}
        for k in sorted(keys):
            if k not in a.metadata or k not in b.metadata or a.metadata[k] != b.metadata[k] or a.types[k] != b.types[k]:
                problems.append(f"metadata {k}")
        for name in sorted(set(a.tensors) | set(b.tensors)):
            ta, tb = a.tensors.get(name), b.tensors.get(name)
            if ta is None or tb is None or ta.ne != tb.ne or ta.ggml_type != tb.ggml_type \
                    or not np.array_equal(a.data(name), b.data(name)):
                problems.append(f"tensor {name}")
    return problems


def check(name: str, checkpoint: Path, real: Path, ours: Path, outtype: str) -> list[str]:
    problems = same_file(real, ours)
    reference = lfm2np.load(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converter-made file must load without a warning
        model = lfm2np.load(real)
        tok = Tokenizer.from_gguf(real)
    if model.config != reference.config:
        problems.append("config")
    if outtype == "f32":
        if not np.array_equal(model.forward(IDS), reference.forward(IDS)):
            problems.append("logits")
    else:  # exactly the model of the dequantised values (lfm2np's own dequantisation is gguf-py's)
        dequantised = lfm2np.Model(model.config, {n: np.array(model.params[n]) for n in model.params})
        if not np.array_equal(model.forward(IDS), dequantised.forward(IDS)):
            problems.append("logits")
    ref_tok = Tokenizer.from_dir(checkpoint)
    for text in TEXTS:
        ids = ref_tok.encode(text, add_bos=True)
        if tok.encode(text, add_bos=True) != ids or tok.decode(ids) != ref_tok.decode(ids):
            problems.append(f"tokenizer on {text[:20]!r}")
            break
    chat = [{"role": "user", "content": "Hello!"}]
    if tok.chat_template != ref_tok.chat_template or tok.encode_chat(chat) != ref_tok.encode_chat(chat):
        problems.append("chat template")
    if outtype == "f32" and generate(model, tok.encode_chat(chat), 12, stop_ids=[]) != \
            generate(reference, ref_tok.encode_chat(chat), 12, stop_ids=[]):
        problems.append("greedy generation")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref-python", default=str(ROOT / ".venv-ref" / "bin" / "python"),
                   help="a Python with torch and transformers (default .venv-ref)")
    p.add_argument("--keep", type=Path, help="keep the checkpoints and GGUF files in this directory")
    default_llama = ROOT / "vendor" / "venv-llama" / "bin" / "python"
    p.add_argument("--llama-python", default=str(default_llama) if default_llama.is_file() else None,
                   help="a Python with llama-cpp-python (default vendor/venv-llama/bin/python, if present)")
    args = p.parse_args()
    if not (LLAMA / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{LLAMA}: no llama.cpp sources; run tools/setup_llama_cpp.sh first")
    root = args.keep or Path(tempfile.mkdtemp(prefix="lfm2np-converter-"))
    root.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name, checkpoint in checkpoints(root).items():
        source = lfm2np.load(checkpoint)
        for outtype in ("f32", "q8_0"):
            for fuse in (False, True):
                label = f"{name} {outtype}{' --fuse-qkv' if fuse else ''}"
                real = root / f"{name}-{outtype}{'-fused' if fuse else ''}.gguf"
                ours = real.with_name(real.stem + "-lfm2np.gguf")
                convert(args.ref_python, checkpoint, real, outtype, fuse)
                write_gguf(ours, source.config, dict(source.params), outtype.upper(), tokenizer=checkpoint,
                           fuse_qkv=fuse)
                problems = check(name, checkpoint, real, ours, outtype)
                print(f"{label:28} {'ok' if not problems else 'FAILED: ' + ', '.join(problems[:6])}", flush=True)
                if args.llama_python and outtype == "f32":
                    problems += llama_cpp_check(args.llama_python, real, root)
                failed += bool(problems)
    if not args.keep:
        shutil.rmtree(root)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
