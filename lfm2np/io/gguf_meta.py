"""GGUF metadata -> a Hugging Face ``config.json`` dictionary, every value checked for its type and range and
against the tensors it describes.

A GGUF file states its hyperparameters twice: as ``{arch}.*`` keys and, implicitly, as the shapes of its
tensors. llama.cpp refuses a file whose shapes contradict its keys. Third-party files do contradict them (a
published LFM2.5 file says ``feed_forward_length`` 12288 while its FFN tensors are 8192 wide; Ollama writes
``tokenizer.ggml.pre = "llama-bpe"`` for LFM2 tokenizers), so each key is checked against the tensors, and
what happens depends on whether the tensors settle the question:

=====================================================  ========  ===============================================
contradiction                                          outcome   why
=====================================================  ========  ===============================================
``feed_forward_length`` vs the dense ``ffn_*`` widths   warning   a width has one meaning: the tensors' is run
``expert_feed_forward_length`` vs ``ffn_*_exps``        warning   likewise
``vocab_size`` vs ``token_embd`` rows                   warning   the embedding's rows are the vocabulary
``tokenizer.ggml.tokens`` length vs ``token_embd`` rows warning   the model runs; a tokenizer that can emit an
                                                                  id past the table is refused when it is used
``block_count`` vs the ``blk.N`` tensors                error     which blocks are meant is not decidable
``embedding_length`` vs ``token_embd``                  error     every shape follows from it
``attention.head_count`` / ``key_length`` vs ``attn_q``, error    how a row splits into heads changes the
``attn_q_norm`` (the head dim), ``attn_qkv``                      attention itself; no reading is certainly right
``attention.head_count_kv[i]`` vs ``attn_k``/``attn_qkv`` error   likewise (and 0 marks a conv layer)
``head_count_kv[i]`` = 0 but attention tensors, or the  error     the layer kind is not decidable
converse
``expert_count`` vs ``ffn_gate_inp``/``*_exps``         error     routing over a different expert set
``leading_dense_block_count`` vs the tensors            error     likewise
``shortconv.l_cache`` vs ``shortconv.conv``             error     the conv window
=====================================================  ========  ===============================================

Refused outright, with the key named: ``split.count`` other than 1 (or not an integer: a split file,
which lfm2np does not read), ``{arch}.attention.sliding_window`` > 0 (llama.cpp then makes every
attention layer sliding-window: the LFM2.5-Audio detokenizer), ``lfm2moe.attention.causal`` false, a RoPE
scaling type, an expert gating function other than sigmoid, ``value_length`` different from ``key_length``.
lfm2np runs none of these, and running them as the causal model would be silently wrong.

``lfm2.attention.causal`` false (the converter's ``Lfm2BidirectionalModel``: LFM2.5-Embedding / -ColBERT) reads
as that architecture; ``pooling_type`` and ``dense_2`` as the embedding head (:func:`~lfm2np.io.sentence_transformers.gguf_head`).

Every value is type-checked first: a count must be an integer (not a bool, not a float, not a string) in
range, a per-layer array must have ``block_count`` entries, a float must be finite; anything else raises
:class:`~lfm2np.errors.Lfm2npError` naming the file and the key.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Mapping

import numpy as np

from ..config import ATTENTION, CONV
from ..errors import Lfm2npError
from .sentence_transformers import gguf_head

ARCHITECTURES = {"lfm2": "lfm2", "lfm2moe": "lfm2_moe"}  # GGUF general.architecture -> HF model_type
GGUF_ARCH = {v: k for k, v in ARCHITECTURES.items()}


def gguf_architecture(config: Any) -> str | None:
    """llama.cpp's ``general.architecture`` for a config's model type, or None when llama.cpp has no graph for
    it (LFM3, as pinned here)."""
    return GGUF_ARCH.get(config.model_type)

#: Bound on block_count when no tensor is there to check it against (the config's own limit is the same).
MAX_BLOCKS = 1 << 12
_BLOCK = re.compile(r"blk\.(\d+)\.")
_TOKEN_IDS = (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
              ("padding_token_id", "pad_token_id"))


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _what(v: Any) -> str:
    """A short description of a wrong value: ``a string '12'``, ``a float 4.0``, ``a list of 3``."""
    if isinstance(v, (bool, np.bool_)):
        return f"a bool {bool(v)}"
    if isinstance(v, str):
        return f"a string {v[:40]!r}"
    if isinstance(v, (float, np.floating)):
        return f"a float {float(v)!r}"
    if isinstance(v, (list, tuple)):
        return f"a list of {len(v)}"
    if _is_int(v):
        return f"{int(v)}"
    return f"a {type(v).__name__}"


def f32_decimal(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-5 stays 1e-5, not
    9.99999974e-06): GGUF stores floats in 32 bits, config.json in decimal."""
    return float(str(np.float32(value)))


class MetadataKeys:
    """Typed access to the ``{arch}.*`` keys of one file: every value checked before it is used."""

    def __init__(self, meta: Mapping[str, Any], arch: str, source: str):
        self.meta, self.arch, self.source = meta, arch, source

    def full(self, name: str) -> str:
        return name if name.startswith(("tokenizer.", "split.", "general.")) else f"{self.arch}.{name}"

    def error(self, name: str, problem: str) -> Lfm2npError:
        return Lfm2npError(f"{self.source}: {self.full(name)} {problem}")

    def warn(self, name: str, problem: str) -> None:
        warnings.warn(f"{self.source}: {self.full(name)} {problem}", UserWarning, stacklevel=4)

    def raw(self, name: str, required: bool) -> Any:
        value = self.meta.get(self.full(name))
        if value is None and required:
            raise self.error(name, "is missing")
        return value

    def count(self, name: str, *, required: bool = True, default: int | None = None, minimum: int = 1,
              maximum: int | None = None) -> int | None:
        """An integer key in ``[minimum, maximum]``."""
        v = self.raw(name, required)
        if v is None:
            return default
        return self.integer(name, v, minimum, maximum)

    def integer(self, name: str, v: Any, minimum: int, maximum: int | None) -> int:
        if not _is_int(v):
            raise self.error(name, f"is {_what(v)}; expected an integer")
        v = int(v)
        if v < minimum or (maximum is not None and v > maximum):
            top = f"..{maximum}" if maximum is not None else " or more"
            raise self.error(name, f"is {v}; expected {minimum}{top}")
        return v

    def per_layer(self, name: str, n: int, *, required: bool = True, minimum: int = 0) -> list[int] | None:
        """A key that is one integer for every layer or an array of ``n`` (one per layer)."""
        v = self.raw(name, required)
        if v is None:
            return None
        if isinstance(v, (list, tuple)):
            if len(v) != n:
                raise self.error(name, f"has {len(v)} entries; expected one per layer, block_count = {n}")
            return [self.integer(f"{name}[{i}]", x, minimum, None) for i, x in enumerate(v)]
        return [self.integer(name, v, minimum, None)] * n

    def number(self, name: str, *, required: bool = True, default: float | None = None,
               positive: bool = True) -> float | None:
        v = self.raw(name, required)
        if v is None:
            return default
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise self.error(name, f"is {_what(v)}; expected a number")
        v = float(v)
        if not math.isfinite(v) or (positive and v <= 0):
            raise self.error(name, f"is {v}; expected a finite number{' > 0' if positive else ''}")
        return v

    def flag(self, name: str, default: bool) -> bool:
        v = self.raw(name, False)
        if v is None:
            return default
        if not isinstance(v, (bool, np.bool_)):
            raise self.error(name, f"is {_what(v)}; expected a bool")
        return bool(v)

    def text(self, name: str, required: bool = False) -> str | None:
        v = self.raw(name, required)
        if v is not None and not isinstance(v, str):
            raise self.error(name, f"is {_what(v)}; expected a string")
        return v


# ------------------------------------------------------------------------------------ the dictionary
def config_dict_from_metadata(meta: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]],
                              source: str = "GGUF") -> dict[str, Any]:
    """A Hugging Face ``config.json`` dictionary from GGUF metadata (``{key: value}``; the tokenizer arrays
    may be replaced by ``("array", length)``) and the ggml shapes of the file's tensors (``{gguf_name: ne}``).

    The shapes decide the switches llama.cpp has no key for (an untied head ``output.weight``, the expert
    bias ``exp_probs_b.bias``, conv biases) and are checked against the keys (the table in this module's
    docstring: widths the tensors settle are taken from them with a warning; contradictions in counts are
    errors). With no tensors (``{}``) only the keys are read and checked."""
    arch = meta.get("general.architecture")
    if arch == "clip":
        raise Lfm2npError(f"{source}: general.architecture is 'clip': an mmproj file (a vision tower); load the text "
                          f"GGUF as the model and this file as its mmproj (mmproj=, --mmproj)")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise Lfm2npError(f"{source}: general.architecture is {arch!r}; lfm2np reads {', '.join(ARCHITECTURES)}")
    model_type = ARCHITECTURES[arch]
    k = MetadataKeys(meta, arch, source)
    _refuse_variants(k)
    parts = k.count("split.count", required=False)  # llama.cpp's gguf-split: the number of files
    if parts is not None and parts > 1:
        raise k.error("split.count", f"is {parts}: a split GGUF; merge it first with llama-gguf-split --merge")

    n_layers = k.count("block_count", maximum=MAX_BLOCKS)
    _check_blocks(k, n_layers, tensors)
    kv = k.per_layer("attention.head_count_kv", n_layers)
    layer_types = [CONV if g == 0 else ATTENTION for g in kv]
    groups = sorted({g for g in kv if g})
    if len(groups) > 1:
        raise k.error("attention.head_count_kv", f"differs between attention layers ({groups}); lfm2np expects one "
                                                 "KV head count")
    heads = k.per_layer("attention.head_count", n_layers)
    attn_heads = sorted({heads[i] for i, t in enumerate(layer_types) if t == ATTENTION}) or sorted(set(heads))
    if len(attn_heads) > 1:
        raise k.error("attention.head_count", f"varies per layer ({attn_heads}); expected one value")
    H = attn_heads[0]
    if H < 1:
        raise k.error("attention.head_count", f"is {H}; expected >= 1")
    D = k.count("embedding_length")
    head_dim = k.count("attention.key_length", required=False)
    value_dim = k.count("attention.value_length", required=False)
    if head_dim is None and D % H:
        raise k.error("attention.head_count", f"is {H}, which does not divide embedding_length {D} (and there is "
                                              "no attention.key_length)")
    hd = head_dim if head_dim is not None else D // H
    if value_dim is not None and value_dim != hd:
        raise k.error("attention.value_length", f"is {value_dim} but the key head dim is {hd}; LFM2 attention has "
                                                "one head dimension")
    L = k.count("shortconv.l_cache", minimum=2)
    _check_mixers(k, tensors, D, H, hd, kv, L)

    d: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": _vocab(k, meta, tensors, D),
        "hidden_size": D,
        "num_hidden_layers": n_layers,
        "num_attention_heads": H,
        "num_key_value_heads": groups[0] if groups else H,
        "layer_types": layer_types,
        "norm_eps": f32_decimal(k.number("attention.layer_norm_rms_epsilon")),
        "conv_L_cache": L,
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    theta = k.number("rope.freq_base", required=False)
    if theta is not None:
        d["rope_theta"] = f32_decimal(theta)
    ctx = k.count("context_length", required=False)
    if ctx is not None:
        d["max_position_embeddings"] = ctx
    if head_dim is not None and head_dim * H != D:
        d["head_dim"] = head_dim
    conv_layer = next((i for i, t in enumerate(layer_types) if t == CONV), None)
    d["conv_bias"] = conv_layer is not None and f"blk.{conv_layer}.shortconv.in_proj.bias" in tensors

    if arch == "lfm2":  # dense (lfm2moe: the MoE keys)
        # llama.cpp stores the effective width: no further adjustment
        d.update(intermediate_size=_dense_width(k, tensors, range(n_layers), required=True),
                 block_auto_adjust_ff_dim=False)
    else:
        d.update(_moe(k, tensors, n_layers, D))
    for name, hf in _TOKEN_IDS:
        key = f"tokenizer.ggml.{name}"
        value = meta.get(key)
        if value is not None:
            d[hf] = k.integer(key, value, 0, d["vocab_size"] - 1)
    if not k.flag("attention.causal", True):
        d["architectures"] = ["Lfm2BidirectionalModel"]
    head = gguf_head(k.count("pooling_type", required=False, minimum=0), k.count("embedding_length_out",
                     required=False), tensors.get("dense_2.weight"), tensors.get("dense_2.bias"), D, k.error)
    if head is not None:
        d["sentence_transformers"] = head
    return d


def _refuse_variants(k: MetadataKeys) -> None:
    """The llama.cpp LFM2 variants lfm2np does not run (named by their key)."""
    window = k.count("attention.sliding_window", required=False, minimum=0)
    if window:
        raise k.error("attention.sliding_window", f"is {window}: llama.cpp then runs every attention layer with a "
                                                  "sliding window (the LFM2.5-Audio detokenizer); lfm2np runs lfm2/"
                                                  "lfm2moe with full causal attention only, so it refuses the file")
    if not k.flag("attention.causal", True) and k.arch != "lfm2":
        raise k.error("attention.causal", f"is false; only lfm2 has a bidirectional variant (LFM2.5-Embedding / "
                                          f"-ColBERT), not {k.arch}")
    scaling = k.text("rope.scaling.type")
    if scaling not in (None, "none"):
        raise k.error("rope.scaling.type", f"is {scaling!r}; only plain RoPE is implemented")


def _check_blocks(k: MetadataKeys, n_layers: int, tensors: Mapping[str, tuple[int, ...]]) -> None:
    """block_count against the ``blk.N`` indices of the tensor names."""
    blocks = {int(m.group(1)) for m in map(_BLOCK.match, tensors) if m}
    if not blocks:
        return
    if blocks != set(range(n_layers)):
        missing = sorted(set(range(n_layers)) - blocks)
        extra = sorted(b for b in blocks if b >= n_layers)
        detail = (f"tensors for blocks up to {max(blocks)}" if extra else
                  f"no tensors for block{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing[:5]))}")
        raise k.error("block_count", f"is {n_layers} but the file has {detail} ({len(blocks)} blocks in all)")


def _check_mixers(k: MetadataKeys, tensors: Mapping[str, tuple[int, ...]], D: int, H: int, hd: int, kv: list[int],
                  L: int) -> None:
    """Per layer: the mixer kind (head_count_kv 0 = conv) and the head counts against the tensors."""
    emb = tensors.get("token_embd.weight")
    if emb is not None and emb[0] != D:
        raise k.error("embedding_length", f"is {D} but token_embd.weight has rows of {emb[0]}")
    hd_key = "attention.key_length" if k.raw("attention.key_length", False) is not None else "attention.head_count"
    hd_why = f"head dim {hd}" + ("" if hd_key.endswith("key_length") else f" = embedding_length {D} / head_count {H}")
    for i, g in enumerate(kv):
        p = f"blk.{i}."
        attn = [n for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_qkv.weight",
                            "attn_q_norm.weight") if p + n in tensors]
        conv = [n for n in ("shortconv.in_proj.weight", "shortconv.conv.weight") if p + n in tensors]
        if g == 0 and attn and not conv:
            raise k.error(f"attention.head_count_kv[{i}]", f"is 0 (a conv layer) but {p}{attn[0]} is an attention "
                                                           "tensor and the block has no shortconv tensors")
        if g and conv and not attn:
            raise k.error(f"attention.head_count_kv[{i}]", f"is {g} (an attention layer) but {p}{conv[0]} is a "
                                                           "short-conv tensor and the block has no attention tensors")
        if g == 0:
            kernel = tensors.get(p + "shortconv.conv.weight")
            if kernel is not None and kernel[0] != L:
                raise k.error("shortconv.l_cache", f"is {L} but {p}shortconv.conv.weight has {kernel[0]} taps")
            continue
        q_norm = tensors.get(p + "attn_q_norm.weight")
        if q_norm is not None and q_norm[0] != hd:
            raise k.error(hd_key, f"gives {hd_why}, but {p}attn_q_norm.weight has {q_norm[0]} entries")
        rows = {n: tensors[p + n][1] for n in ("attn_q.weight", "attn_k.weight", "attn_qkv.weight")
                if p + n in tensors and len(tensors[p + n]) == 2}
        if "attn_q.weight" in rows and rows["attn_q.weight"] != H * hd:
            raise k.error("attention.head_count", f"is {H} ({hd_why}): {H * hd} query rows, but {p}attn_q.weight "
                                                  f"has {rows['attn_q.weight']}")
        if "attn_k.weight" in rows and rows["attn_k.weight"] != g * hd:
            raise k.error(f"attention.head_count_kv[{i}]", f"is {g} ({hd_why}): {g * hd} key rows, but "
                                                           f"{p}attn_k.weight has {rows['attn_k.weight']}")
        if "attn_qkv.weight" in rows and rows["attn_qkv.weight"] != (H + 2 * g) * hd:
            raise k.error(f"attention.head_count_kv[{i}]", f"is {g} and attention.head_count {H} ({hd_why}): "
                                                           f"{(H + 2 * g) * hd} fused q/k/v rows, but "
                                                           f"{p}attn_qkv.weight has {rows['attn_qkv.weight']}")


def _vocab(k: MetadataKeys, meta: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]], D: int) -> int:
    """The vocabulary size: token_embd's rows when the file has them (the keys are checked against them),
    else ``{arch}.vocab_size``, else the token list's length."""
    key = k.count("vocab_size", required=False)
    tokens = meta.get("tokenizer.ggml.tokens")
    n_tokens = tokens[1] if isinstance(tokens, tuple) and len(tokens) == 2 and tokens[0] == "array" else \
        len(tokens) if isinstance(tokens, list) else None
    emb = tensors.get("token_embd.weight")
    rows = emb[1] if emb is not None and len(emb) == 2 else None
    if rows is not None:
        if key is not None and key != rows:
            k.warn("vocab_size", f"is {key} but token_embd.weight has {rows} rows; the model runs with {rows}")
        if n_tokens is not None and n_tokens != rows:
            k.warn("tokenizer.ggml.tokens", f"has {n_tokens} entries but token_embd.weight has {rows} rows (llama.cpp "
                                            f"requires them equal); the model runs with its {rows} rows")
        return rows
    vocab = key if key is not None else n_tokens
    if vocab is None:
        raise k.error("vocab_size", "is missing and there is no token list or embedding to tell the vocabulary size")
    return vocab


def _dense_width(k: MetadataKeys, tensors: Mapping[str, tuple[int, ...]], layers: range, required: bool) -> int | None:
    """The dense FFN width: the ``ffn_gate``/``ffn_up``/``ffn_down`` tensors' when present (``feed_forward_length``
    is checked against them, a contradiction warns), else the key."""
    n = k.count("block_count")
    ff = k.per_layer("feed_forward_length", n, required=required)
    keyed = sorted({ff[i] for i in layers if ff[i]}) if ff is not None else []
    if len(keyed) > 1:
        raise k.error("feed_forward_length", f"differs between dense layers ({keyed}); lfm2np runs one width")
    shapes = {}
    for i in layers:
        for name, axis in (("ffn_gate.weight", 1), ("ffn_up.weight", 1), ("ffn_down.weight", 0)):
            ne = tensors.get(f"blk.{i}.{name}")
            if ne is not None and len(ne) == 2:
                shapes.setdefault(ne[axis], f"blk.{i}.{name}")
    if len(shapes) > 1:
        raise Lfm2npError(f"{k.source}: the dense FFN tensors have different widths "
                          f"({', '.join(f'{t}: {w}' for w, t in sorted(shapes.items()))}); lfm2np runs one width")
    if shapes:
        (width, where), = shapes.items()
        if keyed and keyed[0] != width:
            k.warn("feed_forward_length", f"is {keyed[0]} but the FFN tensors are {width} wide ({where}); the "
                                          f"tensors' width {width} is used")
        return width
    if keyed:
        return keyed[0]
    if required:
        raise k.error("feed_forward_length", "is missing (or 0 for every layer) and no FFN tensor gives the width")
    return None


def _moe(k: MetadataKeys, tensors: Mapping[str, tuple[int, ...]], n_layers: int, D: int) -> dict[str, Any]:
    """The lfm2moe keys: experts, the dense lead, routing switches; checked against the router and experts."""
    E = k.count("expert_count")
    used = k.count("expert_used_count", maximum=E)
    n_dense = k.count("leading_dense_block_count", required=False, default=0, minimum=0, maximum=n_layers)
    gating = k.count("expert_gating_func", required=False, default=2, minimum=0)
    if gating != 2:  # gguf.ExpertGatingFuncType.SIGMOID
        raise k.error("expert_gating_func", f"is {gating}; LFM2-MoE routes with sigmoid (2)")
    fm = k.per_layer("expert_feed_forward_length", n_layers)  # llama.cpp: get_key_or_arr
    keyed = sorted({fm[i] for i in range(n_dense, n_layers)})
    if len(keyed) > 1:
        raise k.error("expert_feed_forward_length", f"differs between MoE layers ({keyed}); lfm2np runs one width")
    Fm = keyed[0] if keyed else max(fm)
    if Fm < 1:
        raise k.error("expert_feed_forward_length", f"is {Fm} for every MoE layer; expected >= 1")
    widths = {}
    for i in range(n_layers):
        p = f"blk.{i}."
        dense = any(p + n in tensors for n in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"))
        moe = [n for n in ("ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight",
                           "ffn_down_exps.weight") if p + n in tensors]
        if i < n_dense and moe and not dense:
            raise k.error("leading_dense_block_count", f"is {n_dense} but block {i} holds {p}{moe[0]} (an MoE layer)")
        if i >= n_dense and dense and not moe:
            raise k.error("leading_dense_block_count", f"is {n_dense} but block {i} has a dense FFN and no experts")
        router = tensors.get(p + "ffn_gate_inp.weight")
        if router is not None and len(router) == 2 and router[1] != E:
            raise k.error("expert_count", f"is {E} but {p}ffn_gate_inp.weight routes to {router[1]} experts")
        for name, w_axis in (("ffn_gate_exps.weight", 1), ("ffn_up_exps.weight", 1), ("ffn_down_exps.weight", 0)):
            ne = tensors.get(p + name)
            if ne is None or len(ne) != 3:
                continue
            if ne[2] != E:
                raise k.error("expert_count", f"is {E} but {p}{name} stacks {ne[2]} experts")
            widths.setdefault(ne[w_axis], p + name)
    if len(widths) > 1:
        raise Lfm2npError(f"{k.source}: the expert tensors have different widths "
                          f"({', '.join(f'{t}: {w}' for w, t in sorted(widths.items()))}); lfm2np runs one width")
    if widths:
        (width, where), = widths.items()
        if width != Fm:
            k.warn("expert_feed_forward_length", f"is {Fm} but the expert tensors are {width} wide ({where}); the "
                                                 f"tensors' width {width} is used")
            Fm = width
    moe_layer = n_dense if n_dense < n_layers else None
    dense_width = _dense_width(k, tensors, range(n_dense), required=False) if n_dense else None
    scale = k.number("expert_weights_scale", required=False, default=1.0, positive=False)
    return dict(
        num_experts=E,
        num_experts_per_tok=used,
        moe_intermediate_size=Fm,
        num_dense_layers=n_dense,
        # llama.cpp's LFM2-MoE graph renormalises the top-k weights (build_moe_ffn(..., norm_w=true, ...)) and
        # scales by expert_weights_scale (0 when absent: no scaling); convert_hf_to_gguf.py writes neither key.
        norm_topk_prob=k.flag("expert_weights_norm", True),
        routed_scaling_factor=f32_decimal(scale or 1.0),
        use_expert_bias=moe_layer is not None and f"blk.{moe_layer}.exp_probs_b.bias" in tensors,
        # the dense layers' width; a file with no dense layer may omit it
        intermediate_size=dense_width or Fm,
    )
