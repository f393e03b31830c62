"""GGUF files: tiny GGUF files written with gguf's GGUFWriter (through lfm2np.io.gguf_write.write_gguf), read back
with lfm2np.load, for every tensor type llama.cpp's LFM2 files use; a GGUF alone in an empty folder chatted with,
traced and sized; llama.cpp's variants (fused q/k/v, sliding window, bidirectional); metadata checked for type
and against the tensors; what a decode step reads.

Two claims per type: (1) the model loaded from GGUF holds exactly the values gguf-py's dequantisation gives
for the stored bytes, so its logits equal those of a model built in memory from those values, bit for bit;
(2) float types reproduce the original model (exactly for F32, to a bound for F16/BF16), and quantised
types stay within a measured error of it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import lfm2np
from lfm2np.io.gguf_names import gguf_name
from lfm2np.schema import layout
from lfm2np.oracle.tolerance import FP32, rel_error
from lfm2np import calc
from lfm2np.calc import quant
from lfm2np.io import gguf as G
from lfm2np.io import gguf_write as W
from lfm2np.synthetic import random_params
from lfm2np.cli import main
from lfm2np.generate import Generation, Sampling, generate
from lfm2np.io.tokenizer import Tokenizer

from conftest import rewrite_gguf
from tokenizer_fixture import MODEL_VOCAB, TEXTS, tiny_checkpoint, tiny_config, tiny_params

pytest.importorskip("gguf")  # optional dependency; it is in the dev extra, so CI has it
import gguf  # noqa: E402

IDS = np.array([1, 5, 17, 42, 3, 96, 0, 64, 7, 11, 2, 30])
FLOAT_TYPES = ["F32", "F16", "BF16"]
BLOCK32_TYPES = ["Q8_0", "Q4_0"]
K_TYPES = ["Q4_K", "Q5_K", "Q6_K"]


def dense_config(tie: bool = True, width: int = 48) -> lfm2np.Config:
    c = lfm2np.load_config("tiny-dense")
    if width != 48:
        c = c.replace(hidden_size=width, num_attention_heads=4, num_key_value_heads=2, intermediate_size=width)
    return c.replace(tie_word_embeddings=tie)


def moe_config(tie: bool = True, width: int = 48) -> lfm2np.Config:
    c = lfm2np.load_config("tiny-moe")
    if width != 48:
        c = c.replace(hidden_size=width, num_attention_heads=4, num_key_value_heads=2, intermediate_size=width,
                      moe_intermediate_size=width, num_experts=4)
    return c.replace(tie_word_embeddings=tie)


CONFIGS = {
    "dense-tied": lambda w=48: dense_config(True, w),
    "dense-untied": lambda w=48: dense_config(False, w),
    "moe-tied": lambda w=48: moe_config(True, w),
    "moe-untied": lambda w=48: moe_config(False, w),
}


@functools.lru_cache(maxsize=None)
def params_for(kind: str, width: int) -> tuple[lfm2np.Config, dict]:
    config = CONFIGS[kind](width)
    params = random_params(config, seed=7)
    for name in params:  # spread router logits: no near-ties for a 16-bit rounding to flip
        if name.endswith("feed_forward.gate.weight"):
            params[name] = params[name] * 8
    return config, params


def dequantised_reference(config, path) -> dict[str, np.ndarray]:
    """The HF tensors as gguf-py's own dequantisation returns them for the bytes stored in the file."""
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    back = {}
    for t in layout(config):
        hf, shape, name, expert = t.name, t.shape, gguf_name(t), t.expert
        t = stored[name]
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        if expert is not None:
            values = values[expert]
        back[hf] = np.asarray(values, np.float32).reshape(shape)
    return back


def write(tmp_path, kind: str, width: int, tensor_type: str):
    config, params = params_for(kind, width)
    path = tmp_path / f"{kind}-{tensor_type}.gguf"
    written = W.write_gguf(path, config, params, tensor_type)
    return config, params, path, written


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("tensor_type", FLOAT_TYPES)
def test_round_trip_float(tmp_path, kind, tensor_type):
    """D=48 (the odd tiny presets): float types, dense and MoE, tied and untied heads."""
    _check_round_trip(tmp_path, kind, 48, tensor_type)


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("tensor_type", BLOCK32_TYPES)
def test_round_trip_block32(tmp_path, kind, tensor_type):
    """D=64 and every FFN width 64, so 32-element blocks fit every matrix row."""
    _check_round_trip(tmp_path, kind, 64, tensor_type)


@pytest.mark.parametrize("kind", ["dense-untied", "moe-tied"])
@pytest.mark.parametrize("tensor_type", K_TYPES)
def test_round_trip_k_quants(tmp_path, kind, tensor_type):
    """D=256 and every FFN width 256, so K-quant blocks of 256 fit every matrix row."""
    _check_round_trip(tmp_path, kind, 256, tensor_type)


#: max |logits - original| / max |original logits| allowed per type: about twice the largest value measured
#: on these random models (docs/gguf.md lists the measurements).
LOGIT_BOUND = {"F32": 0.0, "F16": 3e-3, "BF16": 2.5e-2, "Q8_0": 6e-2, "Q6_K": 0.15, "Q5_K": 0.3, "Q4_K": 0.65,
               "Q4_0": 1.1}


def _check_round_trip(tmp_path, kind, width, tensor_type):
    config, params, path, written = write(tmp_path, kind, width, tensor_type)
    model = lfm2np.load(path)
    assert isinstance(model, lfm2np.Model)
    assert model.config == config  # every field, from the GGUF metadata and tensor list alone
    assert model.params.keys() == lfm2np.expected_tensors(config).keys()
    # every matrix really is stored in the requested type; norms, router, conv kernel, expert bias stay F32
    types = G.gguf_tensor_types(path)
    assert types == written
    matrices = {n for n, t in types.items() if t != "F32"}
    assert {t for n, t in types.items() if n in matrices} <= {tensor_type}
    assert "token_embd.weight" in matrices or tensor_type == "F32"
    if tensor_type != "F32":
        assert all(n.endswith(("norm.weight", "shortconv.conv.weight", "ffn_gate_inp.weight", "exp_probs_b.bias"))
                   for n in types if n not in matrices)

    # (1) exactly the dequantised values, hence exactly the same logits
    reference = dequantised_reference(config, path)
    for name, values in reference.items():
        assert np.array_equal(model.params[name], values), name
    logits = model.forward(IDS)
    assert np.array_equal(logits, lfm2np.Model(config, reference).forward(IDS))

    # (2) against the original float32 model. Quantised MoE models are left out: the quantisation error
    # flips some top-k expert choices (a discrete change, reported in docs/gguf.md), so no tolerance fits.
    original = lfm2np.Model(config, params).forward(IDS)
    err = np.abs(logits - original).max() / np.abs(original).max()
    if tensor_type == "F32":
        assert np.array_equal(logits, original)
    elif tensor_type in FLOAT_TYPES or not config.is_moe:
        assert 0 < err <= LOGIT_BOUND[tensor_type], err


def test_load_dispatch_on_suffix(tmp_path):
    """lfm2np.load("x.gguf") reads a GGUF file (loading dispatches on the suffix), in float64 too."""
    config, params, path, _ = write(tmp_path, "moe-untied", 48, "F32")
    model = lfm2np.load(str(path), dtype="float64")
    assert isinstance(model, lfm2np.Model) and model.config == config
    assert model.dtype == np.float64 and model.params["model.embed_tokens.weight"].dtype == np.float64
    expected = lfm2np.Model(config, {k: v.astype(np.float64) for k, v in params.items()}, "float64").forward(IDS)
    np.testing.assert_allclose(model.forward(IDS), expected, rtol=0, atol=0)


def test_float64_mode_and_kept_weights(tmp_path):
    config, params, path, _ = write(tmp_path, "dense-tied", 64, "Q8_0")
    m32 = lfm2np.load(path, memory_budget=0)
    m64 = lfm2np.load(path, dtype="float64", memory_budget="all")
    a = m32.forward(IDS)
    b = m64.forward(IDS)
    assert b.dtype == np.float64
    assert rel_error(a, b) < FP32.op_rel
    assert m64.params["model.layers.0.conv.conv.weight"] is m64.params["model.layers.0.conv.conv.weight"]
    assert m32.params.stored_type("model.layers.0.conv.in_proj.weight") == "Q8_0"


def test_incremental_decoding_on_gguf(tmp_path):
    config, params, path, _ = write(tmp_path, "moe-tied", 64, "Q4_0")
    model = lfm2np.load(path)
    full = model.forward(IDS)
    first, state = model.step(IDS[:5])
    rest, _ = model.step(IDS[5:], state)
    assert rel_error(np.concatenate([first, rest]), full) < FP32.op_rel  # relative to the logits' scale


# ------------------------------------------------------------------------------------------ quantisers
@pytest.mark.parametrize("tensor_type,rel_rms", [("F16", 1e-3), ("BF16", 5e-3), ("Q8_0", 1e-2), ("Q6_K", 3e-2),
                                                  ("Q5_K", 6e-2), ("Q4_K", 0.12), ("Q4_0", 0.12)])
def test_quantiser_error(tensor_type, rel_rms):
    """Each encoder (gguf-py's, or lfm2np's for K-quants) decodes, with gguf-py, to values near the input;
    all-zero, all-positive and all-negative rows included."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 512)).astype(np.float32) / 16
    x[3] = 0
    x[4] = np.abs(x[4])
    x[5] = -np.abs(x[5])
    q = W.quantize(x, tensor_type)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[tensor_type]]
    if block > 1:
        assert q.dtype == np.uint8 and q.shape == (32, 512 // block * size)
    y = W.dequantize(q, tensor_type).reshape(x.shape)
    assert np.all(y[3] == 0)
    e = y - x
    assert np.sqrt((e ** 2).mean() / (x ** 2).mean()) < rel_rms
    assert np.abs(e).max() < 0.12 * np.abs(x).max()


def test_k_quant_encoders_on_a_ramp():
    """A ramp through each K-quant: decoded values rise within every sub-block (16 or 32 elements; each has
    its own scale, so the step between sub-blocks may go either way) and stay within one grid step."""
    ramp = np.linspace(-1, 1, 256, dtype=np.float32)[None, :]
    for t, levels in (("Q4_K", 16), ("Q5_K", 32), ("Q6_K", 64)):
        y = W.dequantize(W.quantize(ramp, t), t).ravel()
        assert np.all(np.diff(y.reshape(16, 16), axis=1) >= 0), t
        assert len(np.unique(y)) > levels // 2, t
        assert np.abs(y - ramp.ravel()).max() < 2 / levels, t


def test_quantise_rejects_partial_blocks():
    with pytest.raises(lfm2np.Lfm2npError, match="blocks of 256"):
        W.quantize(np.zeros((2, 48), np.float32), "Q4_K")


# ------------------------------------------------------------------------------------------ names, metadata
def test_name_mapping_agrees_with_gguf_py():
    """Our HF -> GGUF table against gguf-py's own TensorNameMap (llama.cpp's conversion tables)."""
    for kind in ("dense-untied", "moe-untied"):
        config, _ = params_for(kind, 48)
        arch = gguf.MODEL_ARCH.LFM2 if not config.is_moe else gguf.MODEL_ARCH.LFM2MOE
        tmap = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        for t in layout(config):
            hf, ours, expert = t.name, gguf_name(t), t.expert
            if expert is not None:  # the converter stacks experts first, then maps the merged name
                i = hf.split(".")[2]
                hf = f"layers.{i}.feed_forward.experts.{hf.split('.')[-2]}.weight"
            if hf.endswith("expert_bias"):  # the converter renames it before mapping
                hf += ".bias"
            theirs = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
            if hf == "lm_head.weight" and config.is_moe:
                # gguf-py's LFM2MOE tensor list has no OUTPUT (every released LFM2-MoE is tied), though
                # llama.cpp's loader takes an optional output.weight; the LFM2 table has it
                assert theirs is None
                theirs = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LFM2, 1).get_name(hf, try_suffixes=(".weight",))
            assert theirs == ours, (hf, theirs, ours)


def test_gguf_shapes_match_the_size_calculator(tmp_path):
    """The file's tensors and ggml shapes are exactly G.gguf_layout(config), and the calculator's byte
    formula applied to the file's real types gives the file's tensor bytes."""
    config, params, path, written = write(tmp_path, "moe-untied", 256, "Q4_K")
    reader = gguf.GGUFReader(path)
    assert {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors} == \
        {t.name: t.ne for t in G.gguf_layout(config)}
    types = G.gguf_tensor_types(path)
    predicted = sum(quant.tensor_bytes(types[t.name], t.ne) for t in G.gguf_layout(config))
    assert predicted == G.gguf_tensor_bytes(path)
    summary = G.gguf_type_summary(path)
    assert sum(s["bytes"] for s in summary.values()) == predicted
    assert set(summary) == {"F32", "Q4_K"}
    # all matrices Q4_K, the rest F32: the calculator's own Q4_K_M mixture differs (Q6_K head, ffn_down),
    # which is the point of reading real types
    assert calc.weight_bytes(config, "Q4_K_M") != predicted


def test_metadata_keys_written_as_convert_hf_to_gguf_does(tmp_path):
    config, params, path, _ = write(tmp_path, "moe-tied", 48, "F32")
    meta = G.read_metadata(G.open_gguf(path))
    a = "lfm2moe"
    assert meta["general.architecture"] == a
    assert meta[f"{a}.attention.head_count_kv"] == [0, 0, 2, 0]
    assert meta[f"{a}.expert_gating_func"] == 2
    assert meta[f"{a}.leading_dense_block_count"] == 1
    assert meta[f"{a}.expert_feed_forward_length"] == config.moe_intermediate_size
    assert meta[f"{a}.shortconv.l_cache"] == 3
    assert f"{a}.expert_weights_norm" not in meta  # the converter writes neither; llama.cpp hard-codes both
    assert "output.weight" not in G.gguf_tensor_types(path)


def test_config_from_metadata_variants():
    ne = {"token_embd.weight": (48, 97)}
    meta = {"general.architecture": "lfm2", "lfm2.block_count": 3, "lfm2.embedding_length": 48,
            "lfm2.attention.head_count": 6, "lfm2.attention.head_count_kv": [0, 2, 0],
            "lfm2.feed_forward_length": [80, 80, 80], "lfm2.shortconv.l_cache": 3,
            "lfm2.attention.layer_norm_rms_epsilon": np.float32(1e-5), "lfm2.rope.freq_base": 1e6}
    d = G.config_dict_from_metadata(meta, ne)
    assert d["vocab_size"] == 97 and d["intermediate_size"] == 80 and d["norm_eps"] == 1e-5
    assert d["layer_types"] == ["conv", "full_attention", "conv"] and d["num_key_value_heads"] == 2
    lfm2np.Config.from_dict(d)
    with pytest.raises(lfm2np.Lfm2npError, match="differs between dense layers"):
        G.config_dict_from_metadata({**meta, "lfm2.feed_forward_length": [80, 96, 80]}, ne)
    with pytest.raises(lfm2np.Lfm2npError, match="'llama'"):
        G.config_dict_from_metadata({**meta, "general.architecture": "llama"}, ne)
    with pytest.raises(lfm2np.Lfm2npError, match="lfm2.shortconv.l_cache"):
        G.config_dict_from_metadata({k: v for k, v in meta.items() if "l_cache" not in k}, ne)
    moe = {k.replace("lfm2.", "lfm2moe."): v for k, v in meta.items()}
    moe.update({"general.architecture": "lfm2moe", "lfm2moe.expert_count": 4, "lfm2moe.expert_used_count": 2,
                "lfm2moe.expert_feed_forward_length": 24, "lfm2moe.leading_dense_block_count": 1,
                "lfm2moe.expert_gating_func": 1})
    with pytest.raises(lfm2np.Lfm2npError, match="sigmoid"):
        G.config_dict_from_metadata(moe, ne)


# ------------------------------------------------------------------------------------------ errors
def test_missing_tensor_is_named(tmp_path):
    config, params = params_for("dense-untied", 48)
    path = tmp_path / "full.gguf"
    W.write_gguf(path, config, params, "F32")
    short = rewrite_gguf(path, tmp_path / "short.gguf", drop={"blk.1.attn_k.weight"})
    with pytest.raises(lfm2np.Lfm2npError, match=r"short\.gguf: missing tensor blk\.1\.attn_k\.weight"):
        lfm2np.load(short)


def test_shape_mismatch_is_named(tmp_path):
    config, params = params_for("dense-tied", 48)
    path = tmp_path / "ok.gguf"
    W.write_gguf(path, config, params, "F32")
    bad = rewrite_gguf(path, tmp_path / "norm.gguf", tensors={"blk.0.ffn_norm.weight": np.ones(40, np.float32)})
    with pytest.raises(lfm2np.Lfm2npError, match=r"norm\.gguf: tensor 'blk\.0\.ffn_norm\.weight' has ggml shape \[40\]; "
                                                 r"the config expects \[48\]"):
        lfm2np.load(bad)


@pytest.mark.parametrize("name, values", [
    ("blk.0.ffn_norm.weight", np.ones(48, np.int32)), ("blk.2.ffn_norm.weight", np.ones(48, np.int8)),
    ("token_embd_norm.weight", np.ones(48, np.int16)), ("blk.1.ffn_up.weight", np.ones((80, 48), np.int64)),
])
def test_a_weight_stored_with_an_integer_type_is_refused(tmp_path, name, values):
    """An integer ggml type (I8 .. I64) where a float weight belongs: named with its type, never used as numbers."""
    config, params = params_for("dense-tied", 48)
    path = tmp_path / "ok.gguf"
    W.write_gguf(path, config, params, "F32")
    bad = rewrite_gguf(path, tmp_path / "ints.gguf", tensors={name: values})
    kind = {np.int8: "I8", np.int16: "I16", np.int32: "I32", np.int64: "I64"}[values.dtype.type]
    assert G.gguf_tensor_types(bad)[name] == kind
    with pytest.raises(lfm2np.Lfm2npError, match=rf"ints\.gguf: tensor '{re.escape(name)}' is stored as {kind}, an "
                                                 r"integer type"):
        lfm2np.load(bad)


def test_rope_reading_is_checked_for_a_gguf_as_for_a_checkpoint_before_the_file_is_read(tmp_path, monkeypatch):
    import lfm2np.loading as loading

    config, params = params_for("dense-tied", 48)
    path = tmp_path / "ok.gguf"
    W.write_gguf(path, config, params, "F32")
    checkpoint = tiny_checkpoint(tmp_path / "ck")
    for bad in ("guess", None, ["trained"]):
        with pytest.raises(lfm2np.Lfm2npError) as ck:
            lfm2np.load(checkpoint, rope_reading=bad)
        assert str(ck.value) == f"rope_reading is {bad!r}; expected one of trained, transformers"
        with monkeypatch.context() as m:
            m.setattr(loading, "read_gguf_source", lambda *a: pytest.fail("the file was read"))
            m.setattr(loading, "read_gguf_config", lambda *a: pytest.fail("the file was read"))
            for load in (lfm2np.load, lfm2np.load_config):
                with pytest.raises(lfm2np.Lfm2npError) as e:
                    load(path, rope_reading=bad)
                assert str(e.value) == str(ck.value)
    assert lfm2np.load(path, rope_reading="transformers").config.rope_reading == "transformers"
    assert lfm2np.load_config(path, rope_reading="transformers").rope_reading == "transformers"


def test_a_conv_layer_marked_attention_is_named(tmp_path):
    """head_count_kv[0] = 2 on a conv layer: the key and the layer are named (not a list of missing tensors)."""
    config, params = params_for("dense-untied", 48)
    path = tmp_path / "kinds.gguf"
    W.write_gguf(path, config, params, "F32", metadata={"lfm2.attention.head_count_kv": [2, 2, 0, 2]})
    with pytest.raises(lfm2np.Lfm2npError, match=r"kinds\.gguf: lfm2\.attention\.head_count_kv\[0\] is 2 \(an "
                                                 r"attention layer\) but blk\.0\.shortconv"):
        lfm2np.load(path)


def test_unexpected_tensor_strict_and_lenient(tmp_path):
    config, params = params_for("dense-tied", 48)
    path = tmp_path / "extra.gguf"
    written = W.write_gguf(path, config, params, "F32")
    # a file with an extra tensor: write a second one by hand with gguf's writer
    path2 = tmp_path / "extra2.gguf"
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(path2), "lfm2")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.add_tensor("rope_freqs.weight", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(lfm2np.Lfm2npError, match="rope_freqs.weight is not used"):
        lfm2np.load(path2)
    with pytest.warns(UserWarning, match="rope_freqs.weight"):
        model = lfm2np.load(path2, strict=False)
    assert np.array_equal(model.forward(IDS[:4]), lfm2np.Model(config, params).forward(IDS[:4]))
    assert written["token_embd.weight"] == "F32"


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(lfm2np.Lfm2npError, match="junk.gguf: not a GGUF file"):
        lfm2np.load(path)
    with pytest.raises(lfm2np.Lfm2npError, match="no such GGUF file"):
        lfm2np.load(tmp_path / "absent.gguf")


def test_missing_gguf_package_message(monkeypatch, tmp_path):
    import builtins

    config, params, path, _ = write(tmp_path, "dense-tied", 48, "F32")

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gguf" or name.startswith("gguf."):
            raise ImportError("no gguf")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(lfm2np.Lfm2npError, match=r"pip install 'lfm2np\[gguf\]'"):
        G.read_gguf_source(path)
    assert importlib.util.find_spec("gguf") is not None


def test_memory_command_reads_a_gguf_file(tmp_path, capsys):
    """`lfm2np memory x.gguf` takes the config and the real tensor types from the file."""
    import json

    from lfm2np.cli import main

    config, params, path, _ = write(tmp_path, "moe-untied", 48, "F16")
    assert main(["memory", str(path), "--json", "--context", "64"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["weights_bytes"] == G.gguf_tensor_bytes(path)
    assert m["quant"] == str(path)
    assert m["kv_bytes_per_token"] == 2 * 2 * len(config.attention_layers) * config.num_key_value_heads * config.head_dim


# ================================================================ a GGUF file on its own: chat, trace, size
# A tiny random checkpoint carrying the 32k-token LFM2-layout tokenizer (tests/tokenizer_fixture.py) is written
# as an F32 GGUF file with the tokenizer metadata llama.cpp's converter writes, alone in an empty folder.


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-alone")
    checkpoint = tiny_checkpoint(root / "checkpoint")
    alone = root / "alone"
    alone.mkdir()
    path = alone / "tiny-F32.gguf"
    W.write_gguf(path, tiny_config(), tiny_params(), "F32", tokenizer=checkpoint)
    assert [p.name for p in alone.iterdir()] == [path.name]  # nothing else beside it
    return checkpoint, path


def test_gguf_tokenizer_encodes_like_its_tokenizer_json(converted):
    checkpoint, path = converted
    ours, ref = Tokenizer.from_gguf(path), Tokenizer.from_dir(checkpoint)
    assert ours.vocab_size == ref.vocab_size <= MODEL_VOCAB
    for text in TEXTS:
        for bos in (False, True):
            ids = ref.encode(text, add_bos=bos)
            assert ours.encode(text, add_bos=bos) == ids, text
        assert ours.decode(ids) == ref.decode(ids) and ours.decode(ids, True) == ref.decode(ids, True)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, what's 2+2?"}]
    assert ours.chat_template == ref.chat_template is not None
    assert ours.encode_chat(conversation) == ref.encode_chat(conversation)
    assert ours.special == ref.special and ours.stop_ids([7]) == ref.stop_ids([7]) == {2, 7}
    assert Tokenizer.load(path).encode("hello") == Tokenizer.load(checkpoint).encode("hello")


def test_greedy_generation_from_an_f32_gguf_equals_its_checkpoint(converted, capsys):
    checkpoint, path = converted
    a, b = lfm2np.load(path), lfm2np.load(checkpoint)
    assert a.config == b.config
    prompt = Tokenizer.from_gguf(path).encode_chat([{"role": "user", "content": "Tell me a story."}])
    assert generate(a, prompt, 12, stop_ids=[]) == generate(b, prompt, 12, stop_ids=[])
    assert Generation(a, prompt, 12, Sampling(), {7}).tokens == Generation(b, prompt, 12, Sampling(), {7}).tokens
    texts = {}
    for what in ("--chat", "--prompt"):
        for model in (path, checkpoint):
            assert main(["generate", str(model), what, "Once upon a time", "--max-new-tokens", "10",
                         "--temperature", "0"]) == 0
            texts[what, model == path] = capsys.readouterr().out
        assert texts[what, True] == texts[what, False] and texts[what, True].strip()


def test_every_command_takes_the_gguf_alone(converted, tmp_path, capsys):
    checkpoint, path = converted
    # trace from text: the GGUF's tokenizer and weights; compare with the checkpoint's trace
    for name, model in (("gguf", path), ("ckpt", checkpoint)):
        assert main(["trace", str(model), "--text", "Hello, world! 123", "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "gguf.safetensors"), str(tmp_path / "ckpt.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["first_divergence"] is None and result["compared"] > 50
    assert all(t["max_abs"] == 0 for t in result["tensors"])  # the same float32 weights: bit for bit
    assert main(["golden", str(path), "--text", "Hi", "--layers", "1", "--out", str(tmp_path / "golden")]) == 0
    assert (tmp_path / "golden" / "manifest.json").is_file()
    assert main(["forward", str(path), "--ids", "1", "2", "3"]) == 0
    capsys.readouterr()
    # sizes: parameters from the metadata and tensor shapes, memory from the real tensor types
    counts = {}
    for model in (path, checkpoint):
        assert main(["params", str(model), "--json"]) == 0
        counts[model] = {k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "model"}
    assert counts[path] == counts[checkpoint] and counts[path]["total"] == sum(v.size for v in tiny_params().values())
    assert main(["memory", str(path), "--json", "--context", "128"]) == 0
    assert json.loads(capsys.readouterr().out)["weights_bytes"] == G.gguf_tensor_bytes(path)


def test_trace_result_names_the_first_divergence_of_a_wrong_gguf(converted, tmp_path, capsys):
    """compare really compares: a GGUF whose layer-2 FFN weights differ diverges at layer 2's FFN."""
    checkpoint, path = converted
    params = dict(tiny_params())
    params["model.layers.2.feed_forward.w3.weight"] = params["model.layers.2.feed_forward.w3.weight"] * 1.01
    wrong = tmp_path / "wrong.gguf"
    W.write_gguf(wrong, tiny_config(), params, "F32", tokenizer=checkpoint)
    for name, model in (("wrong", wrong), ("ckpt", checkpoint)):
        assert main(["trace", str(model), "--text", "Hello", "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "wrong.safetensors"), str(tmp_path / "ckpt.safetensors"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["first_divergence"]["tensor"] == "model.layers.2.feed_forward.w3"


# ================================================================ llama.cpp's variants: fused q/k/v, SWA, bidirectional
def _fuse_by_hand(src, dst, config):
    """The layout convert_hf_to_gguf.py --fuse-qkv writes (conversion/base.py: torch.cat([q, k, v], dim=0) into
    blk.N.attn_qkv.weight), made from an unfused F32 file with gguf's own reader and writer."""
    reader = gguf.GGUFReader(src)
    data = {t.name: np.array(t.data) for t in reader.tensors}
    fused = {}
    for i in config.attention_layers:
        fused[f"blk.{i}.attn_qkv.weight"] = np.concatenate([data.pop(f"blk.{i}.attn_{x}.weight") for x in "qkv"])
    split = {f"blk.{i}.attn_{x}.weight" for i in config.attention_layers for x in "qkv"}
    return rewrite_gguf(src, dst, drop=split, tensors=fused)


@pytest.mark.parametrize("kind", ["dense-untied", "moe-tied"])
def test_fused_qkv_splits_into_q_k_v(tmp_path, kind):
    config, params = params_for(kind, 48)
    plain = tmp_path / "plain.gguf"
    W.write_gguf(plain, config, params, "F32")
    by_hand = _fuse_by_hand(plain, tmp_path / "by-hand.gguf", config)
    ours = tmp_path / "ours.gguf"
    W.write_gguf(ours, config, params, "F32", fuse_qkv=True)
    for path in (by_hand, ours):
        types = G.gguf_tensor_types(path)
        assert not any(n.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight")) for n in types)
        assert {n for n in types if n.endswith("attn_qkv.weight")} == {f"blk.{i}.attn_qkv.weight"
                                                                       for i in config.attention_layers}
        model = lfm2np.load(path)
        for name in params:
            assert np.array_equal(model.params[name], params[name]), name
        assert np.array_equal(model.forward(IDS), lfm2np.Model(config, params).forward(IDS))
    i = config.attention_layers[0]
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(ours).tensors}
    assert np.array_equal(stored[f"blk.{i}.attn_qkv.weight"],
                          {t.name: np.array(t.data) for t in gguf.GGUFReader(by_hand).tensors}[f"blk.{i}.attn_qkv.weight"])


def test_fused_qkv_quantised_reads_only_its_rows(tmp_path):
    """Q8_0 fused q/k/v: each projection is exactly gguf-py's dequantisation of its rows of the fused tensor."""
    config, params = params_for("dense-tied", 64)
    path = tmp_path / "q8.gguf"
    W.write_gguf(path, config, params, "Q8_0", fuse_qkv=True)
    model = lfm2np.load(path)
    i = config.attention_layers[0]
    t = {t.name: t for t in gguf.GGUFReader(path).tensors}[f"blk.{i}.attn_qkv.weight"]
    whole = gguf.quants.dequantize(t.data, t.tensor_type)
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    p = f"model.layers.{i}.self_attn."
    assert np.array_equal(model.params[p + "q_proj.weight"], whole[:q])
    assert np.array_equal(model.params[p + "k_proj.weight"], whole[q:q + kv])
    assert np.array_equal(model.params[p + "v_proj.weight"], whole[q + kv:])
    assert model.params.stored_type(p + "k_proj.weight") == "Q8_0"


@pytest.mark.parametrize("preset", ["LFM2-1.2B", "LFM2-8B-A1B", "LFM2-2.6B"])
def test_calculator_types_fused_qkv_as_attn_v(preset):
    """llama-quant.cpp: category_is_attn_v(ATTENTION_QKV) is true and its branch comes first, so attn_qkv gets
    exactly the type attn_v of the same layer gets; every other tensor keeps its type."""
    c = lfm2np.load_config(preset)
    for ftype in quant.FILE_TYPES:
        plain, fused = quant.tensor_types(c, ftype), quant.tensor_types(c, ftype, fuse_qkv=True)
        for i in c.attention_layers:
            assert fused.pop(f"blk.{i}.attn_qkv.weight") == plain[f"blk.{i}.attn_v.weight"], (ftype, i)
        assert fused == {n: t for n, t in plain.items() if not n.endswith(("attn_q.weight", "attn_k.weight",
                                                                            "attn_v.weight"))}
    kinds = quant.tensor_types(c, "Q4_K_M", fuse_qkv=True)
    assert {kinds[f"blk.{i}.attn_qkv.weight"] for i in c.attention_layers} == {"Q4_K", "Q6_K"}  # use_more_bits


def test_calculator_bytes_of_a_fused_file(tmp_path, capsys):
    """The calculator's bytes for a fused Q4_K_M file equal the bytes of a file written with those types."""
    config, params = params_for("moe-tied", 256)
    types = quant.tensor_types(config, "Q4_K_M", fuse_qkv=True)
    path = tmp_path / "fused-q4km.gguf"
    assert W.write_gguf(path, config, params, types, fuse_qkv=True) == types
    assert G.gguf_tensor_bytes(path) == quant.gguf_weight_bytes(config, "Q4_K_M", fuse_qkv=True)
    assert G.gguf_tensor_types(path) == types
    assert main(["memory", "LFM2-1.2B", "--json", "--fuse-qkv"]) == 0
    fused = json.loads(capsys.readouterr().out)
    assert fused["weights_bytes"] == quant.gguf_weight_bytes(lfm2np.load_config("LFM2-1.2B"), "Q4_K_M", fuse_qkv=True)
    assert main(["memory", "LFM2-1.2B", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert fused["total_bytes"] - plain["total_bytes"] == fused["weights_bytes"] - plain["weights_bytes"] > 0
    assert main(["memory", str(path), "--fuse-qkv"]) == 2
    assert "--fuse-qkv does not apply" in capsys.readouterr().err


def test_a_bidirectional_file_reads_as_the_bidirectional_model(tmp_path):
    """lfm2.attention.causal false (the converter's Lfm2BidirectionalModel) is no longer refused: a centred conv
    and attention both ways (tests/test_bidirectional.py checks it against llama.cpp)."""
    config, params = params_for("dense-tied", 48)
    path = tmp_path / "bidir.gguf"
    W.write_gguf(path, config, params, "F32", metadata={"lfm2.attention.causal": False})
    g = lfm2np.load(path)
    assert not g.config.causal and g.config == config.replace(causal=False, source=g.config.source)
    ids = np.array([3, 1, 4, 1, 5])
    assert not np.allclose(g.forward(ids)[0], lfm2np.Model(config, params).forward(ids)[0])


@pytest.mark.parametrize("key, value, needle", [
    ("lfm2.attention.sliding_window", 64, "lfm2.attention.sliding_window is 64"),
])
def test_sliding_window_files_are_refused(tmp_path, capsys, key, value, needle):
    config, params = params_for("dense-tied", 48)
    path = tmp_path / "variant.gguf"
    W.write_gguf(path, config, params, "F32", metadata={key: value})
    with pytest.raises(lfm2np.Lfm2npError, match=needle):
        lfm2np.load(path)
    assert main(["forward", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    W.write_gguf(path, config, params, "F32", metadata={key: 0 if key.endswith("window") else True})
    lfm2np.load(path)  # a window of 0 and causal true are the plain model


# ================================================================ metadata checked for type and against the tensors
@pytest.fixture(scope="module")
def described(tmp_path_factory):
    """(config, metadata, tensor shapes) of a dense and an MoE F32 file (tiny-dense: D 48, 6 heads of 8, 2 KV
    heads, FFN 80, layers C A C A; tiny-moe: 6 experts of width 24 top-?, FFN 72, layers C C A C, 1 dense)."""
    out = {}
    root = tmp_path_factory.mktemp("meta")
    for kind in ("dense-tied", "moe-tied"):
        config, params = params_for(kind, 48)
        W.write_gguf(root / f"{kind}.gguf", config, params, "F32")
        with G.open_gguf(root / f"{kind}.gguf") as f:
            out[kind] = (config, G.read_metadata(f), {n: t.ne for n, t in f.tensors.items()})
    return out


def _dict(described, kind, **changes):
    config, meta, ne = described[kind]
    arch = "lfm2" if kind.startswith("dense") else "lfm2moe"
    meta = dict(meta)
    for key, value in changes.items():
        key = key.replace("__", ".")
        full = key if key.startswith(("tokenizer.", "general.")) else f"{arch}.{key}"
        if value is None:
            meta.pop(full, None)
        else:
            meta[full] = value
    return G.config_dict_from_metadata(meta, ne, "x.gguf")


#: A key the tensors contradict but settle (a width, the vocabulary): a warning naming the key, the tensors' value.
WARNED = [
    ("dense-tied", dict(feed_forward_length=240), "lfm2.feed_forward_length is 240 but the FFN tensors are 80 wide",
     ("intermediate_size", 80)),
    ("dense-tied", dict(vocab_size=65536), "lfm2.vocab_size is 65536 but token_embd.weight has 97 rows",
     ("vocab_size", 97)),
    ("dense-tied", {"tokenizer.ggml.tokens": ("array", 120)}, "tokenizer.ggml.tokens has 120 entries but "
     "token_embd.weight has 97 rows", ("vocab_size", 97)),
    ("moe-tied", dict(expert_feed_forward_length=96), "lfm2moe.expert_feed_forward_length is 96 but the expert "
     "tensors are 24 wide", ("moe_intermediate_size", 24)),
    ("moe-tied", dict(feed_forward_length=[50] * 4), "lfm2moe.feed_forward_length is 50 but the FFN tensors are 72",
     ("intermediate_size", 72)),
]


@pytest.mark.parametrize("kind, changes, needle, field", WARNED, ids=[w[2][:40] for w in WARNED])
def test_metadata_lies_the_tensors_settle_warn(described, kind, changes, needle, field):
    with pytest.warns(UserWarning, match=re.escape("x.gguf: " + needle)):
        d = _dict(described, kind, **changes)
    assert d[field[0]] == field[1]
    assert lfm2np.Config.from_dict(d) == described[kind][0]


#: A count the tensors contradict (layers, heads, experts, the layer kinds): an error naming the key.
REFUSED = [
    ("dense-tied", dict(block_count=5), "lfm2.block_count is 5 but the file has no tensors for block 4"),
    ("dense-tied", dict(block_count=3, attention__head_count_kv=[0, 2, 0]), "lfm2.block_count is 3 but the file "
     "has tensors for blocks up to 3"),
    ("dense-tied", dict(attention__head_count=3), "lfm2.attention.head_count gives head dim 16 = embedding_length "
     "48 / head_count 3, but blk.1.attn_q_norm.weight has 8 entries"),
    ("dense-tied", dict(attention__head_count=3, attention__key_length=8), "lfm2.attention.head_count is 3 (head "
     "dim 8): 24 query rows, but blk.1.attn_q.weight has 48"),
    ("dense-tied", dict(attention__key_length=16), "lfm2.attention.key_length gives head dim 16, but "
     "blk.1.attn_q_norm.weight has 8 entries"),
    ("dense-tied", dict(attention__head_count_kv=[0, 3, 0, 3]), "lfm2.attention.head_count_kv[1] is 3 (head dim "
     "8 = embedding_length 48 / head_count 6): 24 key rows, but blk.1.attn_k.weight has 16"),
    ("dense-tied", dict(attention__head_count_kv=[0, 2, 0, 0]), "lfm2.attention.head_count_kv[3] is 0 (a conv "
     "layer) but blk.3.attn_q.weight is an attention tensor"),
    ("dense-tied", dict(embedding_length=64, attention__head_count=8), "lfm2.embedding_length is 64 but "
     "token_embd.weight has rows of 48"),
    ("dense-tied", dict(shortconv__l_cache=4), "lfm2.shortconv.l_cache is 4 but blk.0.shortconv.conv.weight has "
     "3 taps"),
    ("moe-tied", dict(expert_count=8), "lfm2moe.expert_count is 8 but blk.1.ffn_gate_inp.weight routes to 6"),
    ("moe-tied", dict(leading_dense_block_count=2), "lfm2moe.leading_dense_block_count is 2 but block 1 holds "
     "blk.1.ffn_gate_inp.weight"),
    ("moe-tied", dict(leading_dense_block_count=0), "lfm2moe.leading_dense_block_count is 0 but block 0 has a "
     "dense FFN"),
]


@pytest.mark.parametrize("kind, changes, needle", REFUSED, ids=[r[2][:40] for r in REFUSED])
def test_metadata_contradicting_the_tensor_counts_is_refused(described, kind, changes, needle):
    with pytest.raises(lfm2np.Lfm2npError) as e:
        _dict(described, kind, **changes)
    assert str(e.value).startswith("x.gguf: " + needle), str(e.value)


#: Malformed values (issue 11): each an Lfm2npError naming the key, never a raw TypeError / ValueError.
MALFORMED = [
    (dict(block_count="4"), "lfm2.block_count is a string '4'; expected an integer"),
    (dict(block_count=4.0), "lfm2.block_count is a float 4.0; expected an integer"),
    (dict(block_count=True), "lfm2.block_count is a bool True; expected an integer"),
    (dict(block_count=-1), "lfm2.block_count is -1; expected 1..4096"),
    (dict(block_count=0), "lfm2.block_count is 0; expected 1..4096"),
    (dict(block_count=10**9), "lfm2.block_count is 1000000000; expected 1..4096"),
    (dict(block_count=None), "lfm2.block_count is missing"),
    (dict(embedding_length="48"), "lfm2.embedding_length is a string '48'"),
    (dict(attention__head_count_kv=["0", "2", "0", "2"]), "lfm2.attention.head_count_kv[0] is a string '0'"),
    (dict(attention__head_count_kv=[0, 2, 0]), "lfm2.attention.head_count_kv has 3 entries; expected one per "
     "layer, block_count = 4"),
    (dict(attention__head_count_kv=[0, -2, 0, 2]), "lfm2.attention.head_count_kv[1] is -2; expected 0 or more"),
    (dict(attention__head_count_kv=2.5), "lfm2.attention.head_count_kv is a float 2.5"),
    (dict(attention__head_count_kv=[0, 2, 0, 4]), "lfm2.attention.head_count_kv differs between attention layers"),
    (dict(attention__head_count=True), "lfm2.attention.head_count is a bool True"),
    (dict(attention__head_count=[6, 6, 6]), "lfm2.attention.head_count has 3 entries"),
    (dict(attention__head_count=[6, 6, 6, 3]), "lfm2.attention.head_count varies per layer ([3, 6])"),
    (dict(attention__head_count=5), "lfm2.attention.head_count is 5, which does not divide embedding_length 48"),
    (dict(feed_forward_length="80"), "lfm2.feed_forward_length is a string '80'"),
    (dict(feed_forward_length=[80, 80]), "lfm2.feed_forward_length has 2 entries"),
    (dict(feed_forward_length=-5), "lfm2.feed_forward_length is -5; expected 0 or more"),
    (dict(feed_forward_length=[80, 96, 80, 80]), "lfm2.feed_forward_length differs between dense layers"),
    (dict(attention__layer_norm_rms_epsilon="1e-5"), "lfm2.attention.layer_norm_rms_epsilon is a string"),
    (dict(attention__layer_norm_rms_epsilon=float("nan")), "lfm2.attention.layer_norm_rms_epsilon is nan; "
     "expected a finite number > 0"),
    (dict(attention__layer_norm_rms_epsilon=-1e-5), "lfm2.attention.layer_norm_rms_epsilon is -1e-05"),
    (dict(attention__layer_norm_rms_epsilon=True), "lfm2.attention.layer_norm_rms_epsilon is a bool True"),
    (dict(rope__freq_base=float("inf")), "lfm2.rope.freq_base is inf"),
    (dict(rope__freq_base=[1e6]), "lfm2.rope.freq_base is a list of 1; expected a number"),
    (dict(context_length=0), "lfm2.context_length is 0; expected 1 or more"),
    (dict(context_length="4096"), "lfm2.context_length is a string '4096'"),
    (dict(shortconv__l_cache=1), "lfm2.shortconv.l_cache is 1; expected 2 or more"),
    (dict(vocab_size="97"), "lfm2.vocab_size is a string '97'"),
    (dict(attention__key_length="8"), "lfm2.attention.key_length is a string '8'"),
    (dict(attention__value_length=16), "lfm2.attention.value_length is 16 but the key head dim is 8"),
    (dict(attention__causal="false"), "lfm2.attention.causal is a string 'false'; expected a bool"),
    (dict(attention__sliding_window="0"), "lfm2.attention.sliding_window is a string '0'"),
    (dict(rope__scaling__type=7), "lfm2.rope.scaling.type is 7; expected a string"),
    (dict(rope__scaling__type="yarn"), "lfm2.rope.scaling.type is 'yarn'; only plain RoPE"),
    ({"tokenizer.ggml.bos_token_id": "1"}, "tokenizer.ggml.bos_token_id is a string '1'"),
    ({"tokenizer.ggml.eos_token_id": 500}, "tokenizer.ggml.eos_token_id is 500; expected 0..96"),
    ({"general.architecture": 5}, "general.architecture is 5; lfm2np reads lfm2, lfm2moe"),
    ({"general.architecture": "llama"}, "general.architecture is 'llama'"),
]
MALFORMED_MOE = [
    (dict(expert_count="6"), "lfm2moe.expert_count is a string '6'"),
    (dict(expert_used_count=9), "lfm2moe.expert_used_count is 9; expected 1..6"),
    (dict(expert_gating_func="sigmoid"), "lfm2moe.expert_gating_func is a string 'sigmoid'"),
    (dict(expert_gating_func=1), "lfm2moe.expert_gating_func is 1; LFM2-MoE routes with sigmoid (2)"),
    (dict(expert_weights_norm=1), "lfm2moe.expert_weights_norm is 1; expected a bool"),
    (dict(expert_weights_scale="1"), "lfm2moe.expert_weights_scale is a string '1'"),
    (dict(expert_feed_forward_length=[24, 24]), "lfm2moe.expert_feed_forward_length has 2 entries"),
    (dict(leading_dense_block_count=5), "lfm2moe.leading_dense_block_count is 5; expected 0..4"),
]


@pytest.mark.parametrize("kind, changes, needle", [("dense-tied", *m) for m in MALFORMED] +
                         [("moe-tied", *m) for m in MALFORMED_MOE], ids=[m[1][:45] for m in MALFORMED + MALFORMED_MOE])
def test_malformed_metadata_is_named(described, kind, changes, needle):
    with pytest.raises(lfm2np.Lfm2npError) as e:
        _dict(described, kind, **changes)
    assert str(e.value).startswith("x.gguf: " + needle), str(e.value)


def test_a_lying_feed_forward_length_in_a_real_file(tmp_path, capsys):
    """The published LFM2.5 case: feed_forward_length says 3x what the FFN tensors are. The file loads with a
    warning naming the key and runs exactly the tensors' model; the CLI loads it too (the warning on stderr)."""
    config, params = params_for("dense-tied", 48)
    path = tmp_path / "lies.gguf"
    W.write_gguf(path, config, params, "F32", metadata={"lfm2.feed_forward_length": 3 * config.ffn_dim})
    with pytest.warns(UserWarning, match=r"lies\.gguf: lfm2\.feed_forward_length is 240 but the FFN tensors are 80"):
        model = lfm2np.load(path)
    assert np.array_equal(model.forward(IDS), lfm2np.Model(config, params).forward(IDS))
    with pytest.warns(UserWarning, match="feed_forward_length"):
        assert main(["params", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == sum(v.size for v in params.values())
    # on the command line the warning is one line naming the file and the key, no Python source shown
    proc = subprocess.run([sys.executable, "-m", "lfm2np", "params", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stderr.splitlines() == [f"lfm2np: warning: {path}: lfm2.feed_forward_length is 240 but the FFN "
                                        f"tensors are 80 wide (blk.0.ffn_gate.weight); the tensors' width 80 is used"], proc.stderr


def test_pre_tokenizer_names_in_a_real_file(converted, tmp_path, capsys):
    """Ollama's "llama-bpe" for an LFM2 tokenizer: a warning naming the key, then the same encoding; a split
    lfm2np does not know: refused, by the library and by the CLI in one line."""
    checkpoint, _ = converted
    ollama = tmp_path / "ollama.gguf"
    W.write_gguf(ollama, tiny_config(), tiny_params(), "F32", tokenizer=checkpoint,
                 metadata={"tokenizer.ggml.pre": "llama-bpe"})
    with pytest.warns(UserWarning, match=r"ollama\.gguf: tokenizer\.ggml\.pre is 'llama-bpe', not 'lfm2'"):
        tok = Tokenizer.from_gguf(ollama)
    ref = Tokenizer.from_dir(checkpoint)
    assert all(tok.encode(t) == ref.encode(t) for t in TEXTS)
    qwen = tmp_path / "qwen.gguf"
    W.write_gguf(qwen, tiny_config(), tiny_params(), "F32", tokenizer=checkpoint,
                 metadata={"tokenizer.ggml.pre": "qwen2"})
    with pytest.raises(lfm2np.Lfm2npError, match=r"qwen\.gguf: tokenizer\.ggml\.pre is 'qwen2'"):
        Tokenizer.from_gguf(qwen)
    lfm2np.load(qwen)  # the weights alone do not need the tokenizer
    assert main(["generate", str(qwen), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lfm2np: error: ") and "tokenizer.ggml.pre is 'qwen2'" in err and err.count("\n") == 1


# ================================================================ what a decode step reads
def test_embedding_rows_alone_and_kept_tensors_dequantised_once(tmp_path, monkeypatch):
    """Not kept: an embedding lookup dequantises only the looked-up rows (the tied head reads the whole table:
    it needs all of it). Kept: prefill and decode steps dequantise every tensor, and every expert, once."""
    from collections import Counter

    from lfm2np.io.gguf_file import GgufFile

    config, params = params_for("moe-tied", 64)
    path = tmp_path / "q8.gguf"
    W.write_gguf(path, config, params, "Q8_0")
    calls = []
    real = GgufFile.dequantize

    def spy(self, name, rows=None):
        calls.append((name, tuple(rows) if isinstance(rows, list) else rows))
        return real(self, name, rows)

    monkeypatch.setattr(GgufFile, "dequantize", spy)
    lean = lfm2np.load(path, memory_budget=0)
    assert np.array_equal(lean.embed_tokens(np.array([5, 17, 5])), lfm2np.load(path).params["model.embed_tokens.weight"][[5, 17, 5]])
    assert calls[0] == ("token_embd.weight", (5, 17, 5))
    calls.clear()
    model = lfm2np.load(path, memory_budget="all")
    logits, state = model.step(IDS[:5])
    for token in IDS[5:]:
        logits, state = model.step(np.array([token]), state)
    counts = Counter(calls)
    assert counts[("token_embd.weight", None)] == 1 and max(counts.values()) == 1, counts.most_common(3)
    assert any(isinstance(rows, int) for _, rows in counts)  # experts are read one at a time
    assert np.allclose(logits, lfm2np.load(path).forward(IDS)[-1:], rtol=1e-4, atol=1e-4)


def test_the_next_layer_and_the_chosen_experts_are_read_ahead(tmp_path, monkeypatch):
    """Loading lazily from a GGUF asks the kernel (posix_fadvise WILLNEED) for the byte ranges the forward
    needs next: a layer's tensors, and of a stacked expert tensor only the rows of the experts chosen."""
    import os

    from lfm2np.io.gguf_file import GgufFile

    config, params, path, _ = write(tmp_path, "moe-tied", 64, "F32")
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: asked.append((off, n)), raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_WILLNEED", getattr(os, "POSIX_FADV_WILLNEED", 3), raising=False)
    model = lfm2np.load(path, memory_budget=0)
    out = model.forward(IDS[:5])
    np.testing.assert_array_equal(out, lfm2np.Model(config, params).forward(IDS[:5]))
    with GgufFile(path) as f:
        t = next(t for t in f.tensors.values() if t.name.endswith("ffn_gate_exps.weight"))
        row = t.nbytes // t.shape[0]
        whole = {(f.tensors[n].offset, f.tensors[n].nbytes) for n in f.tensors}
    expert_ranges = [(o, n) for o, n in asked if t.offset <= o < t.offset + t.nbytes]
    assert expert_ranges and all(n % row == 0 and n < t.nbytes for _, n in expert_ranges)  # experts, not all
    assert any(r in whole for r in asked)  # the next layer's (unstacked) tensors whole
