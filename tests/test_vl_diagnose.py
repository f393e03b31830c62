"""Diagnosing the image processor from a processor dump: transformers' own output agrees, its 1x1-grid
placeholders are named, planted mistakes are found, the normalisation is told from pixel values alone; the
``diagnose`` command on processor dumps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lfm2np.cli import main
from lfm2np.errors import Lfm2npError
from lfm2np.io.tokenizer import Tokenizer
from lfm2np.oracle.image_mistakes import IMAGE_CATALOGUE, diagnose_processor, format_processor_diagnosis
from lfm2np.oracle.processor_dump import processor_dump
from lfm2np.processor import ImageTokens, ProcessorConfig, expand_prompt
from tools_loader import load_tool

GOLDEN = Path(__file__).resolve().parent / "golden" / "vl-processor"
GEN = load_tool("make_vl_processor_fixtures")
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CASES = np.load(GOLDEN / "cases.npz")
TOKENIZER = Tokenizer.from_dir(GOLDEN / "checkpoint")
TOKENS = ImageTokens.from_tokenizer(TOKENIZER)
SMALL = ProcessorConfig.from_dict(GEN.SMALL, "small")
#: small-setting images: one that upscales, one at a rounding tie (28 = 3.5 x 8), one that tiles, one that tiles
#: into a 1x1 grid with min_tiles 1 (44x46: past the threshold once rounded, under half of a 2x2 grid's area)
IMAGES = [GEN.pattern(3, 5, 1), GEN.pattern(28, 20, 2), GEN.pattern(50, 70, 3), GEN.pattern(44, 46, 4)]


def transformers_dump(name: str) -> tuple[dict, list[np.ndarray]]:
    """What transformers 5.25 returned for a fixture case of the small settings, as a backend would dump it."""
    case = MANIFEST["cases"][name]
    mask = CASES[f"{name}.mask"]
    values = np.zeros(mask.shape + (48,), np.float32)
    values[mask] = (CASES[f"{name}.levels"].astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
    arrays = dict(pixel_values=values, pixel_attention_mask=mask, spatial_shapes=CASES[f"{name}.spatial_shapes"],
                  input_ids=CASES[f"{name}.ids"][None])
    return arrays, [GEN.pattern(*image) for image in case["images"]]


def our_dump(config: ProcessorConfig, images=IMAGES) -> dict:
    ids, batch = expand_prompt("Compare " + " and ".join(["<image>"] * len(images)), images, TOKENIZER, config)
    return dict(pixel_values=batch.pixel_values, pixel_attention_mask=batch.pixel_attention_mask,
                spatial_shapes=batch.spatial_shapes, ids=np.array(ids), image_tokens=np.array(batch.tokens_per_image))


def test_transformers_output_agrees_with_the_reference():
    for name in ("small-tiled", "small-min1", "small-boundary"):
        arrays, images = transformers_dump(name)
        config = ProcessorConfig.from_dict(dict(GEN.RELEASED, **MANIFEST["cases"][name]["settings"]))
        result = diagnose_processor(processor_dump(arrays, name), config, images, TOKENS)
        assert result.agrees, format_processor_diagnosis(result)
        assert {o.name for o in result.reference.observations} == {"units", "spatial shapes", "real patches", "ids",
                                                                   "pixels"}


def test_transformers_placeholders_for_a_1x1_grid_are_named():
    """transformers 5.25's 238 placeholders for 792x660 (min_tiles 1): not lfm2np's 256, and the catalogue entry
    single-tile-placeholders reproduces them."""
    ids = CASES["min1-792x660.ids"]
    dump = processor_dump({"ids": ids, "image_sizes": np.array([[660, 792]]),
                           "spatial_shapes": CASES["min1-792x660.spatial_shapes"]}, "transformers")
    result = diagnose_processor(dump, ProcessorConfig(min_tiles=1), tokens=TOKENS)
    assert not result.agrees
    assert result.hypotheses[0].mistakes == ("single-tile-placeholders",) and result.hypotheses[0].agrees


VARIANTS = [(m.id, label, changes) for m in IMAGE_CATALOGUE if m.applies(SMALL) for label, changes in m.variants(SMALL)]


@pytest.mark.parametrize("mistake, label, changes", VARIANTS, ids=[f"{m}:{l}" for m, l, _ in VARIANTS])
def test_a_planted_mistake_is_named_first(mistake, label, changes):
    planted = SMALL.replace(**changes)
    dump = processor_dump(our_dump(planted), "planted")
    result = diagnose_processor(dump, SMALL, IMAGES, TOKENS, combine=False)
    assert not result.agrees  # the images are chosen so that every variant changes something
    best = [h for h in result.hypotheses if h.agrees]
    assert best and best[0] is result.hypotheses[0]
    assert any(h.mistakes == (mistake,) and h.label.endswith(f"({label})") for h in best), \
        format_processor_diagnosis(result)


def test_two_mistakes_at_once_are_found_as_a_pair():
    planted = SMALL.replace(rounding="llama.cpp", antialias=False)
    result = diagnose_processor(processor_dump(our_dump(planted), "pair"), SMALL, IMAGES, TOKENS)
    assert result.hypotheses[0].agrees
    assert set(result.hypotheses[0].mistakes) == {"smart-resize-rounding", "resize-no-antialias"}


def test_the_normalisation_from_pixel_values_alone():
    for changes, label in (({"image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225)}, "ImageNet"),
                           ({"do_normalize": False}, "rescaled to [0, 1], not normalised")):
        arrays = our_dump(SMALL.replace(**changes))
        dump = processor_dump({"pixel_values": arrays["pixel_values"],
                               "pixel_attention_mask": arrays["pixel_attention_mask"]}, "pixels")
        result = diagnose_processor(dump, SMALL)
        assert not result.agrees and result.hypotheses[0].agrees
        assert result.hypotheses[0].label == f"normalisation ({label})"
    assert diagnose_processor(processor_dump({"pixel_values": our_dump(SMALL)["pixel_values"]}, "p"), SMALL).agrees


def test_bad_processor_dumps():
    for arrays, message in (({"pixel_values": np.zeros((2, 3), np.float32)}, "pixel_values must be"),
                            ({"spatial_shapes": np.array([[1, 0]])}, "below 1"),
                            ({"spatial_shapes": np.ones((2, 2), int), "pixel_attention_mask": np.ones((3, 4), bool)},
                             "unit counts disagree"),
                            ({"image_tokens": np.array([1.5])}, "integers"),
                            ({"ids": np.array([1, 2])}, "no processor arrays")):
        with pytest.raises(Lfm2npError, match=message):
            processor_dump(arrays, "bad")
    with pytest.raises(Lfm2npError, match="nothing to judge"):
        diagnose_processor(processor_dump({"image_tokens": np.array([64])}, "x"), SMALL)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The fixture checkpoint with the small settings, and the images as files."""
    d = tmp_path_factory.mktemp("vl")
    shutil.copytree(GOLDEN / "checkpoint", d / "ckpt")
    settings = json.loads((d / "ckpt" / "processor_config.json").read_text())
    settings["image_processor"] = dict(GEN.SMALL, image_processor_type="Lfm2VlImageProcessor")
    (d / "ckpt" / "processor_config.json").write_text(json.dumps(settings))
    for k, image in enumerate(IMAGES):
        Image.fromarray(image).save(d / f"{k}.png")
    return d


def test_the_diagnose_command_on_processor_dumps(checkpoint, capsys):
    images = [arg for k in range(len(IMAGES)) for arg in ("--image", str(checkpoint / f"{k}.png"))]
    np.savez(checkpoint / "good.npz", **our_dump(SMALL))
    np.savez(checkpoint / "bad.npz", **our_dump(SMALL.replace(rounding="llama.cpp")))
    assert main(["diagnose", str(checkpoint / "ckpt"), "--dump", str(checkpoint / "good.npz"), *images]) == 0
    assert "agrees with the reference" in capsys.readouterr().out
    assert main(["diagnose", str(checkpoint / "ckpt"), "--dump", str(checkpoint / "bad.npz"), *images, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert not out["agrees"] and out["hypotheses"][0]["mistakes"] == ["smart-resize-rounding"]
    np.savez(checkpoint / "flat.npz", pixel_values=np.zeros((4, 5), np.float32))
    (checkpoint / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    for dump, argv, message in (("bad", ["--html", str(checkpoint / "x.html")], "--html"),
                                ("bad", ["--only", "router-softmax"], "--only"),
                                ("bad", ["--image", str(checkpoint / "missing.png")], "missing.png"),
                                ("flat", [], "pixel_values must be"), ("junk", [], "junk.npz")):
        assert main(["diagnose", str(checkpoint / "ckpt"), "--dump", str(checkpoint / f"{dump}.npz"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["diagnose", "embedded", "--dump", str(checkpoint / "bad.npz")]) == 2  # no processor settings
    assert "not a vision-language checkpoint" in capsys.readouterr().err
