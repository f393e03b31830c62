"""Quantised mmproj files (tests/golden/vl-gguf: ``mmproj-q8_0.gguf`` from llama.cpp's converter, ``--outtype
q8_0``; ``mmproj-q4_0.gguf``, the same tensors as Q4_0 by gguf-py; tools/make_vl_gguf_fixtures.py, step 3) read
through ``mmproj=`` / ``--mmproj``: which tensors llama.cpp quantises, the weights as gguf-py dequantises them, how
far quantisation moves the image features and the logits from the F32 pair, and llama.cpp's own image embeddings
with each file (``llama-embeddings.safetensors``, step 4). Run with ``-s`` for the numbers."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import lfm2np
from lfm2np.cli import main
from lfm2np.io.mmproj import mmproj_tensors
from lfm2np.oracle.tolerance import rel_error
from lfm2np.vision_schema import PROJECTOR, TOWER

from test_vl_gguf import CASE, MMPROJ, TEXT, batch, checkpoint, reference

gguf = pytest.importorskip("gguf")

QUANTISED = {"Q8_0": CASE / "mmproj-q8_0.gguf", "Q4_0": CASE / "mmproj-q4_0.gguf"}
#: max|quantised pair - F32 pair| / max|F32 pair| of the tower's output, the image features and the logits.
#: Measured: Q8_0 7.5e-3, 8.8e-3, 2.4e-2; Q4_0 1.9e-1, 1.5e-1, 4.9e-1. The weights move by up to half a
#: quantisation step, 1/254 (Q8_0) and 1/16 (Q4_0) of their block's largest value; the tower's three layers and
#: the projector's two products each add about that much, and this random tiny model's logits amplify it ~3x.
#: The bounds: the measurement with a margin of a third; Q8_0's are an order of magnitude under Q4_0's
#: measurement (Q4_0 weights read where Q8_0 was meant would fail them).
BOUNDS = {"Q8_0": {TOWER + "post_layernorm": 1e-2, PROJECTOR + "linear_2": 1.2e-2, "logits": 3.2e-2},
          "Q4_0": {TOWER + "post_layernorm": 2.5e-1, PROJECTOR + "linear_2": 2e-1, "logits": 6.5e-1}}


@functools.lru_cache(maxsize=None)
def pair(path: Path) -> lfm2np.Model:
    return lfm2np.load(TEXT, mmproj=path)


def stages(m: lfm2np.Model) -> dict[str, np.ndarray]:
    r, seen = reference(), {}
    seen["logits"] = m.forward(r["ids"], images=batch(), record=lambda n, v: seen.__setitem__(n, np.array(v)))
    return seen


@pytest.mark.parametrize("qtype", sorted(QUANTISED))
def test_llama_cpps_rules_and_gguf_pys_dequantisation(qtype):
    """llama.cpp quantises the 2-D weights whose rows are whole 32-value blocks; the patch embedding and position
    embeddings, the norms and every bias stay F32, the other weights fall back to F16. Each weight lfm2np reads is
    gguf-py's dequantisation of the stored blocks (F16: the checkpoint rounded to float16; F32: the checkpoint), bit
    for bit, and the pair's logits are those of the checkpoint's model with those weights."""
    path, c = QUANTISED[qtype], checkpoint()
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, t in stored.items():
        ne = [int(n) for n in t.shape]
        embedding = name.startswith(("v.patch_embd.", "v.position_embd."))
        want = qtype if len(ne) == 2 and not embedding and ne[0] % 32 == 0 else \
            "F16" if len(ne) == 2 and not embedding else "F32"
        assert t.tensor_type.name == want, name
    assert sum(t.tensor_type.name == qtype for t in stored.values()) == 16
    m = pair(path)
    params = {t.name: np.array(c.params[t.name]) for t in c.params.layout}
    for name, (gname, _) in mmproj_tensors(c.config.vision, c.config.hidden_size).items():
        t = stored[gname]
        if t.tensor_type.name == qtype:
            params[name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(params[name].shape)
            assert not np.array_equal(params[name], c.params[name])
        elif t.tensor_type.name == "F16":
            params[name] = params[name].astype(np.float16).astype(np.float32)
        assert m.params.stored_type(name) == t.tensor_type.name
        assert np.array_equal(m.params[name], params[name]), name
    r = reference()
    expected = lfm2np.Model(c.config, params).forward(r["ids"], images=batch())
    assert np.array_equal(m.forward(r["ids"], images=batch()), expected)


@pytest.mark.parametrize("qtype", sorted(QUANTISED))
def test_quantisation_moves_features_and_logits_by_the_measured_amount(qtype):
    base, ours = stages(pair(MMPROJ)), stages(pair(QUANTISED[qtype]))
    assert np.array_equal(ours[TOWER + "embeddings"], base[TOWER + "embeddings"])  # patch + positions: F32
    for name, bound in BOUNDS[qtype].items():
        error = rel_error(ours[name], base[name])
        print(f"{qtype} {name}: {error:.1e} from the F32 pair")
        assert 0 < error <= bound, (name, error)


def test_memory_counts_the_quantised_mmproj_as_stored(capsys):
    import json
    sizes = {}
    for qtype, path in QUANTISED.items():
        assert main(["memory", str(TEXT), "--mmproj", str(path), "--json"]) == 0
        sizes[qtype] = json.loads(capsys.readouterr().out)["mmproj_weights_bytes"]
        assert sizes[qtype] == sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
    assert sizes["Q4_0"] < sizes["Q8_0"]


#: max|lfm2np - llama.cpp| / max|llama.cpp| of the image features of small.png. Measured: 5.6e-4 (F32), 6.5e-4 (F16),
#: 1.03e-2 (Q8_0), 1.05e-2 (Q4_0); between llama.cpp's own Q4_0 and F32 files 2.8e-1. F32: llama.cpp resizes the
#: image its own way and its projector's GELU is the tanh form (5.0e-4 with lfm2np's switched to it). Q8_0, Q4_0:
#: llama.cpp also quantises the activations to Q8_0 before each product with such a weight (ggml's CPU dot
#: products), half a step of 1/127 of each 32-value block, over five products in a row.
LLAMA_BOUNDS = {"f32": 1e-3, "f16": 1e-3, "q8_0": 1.5e-2, "q4_0": 1.5e-2}


def test_the_image_features_are_llama_cpps_with_the_same_file():
    """lfm2np reads each mmproj's weights as llama.cpp does: its image features of small.png (processed with
    llama.cpp's settings, as the pair does) are llama.cpp's within the activation quantisation llama.cpp adds; a
    Q4_0 file's are 28% away from the F32 file's in both, 1% from each other."""
    theirs = load_file(str(CASE / "llama-embeddings.safetensors"))
    assert sorted(theirs) == sorted(LLAMA_BOUNDS)
    px = pair(MMPROJ).image_processor([str(CASE / "small.png")])  # llama.cpp's settings (the same in every file)
    assert sum(px.tokens_per_image) == 70  # a 22 x 30 image upscaled to llama.cpp's minimum of 64 tokens
    ours = {}
    for key in theirs:
        m = pair(CASE / f"mmproj-{key}.gguf")
        assert len(theirs[key]) == 70
        seen: dict[str, np.ndarray] = {}
        m.forward(np.array([1, *[100] * len(theirs[key])]), images=px,
                  record=lambda n, v: seen.__setitem__(n, np.array(v)) if n == PROJECTOR + "linear_2" else None)
        ours[key] = seen[PROJECTOR + "linear_2"]
        error = rel_error(ours[key], theirs[key])
        print(f"{key}: {error:.1e} from llama.cpp's embeddings with the same file")
        assert error <= LLAMA_BOUNDS[key], key
    assert rel_error(theirs["q4_0"], theirs["f32"]) > 0.2 and rel_error(ours["q4_0"], ours["f32"]) > 0.2
