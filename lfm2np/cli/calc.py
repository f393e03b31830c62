"""``lfm2np params`` and ``lfm2np memory``: the calculators of :mod:`lfm2np.calc` on the command line.

MODEL is a preset name (``LFM2-24B-A2B``), a ``config.json``, a checkpoint directory or a ``.gguf`` file (its
config from its metadata checked against its tensor shapes; ``memory`` reads its real tensor types). The default output is
a readable table; ``--json`` prints one JSON object whose field names are a stable interface:

- params: total, active, active_without_embedding, embedding, breakdown (plus lm_head, total_without_embedding,
  supported_context, supported_context_from, unconfirmed)
- memory: quant, weights_bytes, kv_bytes_per_token, kv_cache_bytes, conv_state_bytes, total_bytes, fits
  (plus compute_bytes, attention_only_kv_cache_bytes, supported_context, supported_context_from, notes, and
  with a budget max_context: the longest context that fits it, at most the supported one; and the inputs;
  with ``--image WxH``, images: per image its layout, tokens, sequence_tokens and kv_bytes, and the totals)

Tables stay within 100 columns (the last column wraps).

The supported context is the model card's where it is known (LFM2's configs allow 128,000 positions, the
cards state 32,768), else the config's ``max_position_embeddings``; a ``--context`` beyond it is reported.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from .. import calc, presets
from ..calc import quant
from ..embedded import EMBEDDED as EMBEDDED_NAME, embedded_model_path
from ..errors import Lfm2npError
from ..io.gguf_meta import gguf_architecture
from ..calc.images import image_costs, parse_image_size, processor_settings
from ..loading import is_gguf, load_config
from .common import Subparsers, positive_int, size
from .options import add_layers_argument, add_model_argument, check_layers

WIDTH = 100  #: the widest line of a table or a note


def _n(x: int) -> str:
    return f"{x:,}"


def _count(n: int, word: str) -> str:
    """``1 layer``, ``2 layers``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _table(rows: list[tuple[str, ...]], width: int = WIDTH) -> str:
    """Columns padded to their widest cell, numbers right-aligned; the last column left-aligned and wrapped so
    that no line passes ``width`` (its continuation lines start under it)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:])]
        lead = "  ".join(cells) + "  "
        tail = textwrap.wrap(r[-1], max(20, width - len(lead))) or [""]
        lines.append((lead + tail[0]).rstrip())
        lines += [" " * len(lead) + more for more in tail[1:]]
    return "\n".join(lines)


def _wrapped(text: str) -> str:
    """A line of prose within :data:`WIDTH` columns, continued with an indent."""
    return "\n".join(textwrap.wrap(text, WIDTH, subsequent_indent="  ", break_on_hyphens=False))


def _context_notes(c) -> dict[str, Any]:
    n, source = presets.supported_context(c)
    return {"supported_context": n, "supported_context_from": source, "unconfirmed": list(presets.unconfirmed(c))}


def _context_line(c, notes: dict[str, Any]) -> str:
    line = f"supported context: {_n(notes['supported_context'])} tokens ({notes['supported_context_from']}"
    if notes["supported_context_from"] != "config" and c.max_position_embeddings != notes["supported_context"]:
        line += f"; the config allows {_n(c.max_position_embeddings)} positions"
    return line + ")"


def _name(c) -> str:
    """What the model is called: the embedded model by its name (not its path inside the installation)."""
    source = c.source or "model"
    try:
        if Path(source).resolve().parent == embedded_model_path().resolve():
            return f"embedded {EMBEDDED_NAME}"
    except (OSError, ValueError, Lfm2npError):
        pass
    return source


def _describe(c) -> str:
    kinds = f"{len(c.conv_layers)} conv + {len(c.attention_layers)} attention"
    moe = (f", {_count(len(c.moe_layers), 'MoE layer')} ({c.num_experts} experts, top-{c.num_experts_per_tok})"
           if c.is_moe else "")
    return (f"{_name(c)} ({c.model_type}): {_count(c.num_hidden_layers, 'layer')} ({kinds}){moe}, "
            f"D={c.hidden_size}, V={c.vocab_size}")


# --------------------------------------------------------------------------------- params
def _cmd_params(args: argparse.Namespace) -> int:
    c = load_config(args.model, mmproj=args.mmproj)
    layers = check_layers(args.layers, c.num_hidden_layers) if args.layers else args.layers
    p = calc.param_counts(c)
    card = presets.MODEL_CARD_PARAMS.get(presets.canonical(c.source or "") or "")
    notes = _context_notes(c)
    if args.json:
        out: dict[str, Any] = {"model": c.source, **p, **notes}
        if card is not None:
            out["model_card"] = card
        print(json.dumps(out, indent=2))
        return 0
    b = p["breakdown"]
    k = b["by_kind"]
    total = p["total"]

    def row(name: str, n: int, extra: str = "") -> tuple[str, str, str, str]:
        return (name, _n(n), f"{100 * n / total:.2f}%", extra)

    rows = [("part", "parameters", "share", "")]
    rows.append(row("embedding" + (" (tied LM head)" if not b["lm_head"] else ""), b["embedding"]))
    if b["lm_head"]:
        rows.append(row("LM head (untied)", b["lm_head"]))
    rows.append(row(f"conv mixers ({_count(k['conv_mixer']['layers'], 'layer')})", k["conv_mixer"]["params"]))
    rows.append(row(f"attention mixers ({_count(k['attention_mixer']['layers'], 'layer')})",
                    k["attention_mixer"]["params"]))
    if k["dense_ffn"]["layers"]:
        rows.append(row(f"dense FFN ({_count(k['dense_ffn']['layers'], 'layer')})", k["dense_ffn"]["params"]))
    if k["moe_ffn"]["layers"]:
        rows.append(row(f"MoE FFN ({_count(k['moe_ffn']['layers'], 'layer')})", k["moe_ffn"]["params"],
                        f"active {_n(k['moe_ffn']['active'])}"))
    rows.append(row(f"norms ({k['norms']['count']})", k["norms"]["params"]))
    if b["dense_head"]:
        rows.append(row(f"dense head ({c.hidden_size} -> {c.dense_out})", b["dense_head"]))
    if c.vision is not None:  # LFM2-VL: the vision side apart
        rows.append(row("text model", p["text"]))
        rows.append(row(f"vision tower ({_count(c.vision.num_hidden_layers, 'layer')})", p["vision_tower"]))
        rows.append(row("projector", p["projector"]))
    rows.append(row("total", total))
    rows.append(row("total without embedding", p["total_without_embedding"]))
    rows.append(row("active per token", p["active"]))
    rows.append(row("active without embedding", p["active_without_embedding"]))
    print(_wrapped(_describe(c)))
    print(_table(rows))
    if card is not None:
        print(f"model card: {card if isinstance(card, str) else _n(card)}")
    print(_context_line(c, notes))
    if notes["unconfirmed"]:
        print(_wrapped(f"unconfirmed (third-party copies of the config): {', '.join(notes['unconfirmed'])}"))
    if layers is not None:  # --layers: every layer ([]), or those given
        lrows = [("layer", "kind", "mixer", "ffn", "ffn active", "total")]
        for layer in b["layers"]:
            if layers and layer["index"] not in layers:
                continue
            f = layer["ffn"]
            lrows.append((str(layer["index"]), layer["kind"] + (" +moe" if f["kind"] == "moe" else ""),
                          _n(layer["mixer_total"]), _n(f["total"]), _n(f["active"]), _n(layer["total"])))
        print()
        print(_table([r[:-1] + (r[-1].rjust(max(len(x[-1]) for x in lrows)),) for r in lrows]))
    return 0


# --------------------------------------------------------------------------------- memory
def _memory_notes(c, m: dict[str, Any], args: argparse.Namespace, notes: dict[str, Any]) -> list[str]:
    """What a reader of the table must know: context beyond the supported one, llama.cpp's limits."""
    out = []
    if args.context > notes["supported_context"]:
        out.append(f"a context of {_n(args.context)} is beyond the {_n(notes['supported_context'])} tokens the "
                   f"{notes['supported_context_from']} gives as supported")
    if args.no_flash_attn and m["kv_type"] in calc.KV_TYPES and quant.GGML_BLOCK[calc.KV_TYPES[m["kv_type"]]][0] > 1:
        out.append(f"llama.cpp refuses a quantised V cache ({m['kv_type']}) without flash attention (\"V cache "
                   f"quantization requires flash_attn\"): run it with flash attention (-fa), or size --kv-type f16")
    if gguf_architecture(c) is None and m["quant"] not in calc.DTYPE_BYTES:  # LFM3: no llama.cpp graph
        out.append("llama.cpp has no LFM3 architecture yet (as pinned here: llama-cpp-python 0.3.36), so no "
                   "llama.cpp can write or run this GGUF; the sizes apply llama-quantize's LFM2 rules to LFM3's "
                   "tensors")
    if args.quant and args.quant.strip().upper() in quant.FILE_TYPE_ALIASES:
        out.append(f"{args.quant.strip()} is llama-quantize's alias of {m['quant']}")
    return out


def _budget_lines(c, m: dict[str, Any], args: argparse.Namespace, quant_arg: str, budget: int,
                  notes: dict[str, Any]) -> list[str]:
    """Whether the requested context fits the budget, and the longest supported context that does (or what
    does not fit when none does)."""
    fb = calc.format_bytes
    total, limit = m["total_bytes"], notes["supported_context"]
    seqs = _count(args.parallel, "sequence")
    lines = [f"budget {args.budget[0].strip()} = {fb(budget)}"]
    at = f"at the requested context ({_n(args.context)} tokens x {seqs})"
    lines.append(f"  {at}: fits, {fb(budget - total)} to spare" if m["fits"] else
                 f"  {at}: does NOT fit, {fb(total - budget)} short")
    n = m["max_context"]
    if n == limit:
        lines.append(f"  longest supported context that fits: {_n(n)} tokens (the whole supported context)")
    elif n > 0:
        lines.append(f"  longest supported context that fits: {_n(n)} tokens (of the {_n(limit)} supported)")
    else:
        w = m["weights_bytes"]
        if w > budget:
            what = f"the weights alone ({fb(w)}) are {fb(w - budget)} over it"
        else:
            least = calc.memory(c, quant_arg, context=1, parallel=args.parallel, kv_type=args.kv_type,
                                chunk=args.chunk, flash_attention=not args.no_flash_attn,
                                fuse_qkv=args.fuse_qkv)["total_bytes"]
            what = (f"the weights, conv state and compute buffer need {fb(least)} at the shortest context, "
                    f"{fb(least - budget)} over it")
        lines.append(_wrapped(f"  no context fits the budget: {what} (a smaller --quant or a larger budget)"))
    return lines


def _cmd_memory(args: argparse.Namespace) -> int:
    if args.quant is not None and not args.quant.strip():
        raise Lfm2npError("--quant is empty; give a type such as Q4_K_M, Q8_0 or bfloat16")
    quant_arg = args.quant or "Q4_K_M"
    if is_gguf(args.model):  # a GGUF file: its config and its real tensor types
        if args.quant is not None:
            raise Lfm2npError(f"--quant {args.quant} does not apply to {args.model}: its own tensor types are used")
        c = load_config(args.model, mmproj=args.mmproj)
        quant_arg = args.model
    elif args.mmproj is not None:
        load_config(args.model, mmproj=args.mmproj)  # raises: an mmproj goes with a text GGUF
    else:
        c = load_config(args.model)
    budget = args.budget[1] if args.budget is not None else None
    if args.fuse_qkv and is_gguf(args.model):
        raise Lfm2npError(f"--fuse-qkv does not apply to {args.model}: its own tensors (fused or not) are read")
    m = calc.memory(c, quant_arg, context=args.context, parallel=args.parallel, kv_type=args.kv_type,
                    chunk=args.chunk, flash_attention=not args.no_flash_attn, budget=budget, fuse_qkv=args.fuse_qkv,
                    mmproj=args.mmproj)
    if args.fuse_qkv:
        m["fuse_qkv"] = True
    full = calc.attention_only(c)
    m["attention_only_kv_cache_bytes"] = calc.kv_cache_bytes(full, args.context, args.parallel, args.kv_type)
    notes = _context_notes(c)
    m.update(notes)
    if budget is not None:
        m["max_context"] = calc.max_context(c, quant_arg, budget, parallel=args.parallel, kv_type=args.kv_type,
                                            chunk=args.chunk, flash_attention=not args.no_flash_attn,
                                            fuse_qkv=args.fuse_qkv, limit=notes["supported_context"],
                                            mmproj=args.mmproj)
    m["notes"] = _memory_notes(c, m, args, notes)
    if args.image:
        processor, where = processor_settings(args.model, args.mmproj)
        m["images"] = dict(image_costs(c, args.image, processor, args.kv_type), settings=where)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    fb = calc.format_bytes
    q = m["quant"]
    what = (f"GGUF {q} tensor data" if q in quant.FILE_TYPES else
            f"tensor data of {q} (its real types)" if q.lower().endswith(".gguf") else f"all {q}")
    seqs = _count(args.parallel, "sequence")
    rows = [("item", "bytes", "size", "how")]
    rows.append(("weights", _n(m["weights_bytes"]), fb(m["weights_bytes"]), what))
    if args.mmproj is not None:  # llama.cpp's pair: the vision side apart, within the weights
        v = m["mmproj_weights_bytes"]
        rows[-1] = rows[-1][:3] + (f"tensor data of {q} and of {args.mmproj} (their real types)",)
        rows.append(("  of which vision", _n(v), fb(v), "the mmproj's vision tower and projector"))
    # kv_bytes_per_token already sums K and V over the full-attention layers
    kind = "full-attention layer" if c.sliding_layers else "attention layer"
    how = f"{_n(m['kv_bytes_per_token'])} B/token ({_count(len(c.full_attention_layers), kind)}) x {_n(args.context)}"
    if c.sliding_layers:  # sliding-window layers keep at most their window
        kept = min(args.context, c.sliding_window)
        per_position = calc.sliding_kv_bytes(c, 1, args.kv_type) // len(c.sliding_layers)  # one layer's K and V
        how += f" + {_count(len(c.sliding_layers), 'sliding layer')} x {_n(kept)} positions x {_n(per_position)} B"
    rows.append(("KV cache", _n(m["kv_cache_bytes"]), fb(m["kv_cache_bytes"]), f"{how} x {seqs}, {m['kv_type']}"))
    rows.append(("conv state", _n(m["conv_state_bytes"]), fb(m["conv_state_bytes"]),
                 f"{_count(len(c.conv_layers), 'conv layer')} x {c.conv_L_cache - 1} x {c.hidden_size} f32 x {seqs}"))
    rows.append(("compute buffer", _n(m["compute_bytes"]), fb(m["compute_bytes"]),
                 f"estimate, {min(args.chunk, args.context)}-token chunk, "
                 f"flash attention {'on' if m['flash_attention'] else 'off'}"))
    rows.append(("total", _n(m["total_bytes"]), fb(m["total_bytes"]), ""))
    print(_wrapped(f"{_describe(c)}; context {_n(args.context)} x {seqs}"))
    print(_table(rows))
    saved = m["attention_only_kv_cache_bytes"] - m["kv_cache_bytes"] - m["conv_state_bytes"]
    print(_wrapped(f"all-attention equivalent KV cache: {fb(m['attention_only_kv_cache_bytes'])} "
                   f"(the hybrid saves {fb(saved)})"))
    tokenizer = "~2.4 MB for LFM2's 65,536 tokens" if c.vocab_size == 65536 else "its size not modelled"
    print(_wrapped(f"not counted: GGUF key/value metadata (the tokenizer: {tokenizer}), runtime and OS overhead"))
    print(_context_line(c, notes))
    for note in m["notes"]:
        print(_wrapped(f"note: {note}"))
    if budget is not None:
        print("\n".join(_budget_lines(c, m, args, quant_arg, budget, notes)))
    if args.image:
        print("\n".join(_image_lines(m["images"], args)))
    return 0


def _image_lines(costs: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The images' rows: layout, image tokens, prompt positions and their KV cache."""
    fb = calc.format_bytes
    rows = [("image", "resized / tiles", "image tokens", "positions", f"KV ({args.kv_type})")]
    for i in costs["images"]:
        tiles = f"{i['tiles'][0]}x{i['tiles'][1]} tiles of {costs['tile_size']}" if i["tiles"] else "one unit"
        tiles += " + thumbnail" if i["thumbnail"] else ""
        rows.append((f"{i['width']}x{i['height']}", f"{i['resized'][0]}x{i['resized'][1]}, {tiles}",
                     _n(i["tokens"]), _n(i["sequence_tokens"]), fb(i["kv_bytes"])))
    rows.append(("total", "", _n(costs["image_tokens"]), _n(costs["sequence_tokens"]), fb(costs["kv_bytes"])))
    lines = ["", _table(rows), _wrapped(f"processor settings: {costs['settings']}; positions: the image tokens and "
                                        f"their markers, each {_n(costs['kv_bytes_per_token'])} B of KV cache")]
    if costs["sequence_tokens"] > args.context:
        lines.append(_wrapped(f"note: the images alone take {_n(costs['sequence_tokens'])} positions, more than "
                              f"the context of {_n(args.context)}"))
    return lines


def _image_size(text: str) -> tuple[int, int]:
    try:
        return parse_image_size(text)
    except Lfm2npError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _budget(text: str) -> tuple[str, int]:
    """``--memory-budget`` of ``memory``: the text as given and its number of bytes (:func:`common.size`)."""
    return text, size(text)


def add_mmproj_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mmproj", metavar="FILE", default=None,
                   help="LFM2-VL from llama.cpp's pair: MODEL is the text GGUF, FILE its mmproj GGUF")


def register(sub: Subparsers) -> None:
    """Add the ``params`` and ``memory`` subcommands."""
    p = sub.add_parser("params", help="parameter counts: breakdown, total and active per token",
                       description="Exact parameter counts from the config (no weights needed).")
    add_model_argument(p, "preset name, config.json, checkpoint directory, .gguf file (its metadata, checked "
                       "against its tensor shapes) or 'embedded'")
    p.add_argument("--json", action="store_true", help="print JSON (fields: total, active, "
                   "active_without_embedding, embedding, breakdown)")
    add_layers_argument(p, "also print one row per layer, for these layers")
    add_mmproj_argument(p)
    p.set_defaults(func=_cmd_params)

    m = sub.add_parser("memory", help="memory to run a model: weights, KV cache, conv state, compute",
                       description="Weights per dtype or GGUF file type (llama.cpp's per-tensor rules), KV cache, "
                                   "conv state and a compute-buffer estimate; whether it fits a budget.")
    add_model_argument(m, "preset name, config.json, checkpoint directory, a .gguf file (its real tensor types) "
                       "or 'embedded'")
    m.add_argument("--quant", default=None,
                   help="float32, float16, bfloat16 or a GGUF file type: " + ", ".join(quant.FILE_TYPES)
                   + " (llama-quantize's Q3_K, Q4_K, Q5_K are Q3_K_M, Q4_K_M, Q5_K_M; default Q4_K_M)")
    m.add_argument("--context", "-c", type=positive_int, default=4096, metavar="N",
                   help="tokens per sequence (default 4096)")
    m.add_argument("--parallel", type=positive_int, default=1, help="parallel sequences (default 1)")
    m.add_argument("--kv-type", default="f16", help="KV cache type: " + ", ".join(calc.KV_TYPES) + " (default f16)")
    m.add_argument("--chunk", type=positive_int, default=512, help="prefill chunk (llama.cpp n_ubatch, default 512)")
    m.add_argument("--no-flash-attn", action="store_true", help="count the attention score matrix")
    m.add_argument("--memory-budget", "--budget", dest="budget", type=_budget, metavar="SIZE",
                   help="RAM budget with its unit: 32G = 32GiB (2^30 bytes each), 32GB (10^9); a bare number is "
                        "refused")
    m.add_argument("--fuse-qkv", action="store_true", help="a file converted with convert_hf_to_gguf.py "
                   "--fuse-qkv (one attn_qkv per attention layer, typed as attn_v)")
    m.add_argument("--image", action="append", type=_image_size, metavar="WxH",
                   help="an image of W x H pixels in the prompt (repeat for several): its image tokens by the "
                        "processor's layout (MODEL's processor config, else LFM2-VL's) and their KV cache")
    add_mmproj_argument(m)
    m.add_argument("--json", action="store_true", help="print JSON (fields: quant, weights_bytes, "
                   "kv_bytes_per_token, kv_cache_bytes, conv_state_bytes, total_bytes, fits, notes; images "
                   "with --image; mmproj_weights_bytes with --mmproj)")
    m.set_defaults(func=_cmd_memory)
