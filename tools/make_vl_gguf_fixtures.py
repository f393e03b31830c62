#!/usr/bin/env python
"""Regenerate the LFM2-VL GGUF pair fixture (tests/golden/vl-gguf/): a tiny random LFM2-VL checkpoint, its
transformers 5.25 reference run on two images, and the two files llama.cpp's own converter makes of it -- the
text GGUF (``lfm2``) and the mmproj GGUF (``clip``, projector type ``lfm2``).

Needs the reference environment (torch, transformers 5.25, pillow) and llama.cpp's sources under vendor/
(tools/setup_llama_cpp.sh):

    PYTHONPATH=. /work/venv-ref/bin/python tools/make_vl_gguf_fixtures.py [--out tests/golden]

1. Builds and runs the checkpoint with tools/make_vl_fixtures.py's own steps (every parameter randomised, norms
   included; the released tower names ``model.vision_tower.vision_model.*``, the only ones the converter maps;
   the vision values of the trace schema, the placed embeddings and the logits recorded by forward hooks).
   llama.cpp's converter fixes the patch embedding at 16 x 16 x 3 (``view(D, 16, 16, 3)``) and llama.cpp needs
   the projector's biases, so this tower has patches of 16 and projector biases; the text tower carries the
   embedded model's tokenizer cut to 320 tokens (the text GGUF must hold a tokenizer).
2. Converts a copy of it (with the tokenizer files, and ``text_config.architectures = ["Lfm2ForCausalLM"]``, which
   the converter reads to pick the text model class of an ``Lfm2VlForConditionalGeneration``) with the vendored
   ``convert_hf_to_gguf.py``: ``--outtype f32`` to ``text-f32.gguf``, ``--mmproj`` with ``--outtype f32`` and
   ``f16`` to ``mmproj-f32.gguf`` / ``mmproj-f16.gguf``. One patch, tools/check_llama_cpp_converter.py's: the
   tokenizer's pre-tokenizer hash is taken as ``lfm2``'s (a test vocabulary has another hash). ``--llama DIR``
   names llama.cpp's sources when they are not under this checkout's vendor/ (a git worktree).
3. Quantised mmproj files, as llama.cpp releases them: the converter's own ``--mmproj --outtype q8_0`` to
   ``mmproj-q8_0.gguf`` (its rules: the patch embedding and the position embeddings stay F32, as does every 1-D
   tensor, the norms' weights and every bias; the other weights are Q8_0, or F16 where a row is not a multiple of
   Q8_0's 32-value block); and ``mmproj-q4_0.gguf``, which the converter cannot write (no Q4_0 output type):
   the Q8_0 file with each of its Q8_0 tensors quantised to Q4_0 instead, from the F32 file's values, by gguf-py's
   ``gguf.quants.quantize`` (every other tensor and every key as the converter wrote them). K-quants need rows of
   256 values; this tower's are 32 to 128 wide, so a Q4_K file would hold no Q4_K tensor. ``--quantised-only``
   writes only these two from the committed checkpoint (the rest of the fixture stays as it is).
4. With llama-cpp-python (``--llama-python``, default vendor/venv-llama/bin/python when present), checks that
   llama.cpp itself loads the text file with each mmproj (an mtmd context with vision), and records llama.cpp's
   image embeddings of ``small.png`` with each (``llama-embeddings.safetensors``: mtmd preprocesses the file and
   runs the tower and projector, one CPU thread).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import make_vl_fixtures as base  # noqa: E402  (imports torch, transformers; torchvision_cpu first)
from check_llama_cpp_converter import LLAMA, RUNNER  # noqa: E402  (the converter, its one patch)

GENERATOR_VERSION = 1
TOKENIZER = ROOT / "lfm2np" / "data" / "tiny-lfm2-moe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
NAME = "vl-gguf"
VOCAB = 320  #: the embedded tokenizer cut to its first 320 tokens (14 special, the 256 bytes, 50 merges)
TEXT = dict(model_type="lfm2", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, layer_types=["conv", "full_attention", "conv"],
            block_auto_adjust_ff_dim=False, bos_token_id=1, eos_token_id=7, pad_token_id=0)
#: upscaled to the minimum tokens / tiled into 2 x 2 tiles and a thumbnail
IMAGES = {"small": (22, 30), "tiled": (100, 130)}
#: what the reference keeps of the recorded values (the fixture stays small): inputs, the logits, the tower's
#: embeddings, each encoder layer's output, the post-layernorm, the projector's values and the placed embeddings
KEEP = ("pixel_values", "pixel_attention_mask", "spatial_shapes", "ids", "logits", "text_ids", "text_logits")
CASE = dict(
    seed=903, released_names=True,
    what="llama.cpp's converter output: text GGUF (F32) + mmproj (F32, F16, Q8_0; Q4_0 by gguf-py); patches of 16 "
         "(what the converter takes), 4 x 4 position grid; 3 tower layers, 4 heads of 8; projector LayerNorm and "
         "biases; tied head",
    vision=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, patch_size=16,
                num_patches=16),
    top=dict(projector_hidden_size=48, projector_use_layernorm=True, projector_bias=True, downsample_factor=2,
             tie_word_embeddings=True),
    processor=dict(encoder_patch_size=16, downsample_factor=2, tile_size=64, min_image_tokens=2, max_image_tokens=4,
                   min_tiles=2, max_tiles=2, use_thumbnail=True, do_image_splitting=True, max_pixels_tolerance=2.0))


def small_tokenizer(out: Path) -> None:
    """The embedded model's tokenizer files, its vocabulary cut to the first :data:`VOCAB` ids (the merges whose
    pieces and result all stay), id ``base.IMAGE_TOKEN`` made the special token ``<image>`` (where lfm2np finds
    the image placeholder of a text GGUF)."""
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER / name, out / name)
    data = json.loads((TOKENIZER / "tokenizer.json").read_text())
    vocab = {k: i for k, i in data["model"]["vocab"].items() if i < VOCAB and i != base.IMAGE_TOKEN}
    vocab["<image>"] = base.IMAGE_TOKEN
    added = dict(content="<image>", single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    data["added_tokens"].append(dict(id=base.IMAGE_TOKEN, **added))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(base.IMAGE_TOKEN)] = {k: v for k, v in added.items() if k != "content"} | \
        {"content": "<image>"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [m for m in data["model"]["merges"] if m[0] in vocab and m[1] in vocab
                               and m[0] + m[1] in vocab]
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))


def keep(name: str) -> bool:
    if name in KEEP or name.startswith(("model.multi_modal_projector.", "model.inputs_embeds")):
        return True
    tower = name[len(base.TOWER):] if name.startswith(base.TOWER) else ""
    return tower in ("embeddings", "post_layernorm") or (tower.startswith("encoder.layers.")
                                                         and tower.count(".") == 2)


def trim(reference: Path) -> None:
    """Keep the values :func:`keep` names of a reference file (same metadata)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    with safe_open(str(reference), "np") as f:
        metadata = {**f.metadata(), "generator": f"tools/make_vl_gguf_fixtures.py v{GENERATOR_VERSION}"}
        values = {k: f.get_tensor(k) for k in sorted(f.keys()) if keep(k)}
    save_file(values, str(reference), metadata=metadata)


def converter_input(directory: Path, work: Path) -> None:
    """The checkpoint of ``directory`` as the converter takes it, in ``work``: with the tokenizer files (the text
    GGUF must hold a tokenizer) and the text model's class named in ``text_config.architectures``."""
    shutil.copytree(directory, work)
    small_tokenizer(work)
    config = json.loads((work / "config.json").read_text())
    config["architectures"] = ["Lfm2VlForConditionalGeneration"]
    config["text_config"]["architectures"] = ["Lfm2ForCausalLM"]
    (work / "config.json").write_text(json.dumps(config, indent=1))


def requantise(llama: Path, q8: Path, f32: Path, out: Path, qtype: str) -> list[str]:
    """``q8`` (the converter's Q8_0 mmproj) with each Q8_0 tensor quantised to ``qtype`` from ``f32``'s values by
    gguf-py; every key and every other tensor copied. Returns the names of the requantised tensors."""
    sys.path.insert(0, str(llama / "gguf-py"))  # llama.cpp's own gguf-py (its quantisers)
    import gguf
    import numpy as np
    from lfm2np.io.gguf_file import GgufFile
    target = gguf.GGMLQuantizationType[qtype]
    source, values = gguf.GGUFReader(str(q8)), {t.name: t for t in gguf.GGUFReader(str(f32)).tensors}
    done = []
    with GgufFile(q8) as meta:
        writer = gguf.GGUFWriter(str(out), meta.metadata["general.architecture"])
        for key, value in meta.metadata.items():
            if key == "general.architecture":
                continue
            kind = meta.types[key]
            vtype = gguf.GGUFValueType[kind[0] if isinstance(kind, tuple) else kind]
            sub = gguf.GGUFValueType[kind[1]] if isinstance(kind, tuple) else None
            writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in source.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            data = np.asarray(values[t.name].data, dtype=np.float32)
            writer.add_tensor(t.name, gguf.quants.quantize(data, target), raw_dtype=target)
            done.append(t.name)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return done


def quantised(llama: Path, directory: Path, work: Path) -> dict[str, list[str]]:
    """mmproj-q8_0.gguf by the converter, mmproj-q4_0.gguf by gguf-py from it (step 3 of the docstring); the
    tensors each holds quantised."""
    convert(llama, work, directory / "mmproj-q8_0.gguf", "q8_0", mmproj=True)
    q4 = requantise(llama, directory / "mmproj-q8_0.gguf", directory / "mmproj-f32.gguf",
                    directory / "mmproj-q4_0.gguf", "Q4_0")
    return {"mmproj-q8_0.gguf": "convert_hf_to_gguf.py --mmproj --outtype q8_0",
            "mmproj-q4_0.gguf": "mmproj-q8_0.gguf, its Q8_0 tensors as Q4_0 (gguf-py, from mmproj-f32.gguf)",
            "quantised tensors": q4}


def convert(llama: Path, checkpoint: Path, out: Path, outtype: str, mmproj: bool) -> None:
    argv = [sys.executable, "-c", RUNNER, str(llama), str(checkpoint), "--outfile", str(out), "--outtype", outtype]
    result = subprocess.run(argv + (["--mmproj"] if mmproj else []), capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"convert_hf_to_gguf.py failed on {checkpoint}:\n{result.stderr[-3000:]}")


MMPROJS = ["mmproj-f32.gguf", "mmproj-f16.gguf", "mmproj-q8_0.gguf", "mmproj-q4_0.gguf"]
#: run with llama-cpp-python: llama.cpp loads the text file and, through mtmd, the mmproj with it
LLAMA_LOADS = """
import sys
import llama_cpp
from llama_cpp import mtmd_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)
params = mtmd_cpp.mtmd_context_params_default()
params.use_gpu, params.n_threads = False, 1
ctx = mtmd_cpp.mtmd_init_from_file(sys.argv[2].encode(), llm.model, params)
sys.exit(0 if ctx and mtmd_cpp.mtmd_support_vision(ctx) else 1)
"""


#: run with llama-cpp-python: mtmd's image embeddings of one image file (its own preprocessing, one thread), saved
#: as float32 (n_tokens, n_embd) to argv[4]
LLAMA_EMBEDDINGS = """
import ctypes, sys
import numpy as np
import llama_cpp
from llama_cpp import mtmd_cpp as M
text, mmproj, image, out = sys.argv[1:5]
llm = llama_cpp.Llama(model_path=text, n_ctx=512, n_threads=1, verbose=False)
params = M.mtmd_context_params_default()
params.use_gpu, params.n_threads, params.print_timings = False, 1, False
ctx = M.mtmd_init_from_file(mmproj.encode(), llm.model, params)
bitmap = M.mtmd_helper_bitmap_init_from_file(ctx, image.encode(), False)
prompt = M.mtmd_default_marker()
text_in = M.mtmd_input_text()
text_in.text, text_in.text_len, text_in.add_special, text_in.parse_special = prompt, len(prompt), False, True
chunks = M.mtmd_input_chunks_init()
assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(text_in), (M.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
found = []
for i in range(M.mtmd_input_chunks_size(chunks)):
    chunk = M.mtmd_input_chunks_get(chunks, i)
    if M.mtmd_input_chunk_get_type(chunk) == 1:  # MTMD_INPUT_CHUNK_TYPE_IMAGE
        n = M.mtmd_input_chunk_get_n_tokens(chunk)
        assert M.mtmd_encode_chunk(ctx, chunk) == 0
        embd = M.mtmd_get_output_embd(ctx)
        found.append(np.ctypeslib.as_array(embd, shape=(n * llm.n_embd(),)).reshape(n, -1).copy())
assert len(found) == 1, len(found)
np.save(out, found[0].astype(np.float32))
"""
#: the image llama.cpp embeds with each mmproj (small.png: upscaled to llama.cpp's 64-token minimum, one unit)
LLAMA_IMAGE = "small.png"


def llama_embeddings(python: str, directory: Path, mmprojs: "list[str]") -> dict:
    """``llama-embeddings.safetensors``: llama.cpp's image embeddings of :data:`LLAMA_IMAGE` with the text file and
    each mmproj (llama.cpp preprocesses the file itself), keyed by the mmproj's type (``f32``, ``q8_0``...)."""
    from safetensors.numpy import save_file
    import numpy as np
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mmproj in mmprojs:
            key, npy = mmproj[len("mmproj-"):-len(".gguf")], Path(tmp) / "embd.npy"
            done = subprocess.run([python, "-c", LLAMA_EMBEDDINGS, str(directory / "text-f32.gguf"),
                                   str(directory / mmproj), str(directory / LLAMA_IMAGE), str(npy)],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"llama.cpp's mtmd failed on {mmproj}:\n{done.stderr[-2000:]}")
            out[key] = np.load(npy)
    save_file(out, str(directory / "llama-embeddings.safetensors"),
              metadata={"generator": f"tools/make_vl_gguf_fixtures.py v{GENERATOR_VERSION}", "image": LLAMA_IMAGE,
                        "llama": "llama-cpp-python 0.3.36, mtmd_encode_chunk, one thread, CPU"})
    return {"image": LLAMA_IMAGE, "tokens": int(out["f32"].shape[0]), "mmproj": sorted(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/golden", type=Path)
    parser.add_argument("--llama", default=LLAMA, type=Path, help="llama.cpp's sources (tools/setup_llama_cpp.sh)")
    default_python = ROOT / "vendor" / "venv-llama" / "bin" / "python"
    parser.add_argument("--llama-python", default=default_python if default_python.is_file() else None,
                        help="a Python with llama-cpp-python (tools/setup_llama_cpp.sh --build): checks that llama.cpp "
                             "loads each pair (default vendor/venv-llama/bin/python, if present)")
    parser.add_argument("--quantised-only", action="store_true",
                        help="only mmproj-q8_0.gguf and mmproj-q4_0.gguf, from the committed checkpoint (step 3)")
    args = parser.parse_args()
    if not (args.llama / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{args.llama}: no llama.cpp sources; run tools/setup_llama_cpp.sh first (or give --llama)")
    base.torch.set_num_threads(1)
    base.TEXT, base.IMAGES = TEXT, IMAGES  # image token: base.IMAGE_TOKEN (100)
    directory = args.out / NAME
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "checkpoint"
        if args.quantised_only:
            manifest = json.loads((directory / "manifest.json").read_text())
            converter_input(directory, work)
        else:
            images = base.make_images(Path(tmp))
            info = base.run_case(NAME, CASE, images, args.out)
            trim(directory / "reference.safetensors")
            for name, path in images.items():  # the images beside the checkpoint they were run through
                shutil.move(str(path), directory / f"{name}.png")
            converter_input(directory, work)
            convert(args.llama, work, directory / "text-f32.gguf", "f32", mmproj=False)
            for outtype in ("f32", "f16"):
                convert(args.llama, work, directory / f"mmproj-{outtype}.gguf", outtype, mmproj=True)
            manifest = {"generator": f"tools/make_vl_gguf_fixtures.py v{GENERATOR_VERSION}",
                        "transformers": base.transformers.__version__, "torch": base.torch.__version__,
                        "converter": "llama-cpp-python 0.3.36's convert_hf_to_gguf.py", **info, "images": list(IMAGES)}
        manifest["quantised"] = quantised(args.llama, directory, work)
    if args.llama_python:
        for mmproj in MMPROJS:
            done = subprocess.run([str(args.llama_python), "-c", LLAMA_LOADS, str(directory / "text-f32.gguf"),
                                   str(directory / mmproj)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"llama.cpp does not load text-f32.gguf + {mmproj}:\n{done.stderr[-2000:]}")
        print("llama.cpp loads every pair (llama-cpp-python, mtmd)")
        manifest["llama_embeddings"] = llama_embeddings(str(args.llama_python), directory, MMPROJS)
    manifest["files"] = sorted(p.name for p in directory.iterdir() if p.name != "manifest.json")
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(NAME, manifest)


if __name__ == "__main__":
    main()
