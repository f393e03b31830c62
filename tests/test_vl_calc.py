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


def test_memory_of_llamacpps_pair(capsys):
    """``--mmproj``: the vision tower and projector at the mmproj's stored types (gguf-py's byte counts of both
    files), and ``--image`` with llama.cpp's processor (its float32 half-away rounding, 64..256 tokens): the
    tokens and KV bytes re-derived here from the files' metadata and test_vl_geometry's re-derivation."""
    gguf = pytest.importorskip("gguf")
    from test_vl_geometry import rederive_llama
    pair = GOLDEN / "vl-gguf"
    text = pair / "text-f32.gguf"

    def data_bytes(path: Path) -> int:
        return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)

    fields = gguf.GGUFReader(str(text)).fields
    kv_heads = fields["lfm2.attention.head_count_kv"].contents()
    head_dim = fields["lfm2.embedding_length"].contents() // fields["lfm2.attention.head_count"].contents()
    per_token = sum(2 * g * head_dim * 2 for g in kv_heads)  # K and V of each attention layer, f16
    sizes = [(600, 400), (130, 100)]  # 600 x 400: 608 x 416 in llama.cpp (608 x 384 in transformers)
    h, w = rederive_llama(np.array([s[1] for s in sizes]), np.array([s[0] for s in sizes]))
    tokens = [int(a // 32) * int(b // 32) for a, b in zip(h, w)]
    assert tokens[0] == 247
    for name in ("mmproj-f32.gguf", "mmproj-f16.gguf"):
        mmproj = pair / name
        assert main(["memory", str(text), "--mmproj", str(mmproj), "--image", "600x400", "--image", "130x100",
                     "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["mmproj_weights_bytes"] == data_bytes(mmproj) > 100_000
        assert out["weights_bytes"] == data_bytes(text) + data_bytes(mmproj)
        assert out["total_bytes"] == sum(out[k] for k in ("weights_bytes", "kv_cache_bytes", "conv_state_bytes",
                                                           "compute_bytes"))
        images = out["images"]
        assert [i["tokens"] for i in images["images"]] == tokens and "llama.cpp" in images["settings"]
        assert [i["kv_bytes"] for i in images["images"]] == [(t + 2) * per_token for t in tokens]  # + start, end
    assert main(["memory", str(text), "--mmproj", str(pair / "mmproj-f16.gguf")]) == 0
    assert f"of which vision    {data_bytes(pair / 'mmproj-f16.gguf'):,}" in capsys.readouterr().out
    for argv, message in (([str(pair), "--mmproj", str(pair / "mmproj-f16.gguf")], "not a .gguf file"),
                          ([str(text), "--mmproj", str(text)], "'clip'")):
        assert main(["memory", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
