"""``memory --image WxH``: image tokens (as transformers' processor counts them) and their KV cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lfm2np import load_config
from lfm2np.calc import kv_bytes_per_token
from lfm2np.calc.images import image_costs, parse_image_size
from lfm2np.cli import main
from lfm2np.errors import Lfm2npError
from lfm2np.io.tokenizer import Tokenizer
from lfm2np.processor import ProcessorConfig

GOLDEN = Path(__file__).resolve().parent / "golden"
VL = GOLDEN / "vl-processor"
MANIFEST = json.loads((VL / "manifest.json").read_text())
CASES = np.load(VL / "cases.npz")


def test_image_tokens_are_transformers_counts():
    config = load_config("LFM2-1.2B")
    table = np.load(VL / "layouts.npz")["min2"]
    ok = [(h, w, tokens) for h, w, split, rows, cols, _, _, tokens in table.tolist()
          if not (split and rows * cols == 1) and max(h, w) <= 1200 and min(h, w) >= 16][:40]
    costs = image_costs(config, [(w, h) for h, w, _ in ok])
    assert [i["tokens"] for i in costs["images"]] == [t for _, _, t in ok]
    assert costs["image_tokens"] == sum(t for _, _, t in ok)
    per = kv_bytes_per_token(config)
    assert all(i["kv_bytes"] == i["sequence_tokens"] * per for i in costs["images"]) and per == 2 * 6 * 8 * 64 * 2


def test_positions_are_the_expanded_prompt():
    """An image's positions (tokens and markers) are what transformers' expansion adds to a prompt."""
    tokenizer = Tokenizer.from_dir(VL / "checkpoint")
    for name in ("upscale", "tiled-1024x768", "no-thumbnail", "min1-1024x768"):
        case = MANIFEST["cases"].get(name)
        if case is None or case["prompt"] is None:
            continue
        (h, w, _), = case["images"]
        rest = len(tokenizer.encode(case["prompt"].replace("<image>", "")))
        processor = ProcessorConfig.from_dict(dict(json.loads((VL / "checkpoint" / "processor_config.json")
                                                              .read_text())["image_processor"], **case["settings"]))
        costs = image_costs(load_config("LFM2-1.2B"), [(w, h)], processor)
        assert costs["sequence_tokens"] == len(CASES[f"{name}.ids"]) - rest, name


def test_parse_image_size():
    assert parse_image_size("792x660") == (792, 660) and parse_image_size(" 1X2 ") == (1, 2)
    for bad in ("792", "0x5", "5x0", "axb", "1e3x4", "-4x4", "4x4x4", "99999999x1"):
        with pytest.raises(Lfm2npError, match="WxH"):
            parse_image_size(bad)


def test_memory_with_images(tmp_path, capsys):
    model = tmp_path / "vl"
    shutil.copytree(GOLDEN / "dense-legacy", model)
    (model / "preprocessor_config.json").write_text(json.dumps({"min_tiles": 1}))
    assert main(["memory", str(model), "--quant", "float32", "--image", "792x660", "--image", "1024x768",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["images"]
    assert [i["tokens"] for i in out["images"]] == [256, 1770]  # min_tiles 1: 792x660 is one 512x512 tile
    assert out["images"][0]["tiles"] == [1, 1] and not out["images"][0]["thumbnail"]
    assert out["sequence_tokens"] == 256 + 2 + 1770 + 2 + 6 + 1 and "preprocessor_config.json" in out["settings"]
    assert main(["memory", str(model), "--quant", "float32", "--image", "600x400", "--context", "100"]) == 0
    text = capsys.readouterr().out
    assert "608x384, one unit" in text and "more than the context of 100" in text
    for argv, message in ((["--image", "600"], "WxH"), (["--image", "20000x20"], "too thin")):
        assert main(["memory", str(model), "--quant", "float32", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
