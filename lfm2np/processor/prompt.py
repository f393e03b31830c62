"""Prompts with images: each ``<image>`` placeholder replaced by the image's markers and image tokens.

One image expands to (the markers only when ``use_image_special_tokens``, the default)::

    <|image_start|> <image> x tokens <|image_end|>                               one unit (or a 1x1 tile grid)
    <|image_start|> <|img_row_1_col_1|> <image> x t ... <|img_row_R_col_C|> <image> x t
                    [<|img_thumbnail|> <image> x thumbnail tokens] <|image_end|>  a grid of tiles

with t the tokens of one tile, row by row, as transformers' Lfm2VlProcessor writes it; the model puts one image
embedding at each ``<image>`` id, in order. The expansion works on ids: the text is tokenized as it is (the
placeholder is a special token, so the text around it tokenizes the same either way), then each placeholder id is
replaced. A prompt with fewer placeholders than images, or more, is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import Lfm2npError
from ..io.tokenizer import Tokenizer
from .batch import ImageBatch, process_images
from .config import ProcessorConfig
from .layout import ImageLayout

IMAGE, IMAGE_START, IMAGE_END, THUMBNAIL = "<image>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"
MARKER = re.compile(r"<\|img_row_(\d+)_col_(\d+)\|>")


def marker(row: int, col: int) -> str:
    """The tile marker of tile (row, col), counted from 1: ``<|img_row_{row}_col_{col}|>``."""
    return f"<|img_row_{row}_col_{col}|>"


@dataclass(frozen=True)
class ImageTokens:
    """The ids of the image placeholder and markers in a tokenizer (the released LFM2-VL tokenizer: ``<image>``
    396, the tile markers 397-496, ``<|img_thumbnail|>`` 497, ``<|image_start|>`` 498, ``<|image_end|>`` 499)."""

    image: int
    start: int | None = None
    end: int | None = None
    thumbnail: int | None = None
    tiles: Mapping[tuple[int, int], int] = field(default_factory=dict)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "ImageTokens":
        """Read the ids from ``tokenizer`` (the markers may be missing: only a prompt that needs one fails)."""
        image = tokenizer.token_to_id(IMAGE)
        if image is None:
            raise Lfm2npError(f"{tokenizer.source}: the tokenizer has no {IMAGE} token: not a vision-language "
                              "tokenizer")
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        tiles = {(int(m[1]), int(m[2])): i for t, i in vocab.items() if (m := MARKER.fullmatch(t))}
        return cls(image, tokenizer.token_to_id(IMAGE_START), tokenizer.token_to_id(IMAGE_END),
                   tokenizer.token_to_id(THUMBNAIL), tiles)

    def need(self, name: str, value: int | None) -> int:
        if value is None:
            raise Lfm2npError(f"the tokenizer has no {name} token, which this prompt needs")
        return value


def image_ids(layout: ImageLayout, tokens: ImageTokens, special: bool = True) -> list[int]:
    """The ids one image expands to (see the module's doc); ``special``: with the start/end, tile and thumbnail
    markers (``use_image_special_tokens``)."""
    out: list[int] = [tokens.need(IMAGE_START, tokens.start)] if special else []
    if layout.multi_tile:
        for k in range(layout.rows * layout.cols):
            row, col = divmod(k, layout.cols)
            if special:
                out.append(tokens.need(marker(row + 1, col + 1), tokens.tiles.get((row + 1, col + 1))))
            out += [tokens.image] * layout.unit_tokens[k]
        if layout.thumbnail:
            out += [tokens.need(THUMBNAIL, tokens.thumbnail)] if special else []
            out += [tokens.image] * layout.unit_tokens[-1]
    else:
        out += [tokens.image] * layout.tokens
    return out + ([tokens.need(IMAGE_END, tokens.end)] if special else [])


def expand_ids(ids: Sequence[int], layouts: "Sequence[ImageLayout] | ImageBatch", tokens: ImageTokens,
               special: bool = True) -> list[int]:
    """``ids`` with the k-th ``<image>`` id replaced by the expansion of the k-th image (``layouts``, or an
    :class:`ImageBatch`'s). The number of placeholders must equal the number of images."""
    layouts = layouts.layouts if isinstance(layouts, ImageBatch) else list(layouts)
    ids = [int(i) for i in ids]
    found = sum(i == tokens.image for i in ids)
    if found != len(layouts):
        raise Lfm2npError(f"the prompt has {found} {IMAGE} placeholder{'s' * (found != 1)} for {len(layouts)} "
                          f"image{'s' * (len(layouts) != 1)}: each image needs exactly one, in order")
    out, k = [], 0
    for i in ids:
        if i == tokens.image:
            out += image_ids(layouts[k], tokens, special)
            k += 1
        else:
            out.append(i)
    return out


def _batch(images: "Sequence[Any] | ImageBatch", config: ProcessorConfig | None) -> ImageBatch:
    return images if isinstance(images, ImageBatch) else process_images(images, config)


def expand_prompt(text: str, images: "Sequence[Any] | ImageBatch", tokenizer: Tokenizer,
                  config: ProcessorConfig | None = None) -> tuple[list[int], ImageBatch]:
    """A text with one ``<image>`` per image, tokenized (no BOS added, as transformers' processor) and expanded:
    ``(ids, batch)``. ``images``: paths or arrays (processed with ``config``), or an :class:`ImageBatch`."""
    batch = _batch(images, config)
    special = (config or ProcessorConfig()).use_image_special_tokens
    return expand_ids(tokenizer.encode(text), batch, ImageTokens.from_tokenizer(tokenizer), special), batch


def _images_in(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    found = []
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, Mapping) and part.get("type") == "image":
                source = part.get("image", part.get("path"))
                if source is not None:
                    found.append(source)
    return found


def _flat(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages whose content is a list of parts, as strings: an image part is ``<image>``, a text part its text
    (what the LFM2-VL chat template renders them as); for the built-in format, which takes strings only."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(IMAGE if isinstance(p, Mapping) and p.get("type") == "image" else
                              str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in content)
        out.append({**m, "content": content})
    return out


def encode_chat_with_images(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]],
                            images: "Sequence[Any] | ImageBatch | None" = None, config: ProcessorConfig | None = None,
                            add_generation_prompt: bool = True) -> tuple[list[int], ImageBatch]:
    """A conversation with images, rendered by the checkpoint's chat template and expanded: ``(ids, batch)``.

    Images are placed with ``<image>`` in a message's text, or as parts of a list content
    (``{"type": "image", "image": path}`` with ``{"type": "text", "text": ...}``, as transformers takes them);
    ``images`` gives them when the messages only mark where they go (not both)."""
    embedded = _images_in(messages) if isinstance(messages, (list, tuple)) else []
    if embedded and images is not None:
        raise Lfm2npError("images are given both in the messages and as images=: give them one way")
    images = embedded if images is None else images
    if isinstance(images, list) and not images:
        raise Lfm2npError("encode_chat_with_images: no images (give images=, or image parts in the messages)")
    batch = _batch(images, config)
    use_builtin = tokenizer.chat_template is None
    rendered = _flat(messages) if use_builtin and isinstance(messages, (list, tuple)) else messages
    ids = tokenizer.encode_chat(rendered, add_generation_prompt=add_generation_prompt)
    special = (config or ProcessorConfig()).use_image_special_tokens
    return expand_ids(ids, batch, ImageTokens.from_tokenizer(tokenizer), special), batch
