#!/usr/bin/env python
"""Regenerate the LFM2-VL image processor fixtures (tests/golden/vl-processor/) from transformers 5.25.

Needs the reference environment (``bash tools/setup_reference.sh``; torchvision is imported through
tools/torchvision_cpu.py). The tests never import torch: they read what this writes.

What it records, from transformers' ``Lfm2VlImageProcessor`` / ``Lfm2VlProcessor`` (images decoded by
``transformers.image_utils.load_image``, i.e. Pillow, EXIF orientation, ``convert("RGB")``):

- ``checkpoint/``: a processor checkpoint directory (``processor_config.json`` with the released settings,
  a small byte-level tokenizer with LFM2-VL's image tokens at their released ids 396-499, a chat template that
  renders image parts as ``<image>``), loaded back with ``AutoProcessor.from_pretrained``;
- ``cases.npz`` + ``manifest.json``: per case (images and a processor setting) the units' spatial shapes and
  masks, the rows/cols and smart-resize size, the expanded ids of a prompt, and the pixel values: their SHA-256
  (float32) always; a few rows of the released settings' cases; every real patch of the small settings' cases.
  Values are stored as uint8 levels k where the generator has checked they are exactly float32
  ``(k - 127.5) / 127.5`` (padding patches: checked zero), as float32 otherwise;
- ``layouts.npz``: the split layout (``_get_split_layout``) of a few hundred sizes, min_tiles 2 and 1;
- ``resize.npz``: torch's uint8 ``interpolate`` in the four modes lfm2np emulates (bilinear / bicubic, with and
  without antialiasing) on small patterns, and its float32 path (antialiased bilinear, rounded);
- ``files/`` + ``decode.npz``: small image files of every kind ``load_image`` must read (grayscale, palette with
  transparency, RGBA, 1-bit, LA, 16-bit grayscale and RGB PNG, CMYK TIFF and JPEG, EXIF orientation) with the
  arrays it returns.

The images themselves are :func:`pattern` (integer arithmetic only: the tests rebuild them identically).

Usage:  .venv-ref/bin/python tools/make_vl_processor_fixtures.py [--out tests/golden/vl-processor]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 1
RELEASED = dict(downsample_factor=2, encoder_patch_size=16, min_image_tokens=64, max_image_tokens=256,
                do_image_splitting=True, min_tiles=2, max_tiles=10, use_thumbnail=True, tile_size=512,
                max_pixels_tolerance=2.0, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=2,
                do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_pad=True)
#: small patches and tiles, so that whole pixel arrays stay a few KB: f = 8, at most 16 tokens, tiles of 32
SMALL = dict(RELEASED, encoder_patch_size=4, min_image_tokens=4, max_image_tokens=16, tile_size=32, max_tiles=6)
SAMPLED_ROWS = 6

#: (name, processor settings, [(height, width, seed), ...], prompt or None)
CASES = [
    ("upscale", {}, [(30, 40, 1)], "<image>What is this?"),
    ("boundary-600x400", {}, [(400, 600, 2)], "Look: <image>"),
    ("tiled-1024x768", {}, [(768, 1024, 3)], "<image>Describe."),
    ("tiled-tall-800x1200", {}, [(1200, 800, 4)], None),
    ("min1-792x660", {"min_tiles": 1}, [(660, 792, 5)], "<image>"),
    ("min1-1024x768", {"min_tiles": 1}, [(768, 1024, 6)], None),
    ("no-thumbnail", {"use_thumbnail": False}, [(768, 1024, 7)], "<image>x"),
    ("no-splitting", {"do_image_splitting": False}, [(768, 1024, 8)], "<image>"),
    ("wide-3000x20", {}, [(20, 3000, 9)], None),
    ("tall-20x3000", {}, [(3000, 20, 10)], None),
    ("two-images", {}, [(100, 70, 11), (900, 1300, 12)], "A <image> and B <image>, compare."),
    ("small-upscale", SMALL, [(3, 5, 13)], "<image>"),
    ("small-boundary", SMALL, [(28, 20, 14), (44, 28, 15)], "<image><image>"),
    ("small-tiled", SMALL, [(50, 70, 16), (90, 40, 17)], "<image>hi<image>"),
    ("small-min1", dict(SMALL, min_tiles=1), [(50, 46, 18), (70, 90, 19)], "<image> <image>"),
    ("small-bicubic", dict(SMALL, resample=3), [(50, 70, 20), (9, 11, 21)], None),
    ("small-no-special", SMALL, [(50, 70, 22)], "<image>plain"),
    ("small-rescale-only", dict(SMALL, do_normalize=False), [(20, 30, 23)], None),
    ("small-imagenet", dict(SMALL, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
     [(20, 30, 24)], None),
]
NO_SPECIAL = {"small-no-special"}
#: sizes transformers 5.25 cannot process consistently: (name, height, width, what it does)
REFUSED = [("wide-20000x20", 20, 20000), ("thin-1x2000", 2000, 1)]

TEMPLATE = ("{{- bos_token -}}{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
            "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
            "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
            "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{{- '<|im_end|>\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
            "{%- endif -%}")


def pattern(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic uint8 (height, width, 3) test image from integer arithmetic only: a gradient, a
    checkerboard whose period changes across the image (it aliases when resized without antialiasing) and hashed
    noise (every pixel matters)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    h = (x * 73856093) ^ (y * 19349663) ^ (seed * 83492791)
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    h = (h ^ (h >> 16)) & 0xFF
    period = 1 + (x * 5) // max(width, 1)
    checker = (((x // period) + (y // period)) % 2) * 200 + 20
    gradient = (x * 255) // max(width - 1, 1)
    mix = (y * 255) // max(height - 1, 1)
    r = (gradient + h // 4) % 256
    g = np.where(mix > 127, checker, (checker + h) // 2)
    b = (h + seed * 31) % 256
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def special_tokens() -> dict[str, int]:
    """LFM2-VL's special tokens at their released ids (the tokenizer of the fixtures)."""
    ids = {"<|pad|>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "<|im_start|>": 6, "<|im_end|>": 7,
           "<image>": 396, "<|img_thumbnail|>": 497, "<|image_start|>": 498, "<|image_end|>": 499,
           "<|image_split|>": 500}
    for r in range(10):
        for c in range(10):
            ids[f"<|img_row_{r + 1}_col_{c + 1}|>"] = 397 + 10 * r + c
    return ids


def write_checkpoint(out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    out.mkdir(parents=True, exist_ok=True)
    specials = special_tokens()
    vocab = {f"<|reserved_{i}|>": i for i in range(501) if i not in specials.values()}
    vocab.update(specials)
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):  # a set: sorted, for stable ids
        vocab[ch] = 501 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>"}, indent=1) + "\n")
    (out / "chat_template.jinja").write_text(TEMPLATE)
    settings = dict(RELEASED, image_processor_type="Lfm2VlImageProcessor")
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "Lfm2VlProcessor", "use_image_special_tokens": True, "image_processor": settings},
        indent=1) + "\n")


def png16_rgb(a: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one), by hand."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_files(out: Path) -> dict[str, np.ndarray]:
    from PIL import Image
    from transformers.image_utils import load_image
    out.mkdir(parents=True, exist_ok=True)
    base = pattern(18, 26, 40)
    files = {}
    Image.fromarray(base).convert("L").save(out / "gray.png"); files["gray.png"] = None
    pal = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    pal.save(out / "palette-transparent.png", transparency=3)
    rgba = np.concatenate([base, (base[..., :1] // 2 + 7)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(out / "rgba.png")
    Image.fromarray(base).convert("1").save(out / "bilevel.png")
    Image.fromarray(base).convert("LA").save(out / "gray-alpha.png")
    Image.fromarray((base[..., 0].astype(np.uint16) * 257 // 3)).save(out / "gray16.png")
    (out / "rgb16.png").write_bytes(png16_rgb(base.astype(np.uint16) * 251))
    Image.fromarray(base).convert("CMYK").save(out / "cmyk.tiff")
    Image.fromarray(base).convert("CMYK").save(out / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(base).save(out / "exif-rotated.png", exif=exif)
    Image.fromarray(base).save(out / "exif-rotated.jpg", exif=exif, quality=95)
    Image.fromarray(base).save(out / "plain.jpg", quality=90)
    return {p.name: np.asarray(load_image(str(p))) for p in sorted(out.iterdir())}


def levels(values: np.ndarray, where: str) -> np.ndarray:
    """The uint8 levels k of pixel values that are exactly float32((k - 127.5) / 127.5) (checked)."""
    k = np.rint(values.astype(np.float64) * 127.5 + 127.5)
    assert k.min() >= 0 and k.max() <= 255, where
    k = k.astype(np.uint8)
    assert np.array_equal((k.astype(np.float32) - np.float32(127.5)) / np.float32(127.5), values), where
    return k


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests/golden/vl-processor"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torchvision_cpu  # noqa: F401  (before transformers' image processors)
    import PIL
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoProcessor
    from transformers.models.lfm2_vl.image_processing_lfm2_vl import Lfm2VlImageProcessor

    out = Path(args.out)
    write_checkpoint(out / "checkpoint")
    processor = AutoProcessor.from_pretrained(str(out / "checkpoint"))
    decoded = write_files(out / "files")
    np.savez_compressed(out / "decode.npz", **decoded)

    arrays: dict[str, np.ndarray] = {}
    manifest = {"generator_version": GENERATOR_VERSION, "torch": torch.__version__,
                "transformers": transformers.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cases": {}, "refused": {}}
    for name, settings, images, prompt in CASES:
        kwargs = dict(RELEASED, **settings)
        ip = Lfm2VlImageProcessor(**kwargs)
        pils = [Image.fromarray(pattern(h, w, s)) for h, w, s in images]
        got = ip(images=pils, return_tensors="np", return_row_col_info=True)
        pv, mask, shapes = got["pixel_values"], got["pixel_attention_mask"].astype(bool), got["spatial_shapes"]
        entry = {"settings": settings, "images": images, "prompt": prompt, "shape": list(pv.shape),
                 "rows": [int(r) for r in got["image_rows"]], "cols": [int(c) for c in got["image_cols"]],
                 "sizes": [[int(v) for v in s] for s in got["image_sizes"]],
                 "pixel_sha256": hashlib.sha256(np.ascontiguousarray(pv, "<f4").tobytes()).hexdigest()}
        arrays[f"{name}.mask"], arrays[f"{name}.spatial_shapes"] = mask, shapes
        assert not pv[~mask].any(), name  # padding patches are zeros
        if settings.get("encoder_patch_size") == 4 and not (settings.get("do_normalize", True) and
                                                            settings.get("image_mean", [0.5] * 3) == [0.5] * 3):
            arrays[f"{name}.pixel_values"] = pv
        elif settings.get("encoder_patch_size") == 4:
            arrays[f"{name}.levels"] = levels(pv[mask], name)  # every real patch, exactly
        else:
            rng = np.random.default_rng(len(name))
            units = rng.integers(0, pv.shape[0], SAMPLED_ROWS)
            rows = np.stack([units, [rng.integers(0, int(mask[u].sum())) for u in units]])
            arrays[f"{name}.sample_index"] = rows
            arrays[f"{name}.sample_levels"] = levels(pv[rows[0], rows[1]], name)
        if prompt is not None:
            processor.image_processor = ip
            special = name not in NO_SPECIAL
            enc = processor(images=pils, text=prompt, use_image_special_tokens=special)
            arrays[f"{name}.ids"] = np.array(enc["input_ids"][0], np.int32)
        manifest["cases"][name] = entry
    processor.image_processor = Lfm2VlImageProcessor(**RELEASED)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which is larger?"},
                                         {"type": "image"}]},
            {"role": "assistant", "content": "The second."}, {"role": "user", "content": "Why?"}]
    chat_images = [(200, 300, 30), (1000, 1000, 31)]
    rendered = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    enc = processor(images=[Image.fromarray(pattern(*s)) for s in chat_images], text=rendered)
    arrays["chat.ids"] = np.array(enc["input_ids"][0], np.int32)
    manifest["chat"] = {"messages": chat, "images": chat_images}
    for name, h, w in REFUSED:
        try:
            got = Lfm2VlImageProcessor(**RELEASED)(images=[Image.fromarray(pattern(h, w, 50))], return_tensors="np")
            what = f"pixel_values {list(got['pixel_values'].shape)} with a mask of {got['pixel_attention_mask'].shape[1]}"
        except Exception as e:  # what transformers does with it, recorded
            what = f"{type(e).__name__}: {str(e)[:120]}"
        manifest["refused"][name] = {"height": h, "width": w, "transformers": what}
    np.savez_compressed(out / "cases.npz", **arrays)

    layouts = {}
    rng = np.random.default_rng(0)
    sizes = [(h, w) for h in (1, 2, 31, 32, 48, 400, 512, 660, 700, 724, 725, 1000) for w in (1, 16, 600, 792, 1600)]
    sizes += [tuple(int(v) for v in rng.integers(1, 2400, 2)) for _ in range(300)]
    for label, settings in (("min2", {}), ("min1", {"min_tiles": 1}), ("nothumb", {"use_thumbnail": False})):
        ip, rows = Lfm2VlImageProcessor(**dict(RELEASED, **settings)), []
        for h, w in sizes:
            kw = {k: getattr(ip, k) for k in ("downsample_factor", "min_tiles", "max_tiles", "min_image_tokens",
                                              "max_image_tokens", "encoder_patch_size", "tile_size",
                                              "max_pixels_tolerance")}
            split, r, c, nh, nw = ip._get_split_layout(h, w, **kw)
            processor.image_processor = ip
            tokens = processor._get_num_multimodal_tokens([(h, w)])["num_image_tokens"][0]
            rows.append((h, w, int(split), r, c, nh, nw, tokens))
        layouts[label] = np.array(rows, np.int32)
    np.savez_compressed(out / "layouts.npz", **layouts)

    resized = {}
    for n, (h, w, H, W) in enumerate([(23, 37, 40, 16), (70, 90, 24, 24), (31, 17, 9, 50)]):
        src = pattern(h, w, 60 + n)
        resized[f"{n}.source"] = np.array([h, w, 60 + n, H, W], np.int32)
        t = torch.from_numpy(src).permute(2, 0, 1)[None].contiguous()
        for mode in ("bilinear", "bicubic"):
            for aa in (True, False):
                r = torch.nn.functional.interpolate(t, size=[H, W], mode=mode, antialias=aa, align_corners=False)
                resized[f"{n}.{mode}.{'aa' if aa else 'plain'}"] = r[0].permute(1, 2, 0).numpy()
        r = torch.nn.functional.interpolate(t.float(), size=[H, W], mode="bilinear", antialias=True,
                                            align_corners=False)  # the float path: torch off x86, then rounded
        resized[f"{n}.bilinear.aa.float"] = r.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    np.savez_compressed(out / "resize.npz", **resized)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
