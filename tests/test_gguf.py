"""GGUF loading: tiny GGUF files written with gguf's GGUFWriter (through lfm2np.io.gguf_write.write_gguf), read back
with lfm2np.load, for every tensor type llama.cpp's LFM2 files use.

Two claims per type: (1) the model loaded from GGUF holds exactly the values gguf-py's dequantisation gives
for the stored bytes, so its logits equal those of a model built in memory from those values, bit for bit;
(2) float types reproduce the original model (exactly for F32, to a bound for F16/BF16), and quantised
types stay within a measured error of it.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import pytest

import lfm2np
from lfm2np.io.gguf_names import gguf_name
from lfm2np.tensors import layout
from lfm2np.oracle.tolerance import FP32, rel_error
from lfm2np import calc
from lfm2np.calc import quant
from lfm2np.io import gguf as G
from lfm2np.io import gguf_write as W
from lfm2np.synthetic import random_params

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
    """lfm2np.load("x.gguf") returns the same Model as load_gguf (model.load dispatches on the suffix)."""
    config, params, path, _ = write(tmp_path, "moe-untied", 48, "F32")
    model = lfm2np.load(str(path), dtype="float64")
    assert isinstance(model, lfm2np.Model) and model.config == config
    assert model.dtype == np.float64 and model.params["model.embed_tokens.weight"].dtype == np.float64
    expected = lfm2np.Model(config, {k: v.astype(np.float64) for k, v in params.items()}, "float64").forward(IDS)
    np.testing.assert_allclose(model.forward(IDS), expected, rtol=0, atol=0)


def test_float64_mode_and_kept_weights(tmp_path):
    config, params, path, _ = write(tmp_path, "dense-tied", 64, "Q8_0")
    m32 = lfm2np.load(path, keep_weights=False)
    m64 = lfm2np.load(path, dtype="float64", keep_weights=True)
    a = m32.forward(IDS)
    b = m64.forward(IDS)
    assert b.dtype == np.float64
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-5
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
    """The file's tensors and ggml shapes are exactly quant.gguf_tensors(config), and the calculator's byte
    formula applied to the file's real types gives the file's tensor bytes."""
    config, params, path, written = write(tmp_path, "moe-untied", 256, "Q4_K")
    reader = gguf.GGUFReader(path)
    assert {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors} == \
        {t.name: t.ne for t in quant.gguf_tensors(config)}
    types = G.gguf_tensor_types(path)
    predicted = sum(quant.tensor_bytes(types[t.name], t.ne) for t in quant.gguf_tensors(config))
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
    # make layer 0 an attention layer in the metadata only: its attention tensors are then missing
    path = tmp_path / "short.gguf"
    W.write_gguf(path, config, params, "F32")
    data = bytearray(path.read_bytes())
    # flip layer 0 from conv (kv 0) to attention: locate the head_count_kv array [0, 2, 0, 2] (uint32 each)
    needle = np.array([0, 2, 0, 2], np.uint32).tobytes()
    at = bytes(data).find(needle)
    assert at > 0
    data[at:at + 4] = np.array([2], np.uint32).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(lfm2np.Lfm2npError, match=r"short\.gguf: missing tensor blk\.0\.attn_k\.weight"):
        lfm2np.load(path)


def test_shape_mismatch_is_named(tmp_path):
    config, params = params_for("dense-tied", 48)
    path = tmp_path / "wide.gguf"
    W.write_gguf(path, config, params, "F32")
    data = bytearray(path.read_bytes())
    key = b"lfm2.feed_forward_length"
    at = bytes(data).find(key) + len(key) + 4  # after the key, its uint32 value type
    assert int(np.frombuffer(bytes(data[at:at + 4]), np.uint32)[0]) == config.ffn_dim
    data[at:at + 4] = np.array([config.ffn_dim + 16], np.uint32).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(lfm2np.Lfm2npError, match=r"wide\.gguf: tensor 'blk\.0\.ffn_down\.weight' has ggml shape"):
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
        G.read_gguf(path)
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
