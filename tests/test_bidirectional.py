"""Bidirectional LFM2 (LFM2.5-Embedding / -ColBERT / -Encoder) and the embedding head, against two references.

- transformers' Lfm2Model made bidirectional by tools/make_bidir_fixtures.py (a centred conv, a pad-only attention
  mask, random norm weights): every intermediate within the fp32 operator tier, the embeddings under each pooling
  and the per-token vectors to cosine 1 - 1e-6 and within the tier, in float32 and float64; each layer in the
  bf16 emulation against transformers in bfloat16; padded batches under both settings of conv_zero_padding;
- llama.cpp (tools/make_bidir_llama_fixtures.py): GGUF files made by its converter, read by lfm2np as the
  checkpoint, and the embeddings llama-cpp-python computes from them under every pooling type;
- padding invariance: a list of sequences, padded into one batch, gives each what it gives alone;
- the operators' formulas, and the config, side files and GGUF keys that switch them on.
"""

from __future__ import annotations

import functools
import json
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file

import lfm2np
from lfm2np import layers, ops
from lfm2np.numerics import BFLOAT16
from lfm2np.oracle.tolerance import FP32, rel_error
from lfm2np.schema import canonical_name

from conftest import GOLDEN, ULP_FLIP

MANIFEST = json.loads((GOLDEN / "bidir_manifest.json").read_text())["cases"]
CASES = sorted(MANIFEST)
LLAMA = sorted(c for c in CASES if (GOLDEN / c / "llama.safetensors").is_file())
COS = 1e-6  # the acceptance bar: cosine to 1 - 1e-6


@functools.lru_cache(maxsize=None)
def golden(case: str) -> dict[str, np.ndarray]:
    return load_file(str(GOLDEN / case / "golden.safetensors"))


@functools.lru_cache(maxsize=None)
def model(case: str, dtype: str = "float32", gguf: bool = False) -> lfm2np.Model:
    return lfm2np.load(GOLDEN / case / "model-f32.gguf" if gguf else GOLDEN / case, dtype=dtype)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def traced(m: lfm2np.Model, ids, **kw) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    seen: dict[str, np.ndarray] = {}
    out = m.embed(ids, record=lambda n, v: seen.__setitem__(n, np.array(v)), **kw)
    return out, seen


# ------------------------------------------------------------------------------ the configs
def test_the_configs_read_as_their_code_reads_them():
    c = {n: model(n).config for n in CASES}
    assert [c[n].causal for n in CASES] == [MANIFEST[n]["causal"] for n in CASES] == [
        False, False, False, True]  # bidir-cls, bidir-colbert, bidir-last-bias, causal-colbert
    # conv_zero_padding: explicit, absent in the released layout (false), absent in transformers' lfm2_bidirectional
    assert [c[n].conv_zero_padding for n in CASES] == [MANIFEST[n]["conv_zero_padding"] for n in CASES]
    assert (c["bidir-cls"].conv_zero_padding, c["bidir-last-bias"].conv_zero_padding) == (False, True)
    assert [(c[n].pooling, c[n].dense_out, c[n].dense_bias) for n in CASES] == [
        ("cls", 0, False), (None, 16, False), ("last", 24, True), (None, 16, False)]
    base = lfm2np.load_config("tiny-dense").to_dict()
    for extra in ({"architectures": ["Lfm2BidirForSequenceRouting"]},  # LFM2.5-Encoder-350M-Prompt-Router
                  {"auto_map": {"AutoModel": "modeling_lfm2_bidirectional.Lfm2BidirectionalModel"}},
                  {"model_type": "lfm2_bidirectional"}):
        assert not lfm2np.Config.from_dict({**base, **extra}).causal, extra
    assert lfm2np.Config.from_dict({**base, "architectures": ["Lfm2Model"]}).causal  # LFM2-ColBERT-350M
    round_trip = lfm2np.Config.from_dict(c["bidir-last-bias"].to_dict())
    assert round_trip == c["bidir-last-bias"]


@pytest.mark.parametrize("change, problem", [
    ({"conv_zero_padding": "yes"}, "'conv_zero_padding'.* expected true or false"),
    ({"sentence_transformers": {"pooling": "max"}}, "'pooling'.* expected one of cls, mean, last"),
    ({"sentence_transformers": {"pooling": "cls", "dense_out": -3}}, "'dense_out'.* positive integer"),
    ({"sentence_transformers": {"pooling": "cls", "normalize": True}}, "'sentence_transformers'"),
])
def test_bad_bidirectional_keys_are_named(change, problem):
    d = {**model("bidir-cls").config.to_dict(), **change}
    with pytest.raises(lfm2np.Lfm2npError, match=problem):
        lfm2np.Config.from_dict(d)


def test_only_lfm2_reads_both_ways():
    with pytest.raises(lfm2np.Lfm2npError, match="only lfm2 has a bidirectional variant"):
        lfm2np.load_config("tiny-moe").replace(causal=False)


# ---------------------------------------------------------------------------- the operators
def test_the_centred_conv_is_its_formula():
    rng = np.random.default_rng(0)
    for L in (2, 3, 4, 5):
        u, w, b = rng.standard_normal((7, 4)), rng.standard_normal((4, L)), rng.standard_normal(4)
        want = np.array([[sum(w[d, j] * (u[t - L // 2 + j, d] if 0 <= t - L // 2 + j < 7 else 0.0)
                              for j in range(L)) + b[d] for d in range(4)] for t in range(7)])
        np.testing.assert_allclose(ops.centred_conv1d(u, w, b), want, rtol=1e-12)
        # the causal conv of the same inputs, L - 1 - L//2 positions later: the window moved, not the taps
        shift = L - 1 - L // 2
        causal, _ = ops.causal_conv1d(np.concatenate([u, np.zeros((shift, 4))]), w, b)
        np.testing.assert_allclose(ops.centred_conv1d(u, w, b), causal[shift:], rtol=1e-12)


def test_non_causal_attention_is_its_formula_and_ignores_the_padding_keys():
    rng = np.random.default_rng(1)
    T, H, G, hd = 9, 4, 2, 8
    q, k, v = rng.standard_normal((T, H, hd)), rng.standard_normal((T, G, hd)), rng.standard_normal((T, G, hd))
    kk, vv = np.repeat(k, H // G, axis=1), np.repeat(v, H // G, axis=1)
    scores = np.einsum("thd,shd->hts", q, kk) / np.sqrt(hd)
    want = np.einsum("hts,shd->thd", ops.softmax(scores), vv).reshape(T, H * hd)
    np.testing.assert_allclose(ops.attention(q, k, v, causal=False, block=4), want, rtol=1e-12)
    keys = np.array([True] * 6 + [False] * 3)
    masked = ops.attention(q, k, v, causal=False, keys=keys)
    k2, v2 = k.copy(), v.copy()
    k2[~keys], v2[~keys] = 1e3, -1e3  # what the padding holds never reaches a query
    np.testing.assert_array_equal(ops.attention(q, k2, v2, causal=False, keys=keys), masked)
    scores[..., ~keys] = -np.inf
    np.testing.assert_allclose(masked, np.einsum("hts,shd->thd", ops.softmax(scores), vv).reshape(T, H * hd),
                               rtol=1e-12)


def test_pooling_and_normalisation_are_their_formulas():
    h = np.arange(12.0).reshape(4, 3) - 5
    real = np.array([True, True, True, False])
    assert ops.pool(h, "cls", real).tolist() == h[0].tolist()
    assert ops.pool(h, "last", real).tolist() == h[2].tolist()
    np.testing.assert_allclose(ops.pool(h, "mean", real), h[:3].mean(0))
    np.testing.assert_allclose(np.linalg.norm(ops.l2_normalize(h), axis=-1), 1.0)
    assert ops.l2_normalize(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]  # max(||x||, eps): no division by zero


# -------------------------------------------------------------------------- against transformers
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES)
def test_every_intermediate_against_transformers(case, dtype):
    g = golden(case)
    _, seen = traced(model(case, dtype), g["capture.ids"])
    compared = 0
    for key, ref in g.items():
        if not key.startswith("capture.") or key == "capture.ids":
            continue
        name = canonical_name(key[len("capture."):])
        assert name in seen, key
        assert rel_error(seen[name].reshape(ref.shape), ref) < FP32.op_rel, (key, rel_error(seen[name], ref))
        compared += 1
    c = model(case).config
    assert compared >= 4 * c.num_hidden_layers  # norms, mixer values, outputs of every layer


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES)
def test_embeddings_against_transformers(case, dtype):
    g, m = golden(case), model(case, dtype)
    ids = g["capture.ids"]
    for how in ("cls", "mean", "last"):
        e = m.embed(ids, pooling=how)
        assert e.shape == (m.config.embedding_size,) and abs(np.linalg.norm(e) - 1) < 1e-6
        assert 1 - cosine(e, g[f"embed.{how}"]) < COS and rel_error(e, g[f"embed.{how}"]) < FP32.op_rel, how
    tokens = m.embed(ids, per_token=True)
    assert tokens.shape == (len(ids), m.config.embedding_size)
    assert (1 - cosine(tokens, g["tokens"])).max() < COS and rel_error(tokens, g["tokens"]) < FP32.op_rel
    # the checkpoint's own pooling (or mean, when it declares none) is the default
    np.testing.assert_array_equal(m.embed(ids), m.embed(ids, pooling=m.config.pooling or "mean"))


@pytest.mark.parametrize("case", CASES)
def test_each_layer_against_transformers_bf16(case):
    """Fed transformers' bf16 input, each layer gives its bf16 output to single-ulp flips; the centred conv layers
    bit for bit (the attention softmax's float32 sum lands on a bf16 boundary now and then, as in the causal model)."""
    g, m = golden(case), model(case, "bfloat16")
    c, ids = m.config, g["capture.ids"]
    np.testing.assert_array_equal(m.embed_tokens(ids), g["bf16.model.embed_tokens.output"])
    rope = m.rope(np.arange(len(ids)))
    h = g["bf16.model.embed_tokens.output"]
    for i in range(c.num_hidden_layers):
        ref = g[f"bf16.model.layers.{i}.output"]
        out, past = layers.decoder_layer(h, m.layer_weights(i), c, rope if c.is_attention(i) else None,
                                         None if c.causal else layers.Bidirectional(), None, layers.Scope(BFLOAT16.round))
        assert rel_error(out, ref) == 0 if not c.is_attention(i) else rel_error(out, ref) < ULP_FLIP, (i, rel_error(out, ref))
        assert (past is None) != c.causal  # a bidirectional layer keeps no state
        h = ref
    e = m.embed(ids)
    assert 1 - cosine(e, g["bf16.embedding"]) < 5e-3  # bf16's 8 significant bits, grown by depth


# --------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("case", CASES)
def test_a_padded_batch_as_the_reference_computes_it(case):
    """forward/embed given an attention_mask compute a padded batch's rows as transformers does, with the padding
    zeroed before the centred conv or not (conv_zero_padding). Not zeroed, the padding reaches the tokens next to
    it in the reference as here: a padded row is then not what it is alone."""
    g, m = golden(case), model(case)
    ids, mask = g["padded.ids"], g["padded.mask"]
    for label, zero in (("zero", True), ("keep", False)):
        mz = lfm2np.Model(m.config.replace(conv_zero_padding=zero), dict(m.params))
        if case == "bidir-last-bias" and zero:  # conv_bias: transformers zeroes the conv block's input, so its
            continue  # padding still carries b_bias * x_bias into the conv; lfm2np zeroes b * x itself
        for row, real, ref in zip(ids, mask, g[f"padded.{label}.hidden"]):
            _, seen = traced(mz, row, attention_mask=real)
            assert rel_error(seen["model.embedding_norm"][real], ref[real]) < FP32.op_rel
        e = mz.embed(ids, attention_mask=mask)
        assert (1 - cosine(e, g[f"padded.{label}.embedding"])).max() < COS
    alone = np.stack([g[f"alone.{i}.embedding"] for i in range(3)])
    leaks = 1 - cosine(g["padded.keep.embedding"], alone)
    assert (leaks.max() > 1e-3) == (not m.config.causal)  # the padding moves a bidirectional row's embedding


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES)
def test_a_list_of_sequences_gives_each_what_it_gives_alone(case, dtype):
    """Padded into one batch, whatever the checkpoint's conv_zero_padding: to float32 (float64) rounding, since BLAS
    blocks a product differently for another number of rows (measured 0 on these sizes; 1e-6 allowed)."""
    g, m = golden(case), model(case, dtype)
    seqs = [g[f"alone.{i}.ids"].tolist() for i in range(3)]
    batch, tokens = m.embed(seqs), m.embed(seqs, per_token=True)
    assert batch.shape == (3, m.config.embedding_size) and [len(t) for t in tokens] == [len(s) for s in seqs]
    tol = 1e-6 if dtype == "float32" else 1e-14
    for s, e, t, ref in zip(seqs, batch, tokens, (g[f"alone.{i}.embedding"] for i in range(3))):
        assert rel_error(e, m.embed(s)) < tol and rel_error(t, m.embed(s, per_token=True)) < tol
        assert 1 - cosine(e, ref) < COS  # and that is transformers' unpadded value


def test_padding_that_cannot_be_meant_is_refused():
    m, c = model("bidir-cls"), model("causal-colbert")
    ids = np.array([[1, 5, 9], [1, 7, 0]])
    for bad, problem in (([[1, 1, 1]], "shape"), ([[1, 1, 1], [0, 0, 0]], "row 1 has no token"),
                         ([[1, 1, 2], [1, 1, 0]], "0 \\(padding\\) and 1"), ("x", "0 \\(padding\\) and 1|shape")):
        with pytest.raises(lfm2np.Lfm2npError, match=problem):
            m.forward(ids, attention_mask=bad)
    with pytest.raises(lfm2np.Lfm2npError, match="right padding"):
        c.embed(ids, attention_mask=[[1, 1, 1], [0, 1, 1]])
    np.testing.assert_array_equal(c.embed(ids, attention_mask=[[1, 1, 1], [1, 1, 0]])[1], c.embed([1, 7]))
    with pytest.raises(lfm2np.Lfm2npError, match="no decoding state"):
        m.step([1, 2, 3])
    with pytest.raises(lfm2np.Lfm2npError, match="pooling is 'max'"):
        m.embed([1, 2], pooling="max")
    with pytest.raises(lfm2np.Lfm2npError, match="record traces one sequence"):
        m.embed([[1, 2], [3]], record=lambda n, v: None)


# ------------------------------------------------------------------------------ the schema
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_embed_name_exactly_the_schema(case, dtype):
    m = model(case, dtype)
    ids = golden(case)["capture.ids"][:7]
    for output, kw in (("embedding", {}), ("token_embeddings", {"per_token": True})):
        seen: list = []
        m.embed(ids, record=lambda n, v: seen.append((n, v.shape)), **kw)
        assert seen == [(t.name, t.shape_for(len(ids))) for t in lfm2np.trace_names(m.config, output)]
    seen = []
    m.forward(ids, record=lambda n, v: seen.append((n, v.shape)))
    assert seen == [(t.name, t.shape_for(len(ids))) for t in lfm2np.trace_names(m.config)]


# --------------------------------------------------------------------------------- llama.cpp
@pytest.mark.parametrize("case", LLAMA)
def test_a_gguf_from_llama_cpps_converter_reads_as_the_checkpoint(case):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converter-made file loads without a warning
        g = model(case, gguf=True)
    c = model(case).config
    # a GGUF carries no conv_zero_padding (llama.cpp never pads): read as false; the context length is the file's
    assert g.config == c.replace(conv_zero_padding=False, max_position_embeddings=g.config.max_position_embeddings)
    ids = golden(case)["capture.ids"]
    np.testing.assert_array_equal(g.embed(ids), model(case).embed(ids))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", LLAMA)
def test_embeddings_against_llama_cpp(case, dtype):
    """llama.cpp's vectors (normalised here: llama.cpp leaves that to its caller) under every pooling type."""
    ref = load_file(str(GOLDEN / case / "llama.safetensors"))
    g, m = golden(case), model(case, dtype, gguf=True)
    seqs = [g["capture.ids"]] + [g[f"alone.{i}.ids"] for i in range(3)]
    for k, ids in enumerate(seqs):
        for how in ("cls", "mean", "last"):
            theirs = ops.l2_normalize(ref[f"{how}.{k}"].astype(np.float64))
            e = m.embed(ids, pooling=how)
            assert 1 - cosine(e, theirs) < COS and rel_error(e, theirs) < FP32.op_rel, (k, how)
        theirs = ops.l2_normalize(ref[f"none.{k}"].astype(np.float64))
        tokens = m.embed(ids, per_token=True)
        assert (1 - cosine(tokens, theirs)).max() < COS and rel_error(tokens, theirs) < FP32.op_rel, k
