"""The LFM2-VL image processor in NumPy: image files or arrays to pixel tensors, and prompts to ids with each
image's placeholder tokens in place.

- :class:`ProcessorConfig` (``ProcessorConfig.from_dir(path)``): the checkpoint's processor settings, strictly
  validated, with the released defaults;
- :func:`image_layout`: how an image of a given size is cut (smart resize, tiles, thumbnail) and how many image
  tokens each part becomes, from its size alone;
- :class:`ImageProcessor`: :func:`process_images` bound to a checkpoint's settings (``model.image_processor``);
- :func:`process_images`: ``pixel_values`` (N, P, 3*p*p) float32, ``pixel_attention_mask`` (N, P) bool,
  ``spatial_shapes`` (N, 2) int64, as transformers' Lfm2VlImageProcessor returns them, plus the layout of each
  image (:class:`ImageBatch`);
- :func:`expand_ids`, :func:`expand_prompt`, :func:`encode_chat_with_images`: each ``<image>`` placeholder
  replaced by the image's markers and tokens.

This package is a leaf beside :mod:`lfm2np.io`: it imports the core and io only, so that the oracle (diagnosing
a processor dump) and the calculators (image tokens in ``memory``) can use it too.
"""

from .config import ProcessorConfig
from .layout import ImageLayout, image_layout, smart_resize
from .batch import ImageBatch, ImageProcessor, process_images
from .prompt import ImageTokens, encode_chat_with_images, expand_ids, expand_prompt

__all__ = ["ImageBatch", "ImageLayout", "ImageProcessor", "ImageTokens", "ProcessorConfig", "encode_chat_with_images",
           "expand_ids", "expand_prompt", "image_layout", "process_images", "smart_resize"]
