"""llama.cpp's LFM2-VL pair: the text GGUF (``lfm2``) and the mmproj GGUF (``clip``, ``clip.projector_type``
"lfm2"), read as one LFM2-VL model.

``convert_hf_to_gguf.py --mmproj`` (``LFM2VLModel`` in ``conversion/lfm2.py``) writes the vision tower and the
projector of an ``Lfm2VlForConditionalGeneration`` checkpoint into the mmproj file, and its text tower, without
them, into the text file (``conversion/base.py``: the text model class comes from ``text_config.architectures``).
What the mmproj file holds, and how lfm2np reads it:

- tensors ``v.patch_embd``, ``v.position_embd``, ``v.blk.{i}.{ln1,attn_q,attn_k,attn_v,attn_out,ln2,ffn_up,
  ffn_down}``, ``v.post_ln`` (the SigLIP2 tower) and ``mm.input_norm`` (the projector's optional LayerNorm),
  ``mm.1``, ``mm.2`` (its two Linears; llama.cpp needs their biases), each with ``.weight`` and ``.bias``;
- the patch embedding as a convolution kernel: the converter views transformers' Linear weight ``(Dv, p*p*C)``
  as ``(Dv, p, p, C)`` and permutes it to ``(Dv, C, p, p)`` (ggml ``[p, p, C, Dv]``); lfm2np permutes it back
  to ``(Dv, p, p, C)`` and flattens it, which moves values only, so the weight is exactly the checkpoint's;
- keys ``clip.vision.{embedding_length, feed_forward_length, block_count, attention.head_count,
  attention.layer_norm_epsilon, patch_size, projection_dim, image_mean, image_std, image_size,
  projector.scale_factor}``, ``clip.use_gelu`` (the tower's GELU-tanh MLP), ``clip.has_vision_encoder``. The
  position grid (``num_patches``), the channels and the projector's width come from the tensor shapes;
  ``projection_dim`` must be the text file's ``embedding_length``. ``image_size`` (256 for every LFM2-VL file:
  the converter sets it "for compatibility") is checked for its type and not used.

The image placeholder id is not in the mmproj file: it is the text file's ``<image>`` token. llama.cpp's image
processor settings for LFM2 are partly the file's (patch size, downsample factor, mean and std) and partly fixed
in its code (``clip.cpp``, ``mtmd-image.h``: 64..256 image tokens, tiles of 512, 2..10 tiles, a thumbnail, a pixel
tolerance of 2): :func:`processor_settings` gives both, with llama.cpp's rounding of the smart resize.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from ..config import Config
from ..errors import Lfm2npError
from ..schema import Tensor, layout
from ..vision_config import VisionConfig
from ..vision_schema import tensors as vision_tensors
from ..weights import check_tensors
from .gguf import GgufSource, open_gguf, read_metadata
from .gguf_file import INTEGER_TYPES, GgufFile
from .gguf_meta import MetadataKeys, config_dict_from_metadata, f32_decimal

PROJECTOR_TYPE = "lfm2"  #: ``clip.projector_type`` of an LFM2-VL mmproj
IMAGE_TOKEN = "<image>"  #: the placeholder token of the text file's vocabulary
#: lfm2np vision role (vision_schema's, without a layer prefix) -> the mmproj tensor, ``{i}``: the encoder layer
MMPROJ_NAMES: dict[str, str] = {
    "patch_embedding": "v.patch_embd.weight", "patch_embedding_bias": "v.patch_embd.bias",
    "position_embedding": "v.position_embd.weight",
    "layer_norm1": "v.blk.{i}.ln1.weight", "self_attn.q_proj": "v.blk.{i}.attn_q.weight",
    "self_attn.k_proj": "v.blk.{i}.attn_k.weight", "self_attn.v_proj": "v.blk.{i}.attn_v.weight",
    "self_attn.out_proj": "v.blk.{i}.attn_out.weight", "layer_norm2": "v.blk.{i}.ln2.weight",
    "mlp.fc1": "v.blk.{i}.ffn_up.weight", "mlp.fc2": "v.blk.{i}.ffn_down.weight",
    "post_layernorm": "v.post_ln.weight",
    "layer_norm": "mm.input_norm.weight", "linear_1": "mm.1.weight", "linear_2": "mm.2.weight",
}
#: llama.cpp's fixed LFM2 processor settings (clip.cpp ``set_limit_image_tokens(64, 256)``; mtmd-image.h)
LLAMA_CPP_PROCESSOR = {"min_image_tokens": 64, "max_image_tokens": 256, "min_tiles": 2, "max_tiles": 10,
                       "tile_size": 512, "max_pixels_tolerance": 2.0, "use_thumbnail": True,
                       "do_image_splitting": True}


def mmproj_name(role: str) -> str:
    """The mmproj tensor that holds the vision tensor of ``role`` (vision_schema's ``{i}.step`` inside layer i,
    a bias's role ending in ``_bias``)."""
    bias = role.endswith("_bias")
    base = role[:-len("_bias")] if bias else role
    layer, _, step = base.partition(".") if base.split(".", 1)[0].isdigit() else ("", "", base)
    pattern = MMPROJ_NAMES.get(step)
    if pattern is None:
        raise Lfm2npError(f"vision tensor role {role!r} has no mmproj name")
    name = pattern.format(i=layer)
    return name[:-len(".weight")] + ".bias" if bias else name


def mmproj_tensors(v: VisionConfig, text_width: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """lfm2np name -> (mmproj name, ggml ``ne``) of every vision tensor of ``v`` (the patch embedding as the
    converter stores it: ``[p, p, C, Dv]``)."""
    out = {}
    for name, shape, _, role in vision_tensors(v, text_width):
        if role == "patch_embedding":
            shape = (v.hidden_size, v.num_channels, v.patch_size, v.patch_size)
        out[name] = (mmproj_name(role), tuple(reversed(shape)))
    return out


# ------------------------------------------------------------------------------------------- metadata
def check_mmproj(meta: Mapping[str, Any], source: str) -> MetadataKeys:
    """The file is an mmproj of LFM2-VL's projector type with a vision encoder, or an error naming the key."""
    arch = meta.get("general.architecture")
    if arch != "clip":
        raise Lfm2npError(f"{source}: general.architecture is {arch!r}; an mmproj file is 'clip' (the text model's "
                          f"GGUF is the model, the mmproj goes with mmproj= or --mmproj)")
    k = MetadataKeys(meta, "clip", source)
    kind = k.text("projector_type") or k.text("vision.projector_type")
    if kind != PROJECTOR_TYPE:
        raise k.error("projector_type", f"is {kind!r}; lfm2np reads LFM2-VL's projector type {PROJECTOR_TYPE!r}")
    if not k.flag("has_vision_encoder", False):
        raise k.error("has_vision_encoder", "is not true: this mmproj has no vision encoder")
    if not k.flag("use_gelu", False):
        raise k.error("use_gelu", "is not true; LFM2-VL's tower MLP is GELU (tanh), which llama.cpp reads from it")
    return k


def vision_config_dict(meta: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]], source: str,
                       text_width: int, text_source: str) -> dict[str, Any]:
    """The ``vision_config`` and projector keys of an ``lfm2_vl`` config.json, from an mmproj file's metadata and
    the ggml shapes of its tensors (``{name: ne}``), checked against the text tower's width ``text_width``."""
    k = check_mmproj(meta, source)
    D = k.count("vision.embedding_length")
    heads = k.count("vision.attention.head_count")
    if D % heads:
        raise k.error("vision.attention.head_count", f"is {heads}, which does not divide embedding_length {D}")
    head_dim = k.count("vision.attention.head_dim", required=False)
    if head_dim is not None and head_dim * heads != D:
        raise k.error("vision.attention.head_dim", f"is {head_dim}; {heads} heads of it are not embedding_length {D}")
    k.count("vision.image_size")  # 256 in every LFM2-VL file: the positions come from v.position_embd
    width = k.count("vision.projection_dim")
    if width != text_width:
        raise k.error("vision.projection_dim", f"is {width}, but the text model {text_source} is {text_width} wide "
                                               f"(embedding_length): this mmproj belongs to another model")
    vision = {"model_type": "siglip2_vision_model", "vision_use_head": False, "hidden_size": D,
              "num_attention_heads": heads, "intermediate_size": k.count("vision.feed_forward_length"),
              "num_hidden_layers": k.count("vision.block_count", maximum=1024),
              "patch_size": k.count("vision.patch_size", maximum=1024),
              "layer_norm_eps": f32_decimal(k.number("vision.attention.layer_norm_epsilon")),
              "num_channels": _dim(tensors, "v.patch_embd.weight", 2, 4, source),
              "num_patches": _dim(tensors, "v.position_embd.weight", 1, 2, source)}
    norm = "mm.input_norm.weight" in tensors
    if norm != ("mm.input_norm.bias" in tensors):
        raise Lfm2npError(f"{source}: mm.input_norm has its {'weight' if norm else 'bias'} only; the projector's "
                          f"LayerNorm has both or neither")
    for name in ("mm.1.bias", "mm.2.bias"):
        if name not in tensors:
            raise Lfm2npError(f"{source}: missing tensor {name!r} (llama.cpp's LFM2 projector needs its biases)")
    return {"vision_config": vision, "downsample_factor": k.count("vision.projector.scale_factor", maximum=64),
            "projector_hidden_size": _dim(tensors, "mm.1.weight", 1, 2, source), "projector_bias": True,
            "projector_use_layernorm": norm, "projector_hidden_act": "gelu"}


def _dim(tensors: Mapping[str, tuple[int, ...]], name: str, axis: int, dims: int, source: str) -> int:
    ne = tensors.get(name)
    if ne is None:
        raise Lfm2npError(f"{source}: missing tensor {name!r}")
    if len(ne) != dims:
        raise Lfm2npError(f"{source}: tensor {name!r} has ggml shape {list(ne)}; expected {dims} dimensions")
    return int(ne[axis])


def image_token_id(tokens: Any, source: str) -> int:
    """The id of ``<image>`` in the text file's vocabulary (``tokenizer.ggml.tokens``)."""
    if not isinstance(tokens, list):
        raise Lfm2npError(f"{source}: no tokenizer.ggml.tokens; the image placeholder {IMAGE_TOKEN!r} is found there")
    found = [i for i, t in enumerate(tokens) if t == IMAGE_TOKEN]
    if len(found) != 1:
        raise Lfm2npError(f"{source}: tokenizer.ggml.tokens holds {IMAGE_TOKEN!r} {len(found)} times; an LFM2-VL "
                          f"text model has it once (its image placeholder)")
    return found[0]


def processor_settings(meta: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The image processor settings llama.cpp uses with this mmproj (:class:`lfm2np.processor.ProcessorConfig`'s
    fields): the file's patch size, downsample factor, mean and std, llama.cpp's fixed LFM2 values
    (:data:`LLAMA_CPP_PROCESSOR`) and its rounding of the smart resize."""
    k = check_mmproj(meta, source)
    out: dict[str, Any] = {"encoder_patch_size": k.count("vision.patch_size", maximum=1024),
                           "downsample_factor": k.count("vision.projector.scale_factor", maximum=64),
                           **LLAMA_CPP_PROCESSOR, "rounding": "llama.cpp"}
    for name in ("image_mean", "image_std"):
        value = k.raw(f"vision.{name}", True)
        if not isinstance(value, list) or len(value) != 3 or not all(
                isinstance(x, float) and np.isfinite(x) for x in value):
            raise k.error(f"vision.{name}", f"is {value!r:.60}; expected three finite numbers")
        out[name] = tuple(f32_decimal(x) for x in value)
    if 0.0 in out["image_std"]:
        raise k.error("vision.image_std", f"is {list(out['image_std'])}; a zero cannot divide")
    return out


# -------------------------------------------------------------------------------------------- tensors
class MmprojSource:
    """The vision tower and projector of an mmproj file by lfm2np name (a :class:`~lfm2np.weights.TensorSource`
    for the vision part): every tensor checked first against the names and ggml shapes the config implies
    (:func:`lfm2np.weights.check_tensors`), then read dequantised, the patch embedding's kernel as the Linear
    weight transformers holds."""

    def __init__(self, f: GgufFile, v: VisionConfig, text_width: int, strict: bool = True):
        self.file, self.vision = f, v
        self._where = mmproj_tensors(v, text_width)
        check_tensors({name: t.ne for name, t in f.tensors.items()}, dict(self._where.values()), str(f.path), strict,
                      f"the metadata describes a {v.num_hidden_layers}-layer tower {v.hidden_size} wide", "ggml shape")
        for gname, _ in self._where.values():
            if f.tensors[gname].ggml_type in INTEGER_TYPES:
                raise Lfm2npError(f"{f.path}: tensor {gname!r} is stored as {f.tensors[gname].ggml_type}, an integer "
                                  f"type; a weight must be floating point or quantised")

    def names(self) -> list[str]:
        return list(self._where)

    def read(self, name: str, dtype: Any, rows: np.ndarray | None = None) -> np.ndarray:
        gname = self._where[name][0]
        values = self.file.dequantize(gname)
        if gname == "v.patch_embd.weight":  # (Dv, C, p, p) -> (Dv, p, p, C) -> (Dv, p*p*C): transformers' order
            values = values.transpose(0, 2, 3, 1).reshape(values.shape[0], -1)
        values = values.astype(dtype, copy=False)
        return values if rows is None else values[np.asarray(rows)]

    def stored_type(self, name: str) -> str:
        return self.file.tensors[self._where[name][0]].ggml_type

    def prefetch(self, names: "list[str]") -> None:
        for n in names:
            if n in self._where:
                self.file.prefetch(self._where[n][0])

    def close(self) -> None:
        self.file.close()

    def describe(self) -> dict[str, Any]:
        return {"format": "gguf", "path": str(self.file.path)}


class PairSource:
    """A text GGUF's source and an mmproj's as one :class:`~lfm2np.weights.TensorSource`: the vision tensors from
    the mmproj, every other from the text file."""

    def __init__(self, text: Any, vision: MmprojSource):
        self.text, self.vision = text, vision
        self._vision = set(vision.names())

    def _source(self, name: str) -> Any:
        return self.vision if name in self._vision else self.text

    def read(self, name: str, dtype: Any, rows: np.ndarray | None = None) -> np.ndarray:
        return self._source(name).read(name, dtype, rows)

    def stored_type(self, name: str) -> str:
        return self._source(name).stored_type(name)

    def prefetch(self, names: "list[str]") -> None:
        self.vision.prefetch([n for n in names if n in self._vision])
        self.text.prefetch([n for n in names if n not in self._vision])

    def close(self) -> None:
        try:
            self.text.close()
        finally:
            self.vision.close()

    def describe(self) -> dict[str, Any]:
        return {**self.text.describe(), "mmproj": self.vision.describe()["path"]}


# ---------------------------------------------------------------------------------------------- the pair
def _pair_config(text: GgufFile, mmproj: GgufFile) -> Config:
    """The LFM2-VL config of a text file and an mmproj file, both checked (see the module docstring)."""
    where = f"{text.path} + {mmproj.path}"
    ne = {name: t.ne for name, t in text.tensors.items()}
    text_dict = config_dict_from_metadata(read_metadata(text), ne, str(text.path))
    vision = vision_config_dict(mmproj.metadata, {name: t.ne for name, t in mmproj.tensors.items()},
                                str(mmproj.path), text_dict["hidden_size"], str(text.path))
    token = image_token_id(text.metadata.get("tokenizer.ggml.tokens"), str(text.path))
    d = {"model_type": "lfm2_vl", "text_config": text_dict, "tie_word_embeddings": text_dict["tie_word_embeddings"],
         "image_token_id": token, **vision}
    return Config.from_dict(d, source=where)


def read_gguf_pair(path: "str | os.PathLike[str]", mmproj: "str | os.PathLike[str]", strict: bool = True) \
        -> tuple[Config, "list[Tensor]", PairSource, dict[str, Any]]:
    """The LFM2-VL config, tensor layout and tensors of llama.cpp's pair (the text GGUF ``path``, the mmproj
    GGUF ``mmproj``), and the image processor settings llama.cpp uses with them (:func:`processor_settings`);
    both files stay open until the source is closed."""
    text = open_gguf(path)
    try:
        vision = open_gguf(mmproj)
    except BaseException:
        text.close()
        raise
    try:
        check_mmproj(vision.metadata, str(vision.path))
        config = _pair_config(text, vision)
        tensors = layout(config)
        settings = processor_settings(vision.metadata, str(vision.path))
        source = PairSource(GgufSource(text, config, tensors, strict),
                            MmprojSource(vision, config.vision, config.hidden_size, strict))
        return config, tensors, source, settings
    except BaseException:
        text.close()
        vision.close()
        raise


def read_pair_config(path: "str | os.PathLike[str]", mmproj: "str | os.PathLike[str]") -> Config:
    """The LFM2-VL config of llama.cpp's pair, from the two files' metadata and tensor shapes (no tensor is read)."""
    with open_gguf(path) as text, open_gguf(mmproj) as vision:
        check_mmproj(vision.metadata, str(vision.path))
        return _pair_config(text, vision)
