"""LFM2-VL: the vision tower, the projector and the image placement against transformers 5.25.

Fixtures: tools/make_vl_fixtures.py (tiny random VL models with random LayerNorm/RMSNorm weights and biases, the
images of tests/golden/vl-images/ through transformers' image processor). The measured errors per stage are
reported by ``test_each_stage_is_within_the_fp32_tier`` (run with ``-s`` to see them).
"""

from __future__ import annotations

import functools
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lfm2np
from lfm2np import vision, vision_schema
from lfm2np.oracle.tolerance import FP32, FP64_VS_FP32, rel_error

from conftest import GOLDEN

VL_CASES = sorted(json.loads((GOLDEN / "vl_manifest.json").read_text())["cases"])
TOWER, PROJECTOR = vision_schema.TOWER, vision_schema.PROJECTOR


@functools.lru_cache(maxsize=None)
def reference(case: str) -> dict[str, np.ndarray]:
    return load_file(str(GOLDEN / case / "reference.safetensors"))


def batch(case: str) -> SimpleNamespace:
    r = reference(case)
    return SimpleNamespace(pixel_values=r["pixel_values"], pixel_attention_mask=r["pixel_attention_mask"] > 0,
                           spatial_shapes=r["spatial_shapes"])


@functools.lru_cache(maxsize=None)
def model(case: str, dtype: str = "float32") -> lfm2np.Model:
    return lfm2np.load(GOLDEN / case, dtype=dtype)


def recorded(m: lfm2np.Model, ids, images) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    seen: dict[str, np.ndarray] = {}
    logits = m.forward(ids, images=images, record=lambda n, v: seen.__setitem__(n, v.copy()))
    return logits, seen


@pytest.mark.parametrize("case", VL_CASES)
def test_logits_are_within_the_fp32_tier_of_transformers(case):
    r = reference(case)
    assert rel_error(model(case).forward(r["ids"], images=batch(case)), r["logits"]) < FP32.logits_rel
    assert rel_error(model(case).forward(r["text_ids"]), r["text_logits"]) < FP32.logits_rel  # no image


@pytest.mark.parametrize("case", VL_CASES)
def test_each_stage_is_within_the_fp32_tier(case):
    """Every vision value transformers recorded (tower, projector, placed embeddings, text layers), within the
    operator tier; the stages the issue asks for are printed."""
    r = reference(case)
    logits, seen = recorded(model(case), r["ids"], batch(case))
    compared = [k for k in r if k in seen]
    assert len([k for k in compared if k.startswith(("model.vision_tower", "model.multi_modal"))]) >= 30
    for name in compared:
        assert rel_error(seen[name], r[name]) < FP32.op_rel, name
    stages = {"vision tower": TOWER + "post_layernorm", "projector": PROJECTOR + "linear_2",
              "placed embeddings": "model.inputs_embeds"}
    print(case, {k: f"{rel_error(seen[v], r[v]):.1e}" for k, v in stages.items()},
          f"logits {rel_error(logits, r['logits']):.1e}")


@pytest.mark.parametrize("case", VL_CASES)
def test_the_oracle_mode_is_within_its_tier(case):
    r = reference(case)
    out = model(case, "float64").forward(r["ids"], images=batch(case))
    assert out.dtype == np.float64 and rel_error(out, r["logits"]) < FP64_VS_FP32.logits_rel


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("case", VL_CASES)
def test_the_forward_emits_exactly_the_schema(case, dtype):
    """With images: the vision values, then the text ones; a decoding step after them and a text-only call name
    the text values only."""
    r, m = reference(case), model(case, dtype)
    ids, px = r["ids"], batch(case)
    dims = {"N": px.pixel_values.shape[0], "P": px.pixel_values.shape[1], "I": int((ids == 100).sum())}
    out: list = []
    m.forward(ids, images=px, record=lambda n, v: out.append((n, v.shape, v.dtype.kind)))
    want = [(t.name, t.shape_for(len(ids), dims), "f") for t in lfm2np.trace_names(m.config)]
    assert out == want
    _, state = m.step(ids, images=px)
    out.clear()
    m.step(ids[:2], state, record=lambda n, v: out.append((n, v.shape, v.dtype.kind)))
    assert out == [(t.name, t.shape_for(2), "i" if t.integer else "f")
                   for t in lfm2np.trace_names(m.config, images=False)]
    assert not any(vision_schema.is_vision_name(n) for n, _, _ in out)


def test_step_with_images_then_decoding_equals_one_forward():
    case = VL_CASES[0]
    r, m = reference(case), model(case)
    ids = r["ids"]
    whole = m.forward(ids, images=batch(case))
    first, state = m.step(ids[:-3], images=batch(case))
    rest, _ = m.step(ids[-3:], state)
    assert rel_error(np.concatenate([first, rest]), whole) < 1e-6


def test_a_long_prompt_in_chunks_places_each_chunks_images(monkeypatch):
    case = VL_CASES[1]
    r, m = reference(case), model(case)
    whole = m.forward(r["ids"], images=batch(case))
    monkeypatch.setattr(m, "prefill_chunk", 17)  # chunk borders fall inside the placeholder runs
    assert rel_error(m.forward(r["ids"], images=batch(case)), whole) < 1e-6


def test_both_tower_spellings_load_the_same_weights(tmp_path):
    """Released checkpoints name the tower model.vision_tower.vision_model.*, transformers 5.25 saves
    model.vision_tower.*; the text tower is model.language_model.* in both."""
    case = "vl-layernorm"
    tensors = load_file(str(GOLDEN / case / "model.safetensors"))
    assert any(k.startswith(TOWER) for k in tensors)
    shutil.copytree(GOLDEN / case, tmp_path / "saved")
    save_file({k.replace(TOWER, "model.vision_tower."): v for k, v in tensors.items()},
              str(tmp_path / "saved" / "model.safetensors"))
    r = reference(case)
    a = model(case).forward(r["ids"], images=batch(case))
    assert np.array_equal(lfm2np.load(tmp_path / "saved").forward(r["ids"], images=batch(case)), a)
    both = {**tensors, TOWER.replace("vision_model.", "") + "post_layernorm.bias": tensors[TOWER + "post_layernorm.bias"]}
    save_file(both, str(tmp_path / "saved" / "model.safetensors"))
    with pytest.raises(lfm2np.Lfm2npError, match="same tensor of the layout .* under two names"):
        lfm2np.load(tmp_path / "saved")


def test_image_errors_name_what_is_wrong():
    case = VL_CASES[0]
    r, m = reference(case), model(case)
    px = batch(case)
    with pytest.raises(lfm2np.Lfm2npError, match=r"ids hold 131 image placeholders .* give 111 image tokens"):
        m.forward(np.concatenate([r["ids"], [100] * 20]), images=px)
    with pytest.raises(lfm2np.Lfm2npError, match="x.png: cannot open the image file"):  # the checkpoint's processor
        m.forward(r["ids"], images=["x.png"])
    bare = lfm2np.Model(m.config, m.params)  # built from weights: no processor settings
    with pytest.raises(lfm2np.Lfm2npError, match="need the model's image processor"):
        bare.forward(r["ids"], images=["x.png"])
    bad = SimpleNamespace(**{**vars(px), "pixel_values": px.pixel_values[..., :-1]})
    with pytest.raises(lfm2np.Lfm2npError, match="pixel_values has shape"):
        m.forward(r["ids"], images=bad)
    mask = px.pixel_attention_mask.copy()
    mask[0, -1] = True
    with pytest.raises(lfm2np.Lfm2npError, match="image 0: pixel_attention_mask does not mark exactly"):
        m.forward(r["ids"], images=SimpleNamespace(**{**vars(px), "pixel_attention_mask": mask}))
    shapes = px.spatial_shapes.copy()
    shapes[1] = [1, 1]
    with pytest.raises(lfm2np.Lfm2npError, match="give no image token"):
        m.forward(r["ids"], images=SimpleNamespace(**{**vars(px), "spatial_shapes": shapes}))
    with pytest.raises(lfm2np.Lfm2npError, match="images go with one sequence"):
        m.forward(np.stack([r["ids"], r["ids"]]), images=px)
    text = lfm2np.load(GOLDEN / "dense-legacy")
    with pytest.raises(lfm2np.Lfm2npError, match="no vision tower"):
        text.forward([1, 2], images=px)


def test_placement_puts_each_feature_at_its_placeholder():
    embeds = np.arange(12, dtype=np.float32).reshape(6, 2)
    features = -np.arange(1, 5, dtype=np.float32).reshape(2, 2)
    out = vision.place(embeds, np.array([1, 9, 3, 9, 4, 5]), features, 9)
    assert out.tolist() == [[0, 1], [-1, -2], [4, 5], [-3, -4], [8, 9], [10, 11]]
    assert embeds[1].tolist() == [2, 3]  # the input is not modified


# ----------------------------------------------------------------------------------------- config
def vl_dict(**changes) -> dict:
    d = json.loads((GOLDEN / "vl-layernorm" / "config.json").read_text())
    for key, value in changes.items():
        where = d
        *path, last = key.split(".")
        for p in path:
            where = where[p]
        where[last] = value
    return d


def test_the_vl_config_round_trips_and_derives_its_flags():
    c = lfm2np.load_config(vl_dict())
    assert c.is_vision_language and c.model_type == "lfm2" and c.vision.grid == 4
    assert c.vision.projector_in == 32 * 4 and c.vision.patch_dim == 48
    assert lfm2np.load_config(c.to_dict()) == c
    assert not lfm2np.load_config(vl_dict(projector_use_layernorm=False)).vision.projector_use_layernorm
    legacy = vl_dict(model_type="lfm2-vl")
    legacy["image_token_index"] = legacy.pop("image_token_id")
    assert lfm2np.load_config(legacy) == c


@pytest.mark.parametrize("change, message", [
    ({"vision_config.vision_use_head": True}, "vision_config.vision_use_head'.* is True"),
    ({"vision_config.hidden_act": "gelu"}, "vision_config.hidden_act'.* is 'gelu'"),
    ({"projector_hidden_act": "silu"}, "projector_hidden_act"),
    ({"vision_config.num_patches": 15}, "square number"),
    ({"vision_config.num_attention_heads": 5}, "does not divide hidden_size 32"),
    ({"vision_config.hidden_size": 0}, "vision_config.hidden_size'.* expected a positive integer"),
    ({"image_token_id": 500}, "image_token_id'.* outside the vocabulary"),
    ({"vision_config.model_type": "clip_vision_model"}, "siglip2_vision_model"),
    ({"text_config.model_type": "lfm3"}, "text_config.model_type"),
    ({"vision_config": None}, "vision_config'.* expected an object"),
    ({"vision_config.layer_norm_eps": -1}, "layer_norm_eps"),
    ({"projector_bias": "yes"}, "projector_bias"),
])
def test_a_bad_vl_config_is_refused_by_name(change, message):
    with pytest.raises(lfm2np.Lfm2npError, match=message):
        lfm2np.load_config(vl_dict(**change))


# ----------------------------------------------------------------------------------------- diagnose
IMAGE_MISTAKES = [("vl-padding-mask-dropped", 0), ("vl-position-resize", 0), ("vl-position-resize", 1),
                  ("vl-projector-layernorm", 0), ("vl-image-prepended", 0)]


@pytest.mark.parametrize("mistake_id, variant", IMAGE_MISTAKES)
@pytest.mark.parametrize("kind", ["logits", "trace"])
def test_diagnose_names_each_image_mistake(mistake_id, variant, kind):
    """A backend made with one of the image path's mistakes: diagnose, given the images, ranks it first, from the
    backend's logits or its trace."""
    from lfm2np.oracle import mistakes as M
    from lfm2np.oracle.diagnose import diagnose
    from lfm2np.oracle.dumps import logits_dump, trace_dump
    from lfm2np.oracle.trace import Trace

    case = VL_CASES[variant % 2]
    r, m = reference(case), model(case)
    label, switches = M.mistake(mistake_id).variants(m.config, None)[variant]
    seen: dict[str, np.ndarray] = {}
    logits = M.run(m, r["ids"], M.Port(**switches), observe=lambda n, v: seen.__setitem__(n, v.copy()),
                   images=batch(case))
    assert rel_error(logits, r["logits"]) > 1e-3  # the mistake shows in the logits
    dump = logits_dump(r["ids"], logits) if kind == "logits" else \
        trace_dump(Trace(seen, {"ids": [int(i) for i in r["ids"]]}), r["ids"])
    d = diagnose(m, dump, images=batch(case), combine=False)
    assert not d.agrees and d.best.id == mistake_id and d.best.reproduces, [(h.id, h.error) for h in d.hypotheses[:3]]


def test_params_count_the_vision_side_apart_and_in_the_total():
    from lfm2np import calc

    for case in VL_CASES:
        c = lfm2np.load_config(GOLDEN / case)
        stored = load_file(str(GOLDEN / case / "model.safetensors"))
        p = calc.param_counts(c)
        assert p["total"] == sum(v.size for v in stored.values())
        tower = sum(v.size for k, v in stored.items() if k.startswith("model.vision_tower."))
        assert p["vision_tower"] == tower and p["projector"] == sum(
            v.size for k, v in stored.items() if k.startswith(PROJECTOR))
        assert p["text"] == p["total"] - p["vision_tower"] - p["projector"]


def test_erf_against_the_c_library_in_float64_and_float32():
    import math

    from lfm2np.ops_vision import erf

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-7, 7, 20000), rng.uniform(-2.5, 2.5, 20000), [0.0, -0.0, 1.0, -1.0, 2.0, 6.0,
                        -6.0, 30.0, -np.inf, np.inf, 1e-300, -1e-300, 5e-324]])
    want = np.array([math.erf(t) for t in x])
    got = erf(x)
    ulp = np.abs(got - want) / np.spacing(np.maximum(np.abs(want), np.finfo(np.float64).tiny))
    assert ulp.max() <= 8  # the C library's erf is itself within about 1 ulp
    assert np.isnan(erf(np.array([np.nan]))).all()
    assert np.signbit(erf(np.array([-0.0])))[0]
    x32 = x.astype(np.float32)
    want32 = np.array([math.erf(float(t)) for t in x32]).astype(np.float32)
    np.testing.assert_array_equal(erf(x32), want32)
    assert erf(x32).dtype == np.float32


def test_erf_shared_among_threads_is_the_same_bits(monkeypatch):
    from lfm2np import passes
    from lfm2np.ops_vision import erf

    x = np.random.default_rng(1).uniform(-8, 8, (301, 7)).astype(np.float32)
    monkeypatch.setattr(passes, "THREADS", 1)
    one = erf(x)
    monkeypatch.setattr(passes, "THREADS", 3)
    monkeypatch.setattr(passes, "PARALLEL_MIN", 1)
    shared = erf(x)
    assert shared.shape == x.shape
    np.testing.assert_array_equal(shared.view(np.uint32), one.view(np.uint32))


@pytest.mark.parametrize("case", VL_CASES[:2])
def test_the_tower_gives_the_same_bits_on_any_number_of_threads(case, monkeypatch):
    # its products are cut into row ranges on one BLAS thread each: the bits of one thread, whatever the count
    from lfm2np import passes

    m, b = model(case), batch(case)
    monkeypatch.setattr(passes, "THREADS", 1)
    one = m.forward(reference(case)["ids"], images=b)
    monkeypatch.setattr(passes, "THREADS", 3)
    monkeypatch.setattr(passes, "PARALLEL_MIN", 1)
    monkeypatch.setattr(passes, "_pool", None)
    shared = m.forward(reference(case)["ids"], images=b)
    np.testing.assert_array_equal(shared.view(np.uint32), one.view(np.uint32))
