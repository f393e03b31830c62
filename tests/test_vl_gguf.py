"""LFM2-VL from llama.cpp's pair (text GGUF + mmproj GGUF) against the checkpoint it was converted from and
transformers 5.25's run of it.

Fixture: tests/golden/vl-gguf (tools/make_vl_gguf_fixtures.py: a tiny random LFM2-VL checkpoint, its reference run
on two images, and llama.cpp's converter's text-f32.gguf, mmproj-f32.gguf and mmproj-f16.gguf of it).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file

import lfm2np
from lfm2np.cli import main
from lfm2np.io.gguf_file import GgufFile
from lfm2np.io.mmproj import LLAMA_CPP_PROCESSOR
from lfm2np.oracle.tolerance import FP32, rel_error
from lfm2np.vision_schema import PROJECTOR, TOWER

from conftest import GOLDEN, rewrite_gguf

gguf = pytest.importorskip("gguf")

CASE = GOLDEN / "vl-gguf"
TEXT, MMPROJ, MMPROJ16 = CASE / "text-f32.gguf", CASE / "mmproj-f32.gguf", CASE / "mmproj-f16.gguf"


@functools.lru_cache(maxsize=None)
def reference() -> dict[str, np.ndarray]:
    return load_file(str(CASE / "reference.safetensors"))


def batch() -> SimpleNamespace:
    r = reference()
    return SimpleNamespace(pixel_values=r["pixel_values"], pixel_attention_mask=r["pixel_attention_mask"] > 0,
                           spatial_shapes=r["spatial_shapes"])


@functools.lru_cache(maxsize=None)
def pair(mmproj: Path = MMPROJ) -> lfm2np.Model:
    return lfm2np.load(TEXT, mmproj=mmproj)


@functools.lru_cache(maxsize=None)
def checkpoint() -> lfm2np.Model:
    return lfm2np.load(CASE)


def vision_names(m: lfm2np.Model) -> list[str]:
    return [t.name for t in m.params.layout if t.part in ("vision_tower", "projector")]


# ------------------------------------------------------------------------------------------ the pair
def test_the_pair_is_the_checkpoint_and_within_the_fp32_tier_of_transformers():
    r, m = reference(), pair()
    assert m.config == checkpoint().config and m.config.vision.image_token_id == 100  # the text file's <image>
    logits = m.forward(r["ids"], images=batch())
    assert np.array_equal(logits, checkpoint().forward(r["ids"], images=batch()))  # F32 files: the same values
    assert rel_error(logits, r["logits"]) < FP32.logits_rel
    assert rel_error(m.forward(r["text_ids"]), r["text_logits"]) < FP32.logits_rel


def test_every_vision_tensor_is_read_back_exactly():
    """The patch embedding comes back from the converter's (Dv, C, p, p) kernel as transformers' (Dv, p*p*C)
    Linear weight, bit for bit; every other vision tensor too."""
    m, c = pair(), checkpoint()
    names = vision_names(m)
    with GgufFile(MMPROJ) as f:  # the file holds the kernel, which is not the Linear weight's layout
        kernel, count = f.dequantize("v.patch_embd.weight"), len(f.tensors)
    assert TOWER + "embeddings.patch_embedding.weight" in names and len(names) == count == 3 * 16 + 5 + 6
    for name in names:
        assert np.array_equal(m.params[name], c.params[name]), name
    assert kernel.shape == (32, 3, 16, 16)
    assert not np.array_equal(kernel.reshape(32, -1), c.params[TOWER + "embeddings.patch_embedding.weight"])


def test_an_f16_mmproj_is_the_checkpoint_rounded_where_the_file_is_f16():
    m16, c = pair(MMPROJ16), checkpoint()
    params = {t.name: np.array(c.params[t.name]) for t in c.params.layout}
    with GgufFile(MMPROJ16) as f:
        types = {name: t.ggml_type for name, t in f.tensors.items()}
    assert sorted(set(types.values())) == ["F16", "F32"]
    rounded = 0
    for name in vision_names(m16):
        if m16.params.stored_type(name) == "F16":
            params[name] = params[name].astype(np.float16).astype(np.float32)
            rounded += 1
        assert np.array_equal(m16.params[name], params[name]), name
    assert rounded == sum(t == "F16" for t in types.values()) > 0
    r = reference()
    expected = lfm2np.Model(c.config, params).forward(r["ids"], images=batch())
    assert np.array_equal(m16.forward(r["ids"], images=batch()), expected)


def test_the_pairs_trace_records_the_vision_values():
    """The pair's forward names exactly the schema's values, and the vision ones are transformers' within the
    operator tier."""
    r, m = reference(), pair()
    seen: dict[str, np.ndarray] = {}
    m.forward(r["ids"], images=batch(), record=lambda n, v: seen.__setitem__(n, v.copy()))
    assert list(seen) == [t.name for t in lfm2np.trace_names(m.config)]
    compared = [k for k in r if k in seen and k.startswith((TOWER, PROJECTOR, "model.inputs_embeds"))]
    assert {TOWER + "embeddings", TOWER + "encoder.layers.2", TOWER + "post_layernorm", PROJECTOR + "linear_2",
            "model.inputs_embeds"} <= set(compared)
    for name in compared:
        assert rel_error(seen[name], r[name]) < FP32.op_rel, name


def test_trace_command_on_the_pair(tmp_path):
    out, theirs = tmp_path / "pair.safetensors", tmp_path / "checkpoint.safetensors"
    assert main(["trace", str(TEXT), "--mmproj", str(MMPROJ), "--ids", "1", "5", "6", "--out", str(out)]) == 0
    assert main(["trace", str(CASE), "--ids", "1", "5", "6", "--out", str(theirs)]) == 0
    a, b = load_file(str(out)), load_file(str(theirs))
    assert sorted(a) == sorted(b) and len(a) > 20 and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_pair_gets_llama_cpps_processor_settings():
    m = pair()
    px = m.image_processor([str(CASE / "small.png")])
    # llama.cpp: at least 64 image tokens (a 22 x 30 image is upscaled), 16-pixel patches, its half-away rounding
    h, w = px.spatial_shapes[0]
    assert px.pixel_values.shape[-1] == 3 * 16 * 16 and (h // 2) * (w // 2) >= LLAMA_CPP_PROCESSOR["min_image_tokens"]
    ids = np.array([1, *[100] * int((h // 2) * (w // 2)), 2])
    assert np.isfinite(m.forward(ids, images=[str(CASE / "small.png")])).all()


# ---------------------------------------------------------------------------------------- hostile input
BAD_MMPROJ = {
    "projector type": (dict(meta={"clip.projector_type": "gemma3"}), "clip.projector_type is 'gemma3'"),
    "no vision encoder": (dict(meta={"clip.has_vision_encoder": False}), "clip.has_vision_encoder is not true"),
    "no gelu": (dict(meta={"clip.use_gelu": None}), "clip.use_gelu is not true"),
    "width of another model": (dict(meta={"clip.vision.projection_dim": 48}),
                               "clip.vision.projection_dim is 48, but the text model"),
    "eps missing": (dict(meta={"clip.vision.attention.layer_norm_epsilon": None}),
                    "clip.vision.attention.layer_norm_epsilon is missing"),
    "mean of two": (dict(meta={"clip.vision.image_mean": [0.5, 0.5]}), "clip.vision.image_mean is [0.5, 0.5]"),
    "missing layer tensor": (dict(drop=("v.blk.1.attn_q.weight",)), "missing tensor v.blk.1.attn_q.weight"),
    "missing projector bias": (dict(drop=("mm.1.bias",)), "missing tensor 'mm.1.bias'"),
    "layer norm weight only": (dict(drop=("mm.input_norm.bias",)), "mm.input_norm has its weight only"),
    "one block less": (dict(meta={"clip.vision.block_count": 2}), "v.blk.2."),
    "heads": (dict(meta={"clip.vision.attention.head_count": 5}), "clip.vision.attention.head_count is 5"),
    "patch size": (dict(meta={"clip.vision.patch_size": 8}), "v.patch_embd.weight"),
    "projector output": (dict(tensors={"mm.2.weight": np.zeros((40, 48), np.float32),
                                       "mm.2.bias": np.zeros(40, np.float32)}), "mm.2.weight"),
    "extra tensor": (dict(tensors={"v.extra.weight": np.zeros(4, np.float32)}), "v.extra.weight is not used"),
}


@pytest.mark.parametrize("case", sorted(BAD_MMPROJ))
def test_a_bad_mmproj_is_one_error_naming_it(case, tmp_path):
    edits, message = BAD_MMPROJ[case]
    bad = rewrite_gguf(MMPROJ, tmp_path / "bad.gguf", **edits)
    with pytest.raises(lfm2np.Lfm2npError) as e:
        lfm2np.load(TEXT, mmproj=bad)
    assert str(bad) in str(e.value) and message in str(e.value), str(e.value)
    assert main(["forward", str(TEXT), "--mmproj", str(bad), "--ids", "1"]) == 2


def test_an_unused_mmproj_tensor_warns_when_not_strict(tmp_path):
    bad = rewrite_gguf(MMPROJ, tmp_path / "bad.gguf", tensors={"v.extra.weight": np.zeros(4, np.float32)})
    with pytest.warns(UserWarning, match="v.extra.weight"):
        m = lfm2np.load(TEXT, mmproj=bad, strict=False)
    assert np.array_equal(m.forward([1, 5]), pair().forward([1, 5]))


def test_files_in_the_wrong_places(tmp_path):
    cases = [
        (lambda: lfm2np.load(TEXT, mmproj=TEXT), "an mmproj file is 'clip'"),  # the text file as the mmproj
        (lambda: lfm2np.load(MMPROJ), "an mmproj file (a vision tower)"),  # the mmproj as the model
        (lambda: lfm2np.load(MMPROJ, mmproj=TEXT), "an mmproj file is 'clip'"),  # swapped
        (lambda: lfm2np.load(CASE, mmproj=MMPROJ), "is not a .gguf file"),  # with a checkpoint directory
        (lambda: lfm2np.load(TEXT, mmproj=3), "mmproj must be the path"),
        (lambda: lfm2np.load(TEXT, mmproj=tmp_path / "none.gguf"), "no such GGUF file"),
        (lambda: lfm2np.load(TEXT).forward([1, 100], images=batch()), "llama.cpp's text GGUF with its mmproj"),
    ]
    for call, message in cases:
        with pytest.raises(lfm2np.Lfm2npError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_a_text_model_without_an_image_token(tmp_path):
    with GgufFile(TEXT) as f:
        tokens = ["<imagx>" if t == "<image>" else t for t in f.metadata["tokenizer.ggml.tokens"]]
    text = rewrite_gguf(TEXT, tmp_path / "text.gguf", meta={"tokenizer.ggml.tokens": tokens})
    with pytest.raises(lfm2np.Lfm2npError, match="holds '<image>' 0 times"):
        lfm2np.load(text, mmproj=MMPROJ)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lfm2np.load(text).config.vision is None  # alone it is a text model


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["trace", str(MMPROJ), "--ids", "1", "--out", str(tmp_path / "t.safetensors")]) == 2
    assert main(["generate", str(TEXT), "--mmproj", str(TEXT), "--text", "hi", "-n", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.startswith("lfm2np: error:") for line in err] == [True, True] and "Traceback" not in str(err)


def test_params_of_the_pair_count_the_checkpoints_tensors(capsys):
    import json

    assert main(["params", str(TEXT), "--mmproj", str(MMPROJ), "--json"]) == 0
    pair_counts = json.loads(capsys.readouterr().out)
    assert main(["params", str(CASE), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert pair_counts.pop("model") == f"{TEXT} + {MMPROJ}" and counts.pop("model") == str(CASE / "config.json")
    assert pair_counts == counts
    assert pair_counts["total"] == sum(t.size for t in checkpoint().params.layout)
    assert lfm2np.load_config(TEXT, mmproj=MMPROJ) == checkpoint().config
