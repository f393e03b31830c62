"""Decoding image files to uint8 RGB arrays, as transformers' ``load_image`` reads them (Pillow only).

``load_image`` opens the file with Pillow, applies the EXIF orientation (``ImageOps.exif_transpose``), then
``convert("RGB")``: grayscale, palette, 1-bit and CMYK images become RGB by Pillow's rules, an alpha channel is
dropped (not composited over a background), 16-bit images are converted as Pillow converts them (``I;16`` is
clipped to 0..255, not scaled: a bright 16-bit image turns white in transformers too). :func:`read_image` does
exactly that, so lfm2np sees the pixels transformers sees. (transformers 5.25's processor, handed a *path*,
decodes it with torchvision or torchcodec instead; for JPEG their decoders can differ from Pillow's by a level
here and there. ``load_image`` is the reading the issue and the fixtures use.)

Pillow is an optional dependency (``pip install 'lfm2np[vision]'``), imported when an image is first read.

Untrusted files: the file is read whole (at most :data:`MAX_FILE_BYTES`) from a regular file, then decoded from
memory. Before a pixel is decoded, the size the header declares is checked against the bytes: more than
:data:`MAX_PIXELS_PER_BYTE` pixels per byte of file (deflate's densest ratio, 1032:1, times eight 1-bit pixels a
byte: no PNG can hold more) is a decompression bomb, refused; so is more than Pillow's own limit
(``2 * Image.MAX_IMAGE_PIXELS``, where Pillow raises ``DecompressionBombError``). Truncated or corrupt files, and
anything Pillow cannot read, are an :class:`~lfm2np.errors.Lfm2npError` naming the file.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import Lfm2npError
from .files import CheckedFile

MAX_FILE_BYTES = 1 << 28  #: the largest image file read (256 MiB)
MAX_PIXELS_PER_BYTE = 1032 * 8  #: densest a PNG can be: deflate's 1032:1 times eight 1-bit pixels per byte

__all__ = ["MAX_FILE_BYTES", "MAX_PIXELS_PER_BYTE", "read_image", "check_image_array"]


def _pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise Lfm2npError("reading image files needs Pillow: pip install 'lfm2np[vision]'") from None
    return Image, ImageOps


def read_image(path: "str | os.PathLike[str]") -> np.ndarray:
    """The image file at ``path`` as a uint8 ``(H, W, 3)`` RGB array, decoded as transformers' ``load_image``
    decodes it (EXIF orientation, then Pillow's ``convert("RGB")``)."""
    path = Path(path)
    Image, ImageOps = _pillow()
    f = CheckedFile(path, "image file")
    try:
        size = f.size_now()
        if size == 0:
            raise Lfm2npError(f"{path}: an empty file is no image")
        if size > MAX_FILE_BYTES:
            raise Lfm2npError(f"{path}: {size} bytes; an image file of more than {MAX_FILE_BYTES} bytes is refused")
        data = f.read_bytes(0, size, "the image")
    finally:
        f.close()
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) or None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # judged below, by our own bounds
            image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        pixels = width * height
        if pixels == 0:
            raise Lfm2npError(f"{path}: declares a {width}x{height} image (no pixels)")
        if pixels > MAX_PIXELS_PER_BYTE * size:
            raise Lfm2npError(f"{path}: declares {width}x{height} = {pixels} pixels in {size} bytes, more than "
                              f"{MAX_PIXELS_PER_BYTE} pixels per byte: a decompression bomb, refused before "
                              "decoding")
        if limit is not None and pixels > limit:
            raise Lfm2npError(f"{path}: declares {width}x{height} = {pixels} pixels, more than Pillow decodes "
                              f"({limit}: its DecompressionBombError)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = ImageOps.exif_transpose(image)
            rgb = np.array(image.convert("RGB"), dtype=np.uint8)
    except Lfm2npError:
        raise
    except Image.DecompressionBombError as e:
        raise Lfm2npError(f"{path}: refused as a decompression bomb ({e})") from None
    except MemoryError:
        raise Lfm2npError(f"{path}: not enough memory to decode the image") from None
    except Exception as e:  # Pillow raises many types for bad files: OSError, SyntaxError, ValueError, struct.error
        kind = "truncated" if "truncated" in str(e) else "not a readable image"
        raise Lfm2npError(f"{path}: {kind} ({type(e).__name__}: {str(e)[:200]})") from None
    return check_image_array(rgb, str(path))


def check_image_array(image: object, name: str = "image") -> np.ndarray:
    """``image`` as a C-contiguous uint8 ``(H, W, 3)`` array, or an error naming ``name``: the arrays the image
    processor takes (H and W at least 1; RGB, channels last)."""
    if not isinstance(image, np.ndarray):
        raise Lfm2npError(f"{name}: expected a file path or a uint8 (H, W, 3) array; got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise Lfm2npError(f"{name}: the array is {image.dtype}; expected uint8 RGB values 0..255")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise Lfm2npError(f"{name}: shape {list(image.shape)}; expected (H, W, 3) with H, W >= 1 (RGB, channels "
                          "last)")
    return np.ascontiguousarray(image)
