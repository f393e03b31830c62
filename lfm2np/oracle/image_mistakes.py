"""The image processor's porting mistakes, and their diagnosis from a processor dump alone.

Each mistake is one or more :class:`~lfm2np.processor.ProcessorConfig` settings changed (a reading such as
``rounding="llama.cpp"``, or a checkpoint key such as ``min_tiles``): the processor itself is never copied.
:func:`diagnose_processor` runs the checkpoint's settings and every applicable variant on the images (their
files or arrays, when given; else their sizes from the dump) and compares what each predicts with what the dump
holds: the image tokens per image, the units and their spatial shapes, the real patches per unit, the expanded
ids, the pixel values. Without the images, pixel values still tell the normalisation: a backend's values map
back onto the 256 levels of a uint8 image under the mean and std it used, and under no other.

(The tower's mistakes, padding mask dropped, position embeddings resized bicubically or without antialiasing,
the projector's LayerNorm, image embeddings prepended, are judged from logits and traces by
:mod:`lfm2np.oracle.mistakes`.)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import Lfm2npError
from ..io.images import check_image_array, read_image
from ..processor import ImageTokens, ProcessorConfig, expand_ids, image_layout, process_images
from .processor_dump import ProcessorDump

Changes = dict[str, Any]
#: a backend's pixel values agree when within this of the reference's (one level is 1/127.5 = 0.0078; a port
#: computing (x/255 - 0.5)/0.5 instead of the fused (x - 127.5)/127.5 differs by an ulp)
PIXEL_ATOL = 1e-5
NORMALISATIONS = {"ImageNet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                  "OpenAI CLIP": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}


@dataclass(frozen=True)
class ImageMistake:
    """A named image-processor mistake: what it is, who shipped it, how it shows in a dump, the settings it
    concerns (``applies``; ``requires`` in words) and its variants (``(label, settings changed)``)."""

    id: str
    description: str
    shipped_by: str
    in_a_dump: str
    requires: str
    applies: Callable[[ProcessorConfig], bool]
    variants: Callable[[ProcessorConfig], list[tuple[str, Changes]]]


def _one(label: str, **changes: Any) -> Callable[[ProcessorConfig], list[tuple[str, Changes]]]:
    return lambda c: [(label, changes)]


def _min_tiles(c: ProcessorConfig) -> list[tuple[str, Changes]]:
    return [(f"min_tiles {m}", {"min_tiles": m}) for m in (1, 2) if m != c.min_tiles and m <= c.max_tiles]


def _normalisations(c: ProcessorConfig) -> list[tuple[str, Changes]]:
    out = [(name, {"image_mean": m, "image_std": s, "do_normalize": True, "do_rescale": True})
           for name, (m, s) in NORMALISATIONS.items() if (m, s) != (c.image_mean, c.image_std)]
    out.append(("rescaled to [0, 1], not normalised", {"do_normalize": False, "do_rescale": True}))
    out.append(("raw 0..255", {"do_normalize": False, "do_rescale": False}))
    return [(label, changes) for label, changes in out if c.replace(**changes) != c]


IMAGE_CATALOGUE: tuple[ImageMistake, ...] = (
    ImageMistake("smart-resize-rounding", "the smart resize rounds halves away from zero in float32 (llama.cpp's "
                 "std::round) instead of Python's round, half to even, in float64",
                 "llama.cpp's calc_size_preserved_ratio (tools/mtmd/mtmd-image.cpp): 600x400 becomes 608x416, 247 "
                 "tokens, where transformers makes 608x384, 228; about 1% of sizes 32..1024 differ",
                 "image tokens and spatial shapes differ for sizes at a rounding tie (a side of 16 mod 32 px)",
                 "any settings", lambda c: c.rounding == "transformers", _one("llama.cpp", rounding="llama.cpp")),
    ImageMistake("min-tiles", "another min_tiles than the checkpoint's (the tile grids considered start at 1 or 2 "
                 "tiles)", "llama.cpp fixes min_tiles at 2 (mtmd-image.h) where LFM2.5-VL-3B's processor config "
                 "says 1", "the rows x cols of tiled images differ for near-square images (a 1x1 grid or not)",
                 "tiling on", lambda c: c.tiling, _min_tiles),
    ImageMistake("tiling-off", "large images never cut into tiles: one smart-resized unit of at most "
                 "max_image_tokens", "mlx-vlm's LFM2-VL processor until Blaizzy/mlx-vlm#1885 (ScreenSpot-v2 33% -> "
                 "80% once tiled); mlxcel until lablup/mlxcel#1352",
                 "one unit and at most 256 tokens where the reference has tiles and a thumbnail",
                 "tiling on", lambda c: c.tiling, _one("no tiles", do_image_splitting=False)),
    ImageMistake("thumbnail-missing", "tiled images without their thumbnail (the smart-resized whole image after the "
                 "tiles, marked <|img_thumbnail|>)", "no public report; use_thumbnail is false in some converted "
                 "processor configs", "one unit fewer per tiled image; the ids end the tiles without "
                 "<|img_thumbnail|>", "tiling with a thumbnail", lambda c: c.tiling and c.use_thumbnail,
                 _one("no thumbnail", use_thumbnail=False)),
    ImageMistake("resize-no-antialias", "the image resized without antialiasing (only the nearest 2 source pixels "
                 "per output pixel, even when shrinking)", "no public LFM2 report; F.interpolate's and "
                 "tf.image.resize's default", "layout and ids agree; pixel values differ where the image shrinks "
                 "(most where it has fine detail)", "antialiasing on", lambda c: c.antialias,
                 _one("no antialiasing", antialias=False)),
    ImageMistake("resize-bicubic", "the image resized bicubically instead of bilinearly",
                 "no public LFM2 report; the SigLIP / Qwen-VL processors' default (resample 3)",
                 "layout and ids agree; pixel values differ nearly everywhere, by a level or a few",
                 "bilinear resampling", lambda c: c.resample == "bilinear", _one("bicubic", resample="bicubic")),
    ImageMistake("resize-float", "the resize computed in floating point and rounded once (torch off x86, a GPU, "
                 "a port's float resize) instead of torch's fixed point on x86; not a porting mistake but the "
                 "reference's own platform dependence", "transformers itself on other CPUs (torchvision's "
                 "non-AVX path)", "pixel values within one level, at a few % of values",
                 "torch's fixed-point resize", lambda c: c.resize_arithmetic == "fixed-point",
                 _one("float", resize_arithmetic="float")),
    ImageMistake("normalisation", "pixel values normalised with another mean and std (ImageNet's, CLIP's), or only "
                 "rescaled to [0, 1], or left at 0..255", "no public LFM2 report; the default of many processors",
                 "pixel values differ by a per-channel affine map; they map onto the 256 levels only under the "
                 "wrong mean and std", "any settings", lambda c: True, _normalisations),
    ImageMistake("single-tile-placeholders", "a 1x1 tile grid (min_tiles 1) written with the placeholders of the "
                 "smart-resized size instead of one per feature of the 512x512 tile",
                 "transformers 5.25 itself (Lfm2VlProcessor._build_image_tokens): 792x660 gets 238 placeholders for "
                 "256 features, which its model then refuses", "the image tokens and ids of near-square images "
                 "just past the tiling threshold are fewer than the tile's features", "tiling with min_tiles 1",
                 lambda c: c.tiling and c.min_tiles == 1 and c.single_tile_placeholders == "features",
                 _one("transformers 5.25", single_tile_placeholders="transformers-5.25")),
)
IMAGE_BY_ID = {m.id: m for m in IMAGE_CATALOGUE}


@dataclass(frozen=True)
class Observation:
    """One thing the dump says, and whether a hypothesis predicts it (``distance``: how far, for ranking)."""

    name: str
    agrees: bool
    detail: str
    distance: float = 0.0


@dataclass(frozen=True)
class ImageHypothesis:
    """A variant of the settings (``mistakes`` applied, ``label``) and what it predicts against the dump."""

    mistakes: tuple[str, ...]
    label: str
    observations: tuple[Observation, ...]

    @property
    def agrees(self) -> bool:
        return bool(self.observations) and all(o.agrees for o in self.observations)

    @property
    def rank_key(self) -> tuple:
        return (sum(not o.agrees for o in self.observations), sum(o.distance for o in self.observations),
                len(self.mistakes))

    def to_json(self) -> dict[str, Any]:
        return {"mistakes": list(self.mistakes), "label": self.label, "reproduces": self.agrees,
                "observations": [{"name": o.name, "agrees": o.agrees, "detail": o.detail} for o in self.observations]}


@dataclass(frozen=True)
class ProcessorDiagnosis:
    """The reference's verdict on a processor dump and the hypotheses ranked (best first)."""

    source: str
    reference: ImageHypothesis
    hypotheses: tuple[ImageHypothesis, ...]

    @property
    def agrees(self) -> bool:
        return self.reference.agrees

    def to_json(self) -> dict[str, Any]:
        return {"dump": self.source, "agrees": self.agrees, "reference": self.reference.to_json(),
                "hypotheses": [h.to_json() for h in self.hypotheses]}


def _collapse(ids: np.ndarray, tokens: ImageTokens, special: bool) -> list[int]:
    """The dump's ids with each image's expansion folded back to one placeholder."""
    out, i, ids = [], 0, ids.tolist()
    while i < len(ids):
        if special and ids[i] == tokens.start:
            i = ids.index(tokens.end, i) + 1 if tokens.end in ids[i:] else len(ids)
            out.append(tokens.image)
        elif ids[i] == tokens.image:
            while i < len(ids) and ids[i] == tokens.image:
                i += 1
            out.append(tokens.image)
        else:
            out.append(ids[i])
            i += 1
    return out


def _lists(name: str, got: list, want: list) -> Observation:
    """A list the dump holds against the expected one; the detail names the first difference."""
    if got == want:
        return Observation(name, True, f"equal ({len(want)} entries)")
    if len(got) != len(want):
        return Observation(name, False, f"{len(got)} entries, expected {len(want)}")
    k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    return Observation(name, False, f"entry {k}: {got[k]}, expected {want[k]}")


def _pixels(dump: ProcessorDump, expected: np.ndarray, exp_counts: list[int]) -> Observation:
    counts = dump.real_patches()
    if counts is None or len(counts) != len(exp_counts) or list(counts) != exp_counts:
        return Observation("pixels", False, "not comparable: the units differ", 1.0)
    mask = dump.pixel_attention_mask
    diffs = []
    for n, count in enumerate(exp_counts):
        rows = dump.pixel_values[n][mask[n]] if mask is not None else dump.pixel_values[n, :count]
        if rows.shape != expected[n, :count].shape:
            return Observation("pixels", False, f"unit {n}: patches of {rows.shape[-1]} values, expected "
                               f"{expected.shape[-1]}", 1.0)
        diffs.append(np.abs(rows - expected[n, :count]).ravel())
    d = np.concatenate(diffs)
    off = float(np.mean(d > PIXEL_ATOL))
    return Observation("pixels", bool(d.max() <= PIXEL_ATOL), f"max |diff| {d.max():.3g} ({d.max() * 127.5:.3g} "
                       f"levels), {100 * off:.2f}% of values off", off)


def _on_grid(dump: ProcessorDump, c: ProcessorConfig) -> Observation:
    """Without the images: do the pixel values map back onto uint8 levels under this normalisation?"""
    v = dump.pixel_values
    rows = v[dump.pixel_attention_mask] if dump.pixel_attention_mask is not None else v.reshape(-1, v.shape[-1])
    if dump.pixel_attention_mask is None:  # no mask: all-zero rows are taken for padding
        rows = rows[rows.any(axis=1)]
    channel = np.arange(rows.shape[-1]) % 3
    x = rows.astype(np.float64)
    if c.do_normalize:
        scale = 1.0 / c.rescale_factor if c.do_rescale else 1.0
        x = x * (np.array(c.image_std)[channel] * scale) + np.array(c.image_mean)[channel] * scale
    elif c.do_rescale:
        x = x / c.rescale_factor
    off = np.abs(x - np.round(x))
    inside = bool(x.min() > -0.01 and x.max() < 255.01)
    frac = float(np.mean(off > 1e-3))
    return Observation("pixel levels", inside and frac == 0.0, f"{100 * frac:.2f}% of values fall between the "
                       f"256 levels{'' if inside else ', some outside 0..255'} under this normalisation", frac)


def observe(dump: ProcessorDump, c: ProcessorConfig, sizes: "list[tuple[int, int]] | None",
            images: "list[np.ndarray] | None", tokens: ImageTokens | None) -> tuple[Observation, ...]:
    """What the settings ``c`` predict, against each thing the dump holds."""
    obs: list[Observation] = []
    layouts = None
    if sizes is not None:
        try:
            layouts = [image_layout(h, w, c, f"image {k}") for k, (h, w) in enumerate(sizes)]
        except Lfm2npError as e:
            return (Observation("layout", False, f"refuses an image ({e})", 1.0),)
    if layouts is not None:
        p = c.encoder_patch_size
        shapes = [(h // p, w // p) for layout in layouts for h, w in layout.units]
        if dump.image_tokens is not None:
            obs.append(_lists("image tokens", dump.image_tokens.tolist(), [layout.tokens for layout in layouts]))
        if dump.units is not None:
            obs.append(Observation("units", dump.units == len(shapes), f"dump {dump.units}, expected {len(shapes)}"))
        if dump.spatial_shapes is not None:
            obs.append(_lists("spatial shapes", [tuple(s) for s in dump.spatial_shapes.tolist()], shapes))
        if dump.pixel_attention_mask is not None:
            obs.append(_lists("real patches", dump.real_patches().tolist(), [a * b for a, b in shapes]))
        if dump.ids is not None and tokens is not None:
            special = c.use_image_special_tokens and tokens.start is not None
            try:
                want_ids = expand_ids(_collapse(dump.ids, tokens, special), layouts, tokens, special)
                same = want_ids == dump.ids.tolist()
                detail = "equal" if same else (f"{dump.ids.tolist().count(tokens.image)} placeholders, expected "
                                               f"{want_ids.count(tokens.image)}")
            except Lfm2npError as e:
                same, detail = False, str(e)
            obs.append(Observation("ids", same, detail))
    if dump.pixel_values is not None:
        if images is not None and layouts is not None:
            batch = process_images(images, c)
            obs.append(_pixels(dump, batch.pixel_values, batch.pixel_attention_mask.sum(axis=1).tolist()))
        else:
            obs.append(_on_grid(dump, c))
    return tuple(obs)


def diagnose_processor(dump: ProcessorDump, config: ProcessorConfig, images: Sequence[Any] | None = None,
                       tokens: ImageTokens | None = None, only: Sequence[str] | None = None,
                       combine: bool = True) -> ProcessorDiagnosis:
    """Judge a processor dump against the checkpoint's settings ``config`` and rank the catalogue's variants.
    ``images``: the image files or arrays the backend processed (else their sizes come from the dump's
    ``image_sizes``); ``tokens``: the tokenizer's image token ids (to judge ``ids``); ``only``: these mistakes;
    ``combine``: when no single variant reproduces the dump, try pairs."""
    arrays = None if images is None else [read_image(i) if isinstance(i, (str, bytes)) or hasattr(i, "__fspath__")
                                          else check_image_array(i, f"images[{k}]") for k, i in enumerate(images)]
    if arrays is not None:
        sizes = [a.shape[:2] for a in arrays]
    elif dump.image_sizes is not None:
        sizes = [tuple(s) for s in dump.image_sizes.tolist()]
    else:
        sizes = None
    if sizes is None and dump.pixel_values is None:
        raise Lfm2npError(f"{dump.source}: nothing to judge without the images: give them (or image_sizes in the "
                          "dump), or pixel values")
    for name in only or ():
        if name not in IMAGE_BY_ID:
            raise Lfm2npError(f"unknown image mistake {name!r}; the catalogue has {', '.join(IMAGE_BY_ID)}")
    chosen = [m for m in IMAGE_CATALOGUE if (not only or m.id in only) and m.applies(config)]
    singles = [((m.id,), f"{m.id} ({label})", changes) for m in chosen for label, changes in m.variants(config)]
    judged = {}

    def judge(ids: tuple[str, ...], label: str, changes: Changes) -> ImageHypothesis:
        c = config.replace(**changes)
        if c not in judged:
            judged[c] = observe(dump, c, sizes, arrays, tokens)
        return ImageHypothesis(ids, label, judged[c])

    reference = judge((), "(no mistake)", {})
    ranked = [judge(*s) for s in singles]
    if combine and not reference.agrees and not any(h.agrees for h in ranked):
        for a, b in itertools.combinations(singles, 2):
            if a[0] != b[0] and not set(a[2]) & set(b[2]):
                ranked.append(judge(a[0] + b[0], f"{a[1]} + {b[1]}", {**a[2], **b[2]}))
    ranked.sort(key=lambda h: h.rank_key)
    return ProcessorDiagnosis(dump.source, reference, tuple(ranked))


def format_processor_diagnosis(d: ProcessorDiagnosis, top: int = 6) -> str:
    """The diagnosis as text: the verdict, what disagrees, the best hypotheses."""
    lines = [f"processor dump {d.source}: " + ("agrees with the reference" if d.agrees else "differs from the reference")]
    lines += [f"  {'ok ' if o.agrees else 'BAD'} {o.name}: {o.detail}" for o in d.reference.observations]
    if not d.agrees:
        lines.append("hypotheses (best first):")
        for h in d.hypotheses[:top]:
            bad = [o.name for o in h.observations if not o.agrees]
            lines.append(f"  {'reproduces' if h.agrees else 'differs in ' + ', '.join(bad):40s} {h.label}")
        if not any(h.agrees for h in d.hypotheses):
            lines.append("no mistake of the catalogue reproduces the dump")
    return "\n".join(lines)
