"""Prompts with images for a loaded LFM2-VL model: a text or a conversation and image files (or arrays) to the ids
that hold each image's placeholders, by the model's own processor settings and the checkpoint's tokenizer.

::

    ids, batch = encode_with_images(model, tokenizer, ["photo.png"], chat="What is in the picture?")
    logits = model.forward(ids, images=batch)          # the same batch: the images are not processed again

Where the images go: each ``<image>`` in the text (or in a message, or an image part of a message's list content)
takes the next image, in order, and the placeholders must be as many as the images. A prompt without any
``<image>`` gets the images before its text (for a conversation: at the start of the last user message, as image
parts, which the checkpoint's chat template renders), which is where LFM2-VL's examples put them. Each placeholder
then becomes the image's markers and tokens (:func:`lfm2np.processor.expand_ids`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .errors import Lfm2npError
from .io.tokenizer import Tokenizer
from .processor import ImageBatch, ImageTokens, encode_chat_with_images, expand_ids
from .processor.prompt import IMAGE

__all__ = ["encode_with_images", "placeholders"]


def placeholders(prompt: "str | Sequence[Mapping[str, Any]]") -> int:
    """How many images ``prompt`` places: ``<image>`` in a text or in messages' string contents, and image parts
    (``{"type": "image", ...}``) of list contents."""
    if isinstance(prompt, str):
        return prompt.count(IMAGE)
    found = 0
    for m in prompt:
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, str):
            found += content.count(IMAGE)
        for part in content if isinstance(content, list) else ():
            if isinstance(part, Mapping):
                found += 1 if part.get("type") == "image" else str(part.get("text", "")).count(IMAGE)
    return found


def _images_first(messages: Sequence[Mapping[str, Any]], n: int) -> list[dict[str, Any]]:
    """``messages`` with ``n`` image parts at the start of the last user message."""
    out = [dict(m) for m in messages]
    users = [k for k, m in enumerate(out) if m.get("role") == "user"]
    if not users:
        raise Lfm2npError("the conversation has no user message to put the images in")
    last = out[users[-1]]
    content = last.get("content")
    parts = content if isinstance(content, list) else [{"type": "text", "text": "" if content is None else content}]
    last["content"] = [{"type": "image"} for _ in range(n)] + list(parts)
    return out


def encode_with_images(model: Any, tokenizer: Tokenizer, images: "Sequence[Any] | ImageBatch", *,
                       text: str | None = None, chat: str | None = None, system: str | None = None,
                       messages: Sequence[Mapping[str, Any]] | None = None) -> tuple[list[int], ImageBatch]:
    """The ids of a prompt with images, and the processed images: ``(ids, batch)`` for
    ``model.forward(ids, images=batch)``.

    The prompt is one of ``text`` (BOS prepended, as every command's ``--text``), ``chat`` (one user message, with
    ``system`` if given, rendered by the checkpoint's chat template with the assistant header) or ``messages`` (a
    conversation). ``images``: file paths or uint8 (H, W, 3) arrays, processed with ``model.image_processor``
    (the checkpoint's settings), or an :class:`~lfm2np.processor.ImageBatch` already processed. Placement: see
    the module's doc; fewer placeholders than images, or more, is an error."""
    if sum(x is not None for x in (text, chat, messages)) != 1:
        raise Lfm2npError("encode_with_images takes one prompt: text=, chat= or messages=")
    if getattr(model.config, "vision", None) is None:
        raise Lfm2npError(f"{model.config.source or model.config.model_type}: this model has no vision tower "
                          f"(model_type {model.config.model_type}); images need an LFM2-VL checkpoint")
    processor = model.image_processor
    if processor is None:
        raise Lfm2npError("the model has no image processor settings (load an LFM2-VL checkpoint directory with its "
                          "processor_config.json or preprocessor_config.json)")
    tokens = ImageTokens.from_tokenizer(tokenizer)
    if tokens.image != model.config.vision.image_token_id:
        raise Lfm2npError(f"{tokenizer.source}: the tokenizer's {IMAGE} is id {tokens.image} but the model's "
                          f"image_token_id is {model.config.vision.image_token_id}")
    if isinstance(images, (str, bytes)) or not isinstance(images, (Sequence, ImageBatch)):
        raise Lfm2npError(f"images must be a list of file paths or arrays, or an ImageBatch; got "
                          f"{type(images).__name__}")
    batch = images if isinstance(images, ImageBatch) else processor(list(images))
    n = len(batch.layouts)
    if text is not None:
        if not isinstance(text, str):
            raise Lfm2npError(f"text must be a str; got {type(text).__name__}")
        text = text if placeholders(text) else IMAGE * n + text
        ids = tokenizer.encode(text, add_bos=True)
        return expand_ids(ids, batch, tokens, processor.config.use_image_special_tokens), batch
    if chat is not None:
        if not isinstance(chat, str) or not isinstance(system, (str, type(None))):
            raise Lfm2npError("chat and system must be strings")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": chat}]
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
        raise Lfm2npError("messages must be a list of {'role': ..., 'content': ...} dictionaries")
    if not placeholders(messages):
        messages = _images_first(messages, n)
    return encode_chat_with_images(tokenizer, messages, batch, processor.config)
