"""lfm2np diagnose on embeddings dumps of bidirectional LFM2: dumps that transformers computed the wrong way
(tools/make_bidir_fixtures.py: the causal conv window, the causal mask, both -- the checkpoint run without its
remote code --, the padding zeroed against the checkpoint's flag, another pooling) are named by the right
catalogue entries; transformers' and llama.cpp's correct embeddings agree; each bidir-* mistake made by the
port is named first; the dump files and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import lfm2np
from lfm2np.cli import main
from lfm2np.oracle import mistakes as M
from lfm2np.oracle.diagnose import diagnose, format_diagnosis
from lfm2np.oracle.dumps import embeddings_dump, load_dump

from conftest import GOLDEN

BIDIR = ("bidir-cls", "bidir-colbert")


def setup(case: str):
    g = load_file(str(GOLDEN / case / "golden.safetensors"))
    return lfm2np.load(GOLDEN / case), g, g["padded.ids"], g["padded.mask"]


@pytest.mark.parametrize("case", BIDIR)
@pytest.mark.parametrize("dump, want", [
    ("mistake.left-padded", "bidir-conv-left-padded"),
    ("mistake.causal-mask", "bidir-causal-mask"),
    ("mistake.causal-model", "bidir-as-causal"),
])
def test_transformers_computed_wrongly_is_named(case, dump, want):
    m, g, ids, mask = setup(case)
    d = diagnose(m, embeddings_dump(ids, g[f"{dump}.embedding"] * 2.5, mask))  # unnormalised: normalised here
    assert not d.agrees and d.best is not None and d.best.id == want, format_diagnosis(d)


@pytest.mark.parametrize("case", BIDIR)
def test_the_padding_zeroed_against_the_flag_is_named(case):
    """transformers' padded batch under the other setting of conv_zero_padding: that mistake, and only it."""
    m, g, ids, mask = setup(case)
    other = "keep" if m.config.conv_zero_padding else "zero"
    d = diagnose(m, embeddings_dump(ids, g[f"padded.{other}.embedding"], mask))
    assert d.best is not None and d.best.id == "bidir-pad-zeroing", format_diagnosis(d)
    assert [h.id for h in d.hypotheses if h.reproduces] == ["bidir-pad-zeroing"]
    same = "zero" if m.config.conv_zero_padding else "keep"
    assert diagnose(m, embeddings_dump(ids, g[f"padded.{same}.embedding"], mask), combine=False).agrees
    # the rows alone (no padding) cannot show it
    alone = diagnose(m, embeddings_dump(g["capture.ids"], g["embed." + (m.config.pooling or "mean")]), combine=False)
    assert alone.agrees and not next(h for h in alone.hypotheses if h.id == "bidir-pad-zeroing").visible


def test_another_pooling_is_named():
    m, g, _, _ = setup("bidir-cls")  # CLS pooling; transformers' mean and last pooled vectors
    for how in ("mean", "last"):
        d = diagnose(m, embeddings_dump(g["capture.ids"], g[f"embed.{how}"]), combine=False)
        assert d.best is not None and d.best.id == "bidir-wrong-pooling" and d.best.switches == {"pooling": how}


@pytest.mark.parametrize("case", ["bidir-cls", "bidir-colbert", "causal-colbert"])
def test_llama_cpps_embeddings_agree(case):
    m, g, _, _ = setup(case)
    ref = load_file(str(GOLDEN / case / "llama.safetensors"))
    how = m.config.pooling or "mean"
    seqs = [g[f"alone.{i}.ids"] for i in range(3)]
    ids = np.zeros((3, len(seqs[0])), np.int64)
    mask = np.zeros(ids.shape, bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, True
    rows = np.stack([ref[f"{how}.{k + 1}"] for k in range(3)])  # llama.cpp ran each row alone
    if m.config.causal or m.config.conv_zero_padding:  # then the reference's padded rows are the rows alone
        d = diagnose(m, embeddings_dump(ids, rows, mask), combine=False)
        assert d.agrees, format_diagnosis(d)
    for k, s in enumerate(seqs):
        assert diagnose(m, embeddings_dump(s, ref[f"{how}.{k + 1}"]), combine=False).agrees


@pytest.mark.parametrize("mistake", ["bidir-causal-mask", "bidir-conv-left-padded", "bidir-as-causal",
                                     "bidir-pad-zeroing", "bidir-wrong-pooling"])
@pytest.mark.parametrize("case", BIDIR)
def test_each_bidirectional_mistake_is_named_first(case, mistake):
    m, _, ids, mask = setup(case)
    dump = embeddings_dump(ids, M.embed(m, ids, mask, M.port_of(m.config, mistake)), mask)
    d = diagnose(m, dump, combine=False)
    assert d.best is not None and d.best.id == mistake, format_diagnosis(d)
    assert [h.id for h in d.hypotheses if h.reproduces] == [mistake], format_diagnosis(d)


def test_the_bidirectional_mistakes_apply_where_they_should():
    applies = {case: {m.id for m in M.CATALOGUE if m.id.startswith("bidir") and m.applies(lfm2np.load_config(
        GOLDEN / case))} for case in ("bidir-cls", "causal-colbert", "dense-legacy")}
    assert applies == {"bidir-cls": {"bidir-causal-mask", "bidir-conv-left-padded", "bidir-as-causal",
                                     "bidir-pad-zeroing", "bidir-wrong-pooling"},
                       "causal-colbert": {"bidir-wrong-pooling"}, "dense-legacy": set()}
    assert not M.mistake("conv-state-dropped").applies(lfm2np.load_config(GOLDEN / "bidir-cls"))  # no second call


def test_an_embeddings_dump_file_and_the_cli(tmp_path, capsys):
    m, g, ids, mask = setup("bidir-cls")
    path = tmp_path / "emb.npz"
    np.savez(path, ids=ids, attention_mask=mask.astype(np.int32), embeddings=g["padded.zero.embedding"])
    dump = load_dump(path)
    assert dump.kind == "embeddings" and dump.embeddings.shape == (3, 32) and dump.mask.dtype == bool
    assert main(["diagnose", str(GOLDEN / "bidir-cls"), "--dump", str(path), "--json", "--no-combine"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "embeddings" and out["best"] == "bidir-pad-zeroing" and out["compared"] == 3
    assert main(["diagnose", str(GOLDEN / "bidir-cls"), "--dump", str(path), "--no-combine"]) == 1
    text = capsys.readouterr().out
    assert "embeddings of 3 rows" in text and "first divergence: position 1" in text


@pytest.mark.parametrize("arrays, problem", [
    ({"embeddings": np.zeros((2, 32))}, "needs 'ids'"),
    ({"embeddings": np.zeros((2, 32)), "ids": np.ones((3, 4), np.int64)}, "of shape \\(B, E\\) with B = 3"),
    ({"embeddings": np.full((1, 32), np.nan), "ids": np.ones((1, 4), np.int64)}, "must be finite"),
    ({"embeddings": np.zeros((1, 32)), "ids": np.ones((1, 4), np.int64), "attention_mask": np.full((1, 4), 2)},
     "attention_mask must hold 0 and 1"),
    ({"embeddings": np.zeros((1, 32)), "ids": np.ones(4, np.int64), "logits": np.zeros((4, 320))}, "one kind"),
])
def test_bad_embeddings_dumps_are_named(tmp_path, arrays, problem):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(lfm2np.Lfm2npError, match=problem):
        load_dump(path)


def test_a_dump_of_another_width_is_refused():
    m, g, _, _ = setup("bidir-colbert")
    with pytest.raises(lfm2np.Lfm2npError, match="embeddings have 32 dimensions; the model's are 16"):
        diagnose(m, embeddings_dump(g["capture.ids"], np.ones(32)))
