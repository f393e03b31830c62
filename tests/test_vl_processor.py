"""The LFM2-VL image processor against transformers 5.25 (tests/golden/vl-processor/, written by
tools/make_vl_processor_fixtures.py): pixel values bit for bit, masks, spatial shapes, tile layouts, token counts,
expanded ids; files decoded as load_image decodes them; the resize in torch's four uint8 modes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lfm2np.errors import Lfm2npError
from lfm2np.io.images import read_image
from lfm2np.io.tokenizer import Tokenizer
from lfm2np.processor import (ImageTokens, ProcessorConfig, encode_chat_with_images, expand_ids, expand_prompt,
                              image_layout, process_images)
from lfm2np.processor.resample import resize, resize_float
from tools_loader import load_tool

GOLDEN = Path(__file__).resolve().parent / "golden" / "vl-processor"
GEN = load_tool("make_vl_processor_fixtures")
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CASES = np.load(GOLDEN / "cases.npz")
CHECKPOINT = GOLDEN / "checkpoint"


def config_of(settings: dict, **readings) -> ProcessorConfig:
    return ProcessorConfig.from_dict(dict(GEN.RELEASED, **settings), "fixture", **readings)


def pixels_of(levels: np.ndarray) -> np.ndarray:
    """float32 pixel values from the levels the generator stored (it checked they are exactly these)."""
    return (levels.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(CHECKPOINT)


def test_the_checkpoint_config_is_the_released_one():
    config = ProcessorConfig.from_dir(CHECKPOINT)
    assert config == ProcessorConfig()
    assert config.max_num_patches == 1024 and config.use_image_special_tokens


@pytest.mark.parametrize("name", sorted(MANIFEST["cases"]))
def test_pixels_masks_shapes_and_layout_equal_transformers(name):
    case = MANIFEST["cases"][name]
    config = config_of(case["settings"])
    batch = process_images([GEN.pattern(*image) for image in case["images"]], config)
    assert list(batch.pixel_values.shape) == case["shape"] and batch.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(batch.spatial_shapes, CASES[f"{name}.spatial_shapes"])
    assert batch.spatial_shapes.dtype == np.int64
    np.testing.assert_array_equal(batch.pixel_attention_mask, CASES[f"{name}.mask"])
    assert [l.rows for l in batch.layouts] == case["rows"] and [l.cols for l in batch.layouts] == case["cols"]
    assert [list(l.resized) for l in batch.layouts] == case["sizes"]
    values = batch.pixel_values
    if f"{name}.sample_index" in CASES:
        units, patches = CASES[f"{name}.sample_index"]
        error = np.abs(values[units, patches] - pixels_of(CASES[f"{name}.sample_levels"])).max()
    elif f"{name}.levels" in CASES:
        error = np.abs(values[batch.pixel_attention_mask] - pixels_of(CASES[f"{name}.levels"])).max()
        assert not values[~batch.pixel_attention_mask].any()
    else:
        error = np.abs(values - CASES[f"{name}.pixel_values"]).max()
    assert error == 0.0, f"max abs error {error}"
    assert hashlib.sha256(np.ascontiguousarray(values, "<f4").tobytes()).hexdigest() == case["pixel_sha256"]


@pytest.mark.parametrize("name", sorted(n for n, c in MANIFEST["cases"].items() if c["prompt"] is not None))
def test_expanded_ids_equal_transformers(name, tokenizer):
    case = MANIFEST["cases"][name]
    special = name not in GEN.NO_SPECIAL
    reading = "transformers-5.25" if name == "min1-792x660" else "features"
    config = config_of(case["settings"], single_tile_placeholders=reading).replace(use_image_special_tokens=special)
    ids, batch = expand_prompt(case["prompt"], [GEN.pattern(*image) for image in case["images"]], tokenizer, config)
    assert ids == CASES[f"{name}.ids"].tolist()
    assert sum(i == 396 for i in ids) == sum(batch.tokens_per_image)


def test_the_792x660_single_tile_writes_one_placeholder_per_feature(tokenizer):
    """transformers 5.25 with min_tiles 1 cuts 792x660 into one 512x512 tile (256 features) but writes the 238
    placeholders of the smart-resized size; lfm2np writes 256 (the features the tile gives, as vLLM does)."""
    case = MANIFEST["cases"]["min1-792x660"]
    images = [GEN.pattern(*image) for image in case["images"]]
    theirs = CASES["min1-792x660.ids"].tolist()
    ids, batch = expand_prompt(case["prompt"], images, tokenizer, config_of(case["settings"]))
    assert theirs.count(396) == 238 and ids.count(396) == 256 == batch.tokens_per_image[0]
    assert batch.spatial_shapes.tolist() == [[32, 32]]  # 32 x 32 patches -> 16 x 16 = 256 features
    assert [i for i in ids if i != 396] == [i for i in theirs if i != 396]  # only the count differs


def test_a_chat_with_image_parts_equals_transformers(tokenizer):
    chat = MANIFEST["chat"]
    images = [GEN.pattern(*image) for image in chat["images"]]
    config = ProcessorConfig.from_dir(CHECKPOINT)
    ids, batch = encode_chat_with_images(tokenizer, chat["messages"], images, config)
    assert ids == CASES["chat.ids"].tolist()
    given = iter(images)  # the same images as parts of the messages
    embedded = [dict(m, content=[dict(p, image=next(given)) if p["type"] == "image" else p for p in m["content"]])
                if isinstance(m["content"], list) else m for m in chat["messages"]]
    assert encode_chat_with_images(tokenizer, embedded, config=config)[0] == ids
    with pytest.raises(Lfm2npError, match="both"):
        encode_chat_with_images(tokenizer, embedded, images, config)


@pytest.mark.parametrize("label", ["min2", "min1", "nothumb"])
def test_layouts_of_many_sizes_equal_transformers(label):
    settings = {"min2": {}, "min1": {"min_tiles": 1}, "nothumb": {"use_thumbnail": False}}[label]
    ours, like_theirs = config_of(settings), config_of(settings, single_tile_placeholders="transformers-5.25")
    for h, w, split, rows, cols, rh, rw, tokens in np.load(GOLDEN / "layouts.npz")[label].tolist():
        units = [(512, 512)] * (rows * cols) if split else [(rh, rw)]
        units += [(rh, rw)] if split and rows * cols > 1 and ours.use_thumbnail else []
        if max(uh // 16 * (uw // 16) for uh, uw in units) > 1024:  # transformers fails or mis-masks: refused
            with pytest.raises(Lfm2npError, match="too thin"):
                image_layout(h, w, ours)
            continue
        layout = image_layout(h, w, ours)
        assert (layout.tiled, layout.rows, layout.cols, layout.resized) == (bool(split), rows, cols, (rh, rw)), (h, w)
        assert list(layout.units) == units
        assert image_layout(h, w, like_theirs).tokens == tokens, (h, w)
        single_tile = split and rows * cols == 1
        assert (layout.tokens == tokens) != single_tile, (h, w)


@pytest.mark.parametrize("mode", ["bilinear.aa", "bilinear.plain", "bicubic.aa", "bicubic.plain"])
def test_resize_equals_torch_uint8(mode):
    data = np.load(GOLDEN / "resize.npz")
    filter, aa = mode.split(".")
    for n in range(3):
        h, w, seed, out_h, out_w = data[f"{n}.source"].tolist()
        got = resize(GEN.pattern(h, w, seed), out_h, out_w, filter, aa == "aa")
        np.testing.assert_array_equal(got, data[f"{n}.{mode}"])


def test_the_float_resize_is_torchs_float_path():
    """resize_float (the reading ``resize_arithmetic="float"``) against torch's float32 path, rounded: equal but
    for the rare value at a rounding tie (float64 here), while the fixed-point path differs by a level here and
    there: the two arithmetics torch has, on x86 and elsewhere."""
    data = np.load(GOLDEN / "resize.npz")
    agree, differ_fixed, total = 0, 0, 0
    for n in range(3):
        h, w, seed, out_h, out_w = data[f"{n}.source"].tolist()
        got = resize_float(GEN.pattern(h, w, seed), out_h, out_w)
        theirs = data[f"{n}.bilinear.aa.float"]
        assert np.abs(got.astype(int) - theirs).max() <= 1
        agree += (got == theirs).sum()
        differ_fixed += (theirs != data[f"{n}.bilinear.aa"]).sum()
        total += got.size
    assert agree >= 0.999 * total and differ_fixed > 0


@pytest.mark.parametrize("name", sorted(np.load(GOLDEN / "decode.npz").files))
def test_files_decode_as_load_image(name):
    np.testing.assert_array_equal(read_image(GOLDEN / "files" / name), np.load(GOLDEN / "decode.npz")[name])


def test_files_go_through_the_processor_as_arrays_do():
    path = GOLDEN / "files" / "exif-rotated.png"
    a, b = process_images([path]), process_images([read_image(path)])
    assert a.layouts[0].height == 26 and a.layouts[0].width == 18  # the EXIF rotation applied
    np.testing.assert_array_equal(a.pixel_values, b.pixel_values)


@pytest.mark.parametrize("name", sorted(MANIFEST["refused"]))
def test_sizes_transformers_cannot_process_are_refused_by_name(name):
    case = MANIFEST["refused"][name]
    assert case["transformers"]  # what transformers did: an exception, or a mask shorter than the patches
    with pytest.raises(Lfm2npError, match=r"images\[0\]: a .* image resizes to .* too thin"):
        process_images([np.zeros((case["height"], case["width"], 3), np.uint8)])


def test_placeholders_must_match_the_images(tokenizer):
    image = np.zeros((40, 40, 3), np.uint8)
    for text, n in (("no placeholder", 1), ("<image><image>", 1), ("<image>", 2)):
        with pytest.raises(Lfm2npError, match="placeholder"):
            expand_prompt(text, [image] * n, tokenizer)
    tokens = ImageTokens.from_tokenizer(tokenizer)
    with pytest.raises(Lfm2npError, match="placeholder"):
        expand_ids([1, 396, 396], [image_layout(40, 40, ProcessorConfig())], tokens)
