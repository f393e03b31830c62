"""Hostile input to the image side: files, arrays, processor configs; each one clear Lfm2npError naming the culprit."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lfm2np.errors import Lfm2npError
from lfm2np.io.images import MAX_PIXELS_PER_BYTE, read_image
from lfm2np.processor import ProcessorConfig, process_images

GOLDEN = Path(__file__).resolve().parent / "golden" / "vl-processor"


def png(width: int, height: int, idat: bytes, depth: int = 8, color: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def good_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("what, data, message", [
    ("empty", b"", "empty file"),
    ("text", b"hello, I am not an image\n" * 4, "not a readable image"),
    ("truncated", good_png()[:300], "truncated|not a readable"),
    ("corrupt", good_png()[:100] + bytes(range(256)) * 3 + good_png()[-12:], "not a readable|truncated"),
    ("bomb", png(60000, 60000, zlib.compress(b"\x00" * 60001 * 4)), "decompression bomb"),
    ("zero-width", png(0, 10, zlib.compress(b"")), "not a readable|no pixels"),
    ("bad-jpeg", b"\xff\xd8\xff\xe0" + b"\x00" * 200, "not a readable|truncated"),
])
def test_bad_files_name_the_file(tmp_path, what, data, message):
    path = tmp_path / f"{what}.png"
    path.write_bytes(data)
    with pytest.raises(Lfm2npError, match=message) as e:
        read_image(path)
    assert str(path) in str(e.value)
    with pytest.raises(Lfm2npError, match=str(path)):
        process_images([path])


def test_the_bomb_is_refused_before_decoding(tmp_path):
    """Declared 12000 x 12000 (144 M pixels, under Pillow's own limit) in a few hundred bytes: refused from the
    header alone (beyond Pillow's limit, its DecompressionBombError is turned into the same refusal)."""
    data = png(12000, 12000, zlib.compress(b"\x00" * 1000))
    assert 12000 * 12000 > MAX_PIXELS_PER_BYTE * len(data)
    (tmp_path / "b.png").write_bytes(data)
    with pytest.raises(Lfm2npError, match="refused before decoding"):
        read_image(tmp_path / "b.png")


def test_a_legitimately_compressible_image_is_read(tmp_path):
    Image.new("RGB", (3000, 2000), (255, 255, 255)).save(tmp_path / "white.png")
    assert (tmp_path / "white.png").stat().st_size * MAX_PIXELS_PER_BYTE > 3000 * 2000
    assert read_image(tmp_path / "white.png").shape == (2000, 3000, 3)


def test_not_a_file(tmp_path):
    with pytest.raises(Lfm2npError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(Lfm2npError, match=str(tmp_path)):
        read_image(tmp_path)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.png")
        with pytest.raises(Lfm2npError, match="fifo.png"):
            read_image(tmp_path / "fifo.png")


@pytest.mark.parametrize("array, message", [
    (np.zeros((10, 10, 3), np.float32), "float32"),
    (np.zeros((10, 10), np.uint8), "shape"),
    (np.zeros((10, 10, 4), np.uint8), "shape"),
    (np.zeros((0, 10, 3), np.uint8), "shape"),
    ([[1, 2, 3]], "expected a file path or a uint8"),
])
def test_bad_arrays_name_the_image(array, message):
    with pytest.raises(Lfm2npError, match=rf"images\[1\].*{message}|{message}.*"):
        process_images([np.zeros((8, 8, 3), np.uint8), array])


def test_bad_image_lists():
    for images in ([], "a.png", np.zeros((8, 8, 3), np.uint8), None):
        with pytest.raises(Lfm2npError):
            process_images(images)


@pytest.mark.parametrize("values, message", [
    ({"min_tiles": 3, "max_tiles": 2}, "min_tiles 3 > max_tiles 2"),
    ({"min_tiles": 0}, "min_tiles must be a whole number"),
    ({"tile_size": 500}, "tile_size 500 is not a multiple"),
    ({"image_std": [0.5, 0, 0.5]}, "zero"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"resample": 1}, "resample 1 is not supported"),
    ({"do_pad": False}, "do_pad"),
    ({"min_tile": 2}, "unknown key 'min_tile'"),
    ({"use_thumbnail": "yes"}, "use_thumbnail must be true or false"),
    ({"max_pixels_tolerance": float("nan")}, "max_pixels_tolerance"),
    ({"rescale_factor": 0}, "rescale_factor"),
    ({"min_image_tokens": 300}, "min_image_tokens 300 > max_image_tokens 256"),
])
def test_bad_settings_name_the_file_and_key(tmp_path, values, message):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(values))
    with pytest.raises(Lfm2npError, match=message) as e:
        ProcessorConfig.from_dir(tmp_path)
    assert "preprocessor_config.json" in str(e.value)


def test_where_the_settings_are_read(tmp_path):
    with pytest.raises(Lfm2npError, match="no image processor settings"):
        ProcessorConfig.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_tiles": 1, "resample": 3, "size": {}}))
    assert ProcessorConfig.from_dir(tmp_path).min_tiles == 1
    assert ProcessorConfig.from_dir(tmp_path).resample == "bicubic"
    (tmp_path / "processor_config.json").write_text(json.dumps({"use_image_special_tokens": False}))
    flat = ProcessorConfig.from_dir(tmp_path)  # no nested object: the flat file, the processor's flag
    assert flat.min_tiles == 1 and not flat.use_image_special_tokens
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"max_tiles": 4}}))
    nested = ProcessorConfig.from_dir(tmp_path)  # the nested object wins whole: never merged with the flat file
    assert nested.max_tiles == 4 and nested.min_tiles == 2
    for bad, message in (({"image_processor": [1]}, "expected a JSON object"), ({"extra": 1}, "unknown key 'extra'"),
                         ({"use_image_special_tokens": 1}, "use_image_special_tokens must be true or false")):
        (tmp_path / "processor_config.json").write_text(json.dumps(bad))
        with pytest.raises(Lfm2npError, match=message):
            ProcessorConfig.from_dir(tmp_path)
    (tmp_path / "processor_config.json").write_text("{not json")
    with pytest.raises(Lfm2npError, match="processor_config.json"):
        ProcessorConfig.from_dir(tmp_path)


def test_bad_readings():
    with pytest.raises(Lfm2npError, match="rounding"):
        ProcessorConfig(rounding="llama")
    with pytest.raises(Lfm2npError, match="no setting"):
        ProcessorConfig().replace(min_tile=1)
