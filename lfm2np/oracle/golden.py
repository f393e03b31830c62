"""Golden vectors for other backends: every operator's inputs, weights and outputs, one file each.

``write_golden(model, ids, out)`` writes to the directory ``out``:

- ``manifest.json``: the config, the ids, the compute dtype, and one entry per operator instance in
  forward order: its file, the function that computes it (an operator of ``lfm2np.ops``; a block, the RoPE
  tables or a whole decoder layer of ``lfm2np.layers``), its scalar parameters (eps, theta, top-k, ...) and the
  names of its inputs, weights and outputs (the outputs: the block's values of the trace schema,
  :func:`lfm2np.trace_names`, below its prefix);
- ``NNN_<name>.safetensors`` per operator: tensors ``input.*``, ``weight.*`` (Hugging Face names) and
  ``output.*``, so one kernel can be tested without running lfm2np or loading the checkpoint;
- ``model.safetensors``: the ids and the full-model logits.

``fmt="npz"`` writes the same arrays as NumPy ``.npz`` files (as the conformance pack holds them), byte for byte
the same for the same values (:func:`save_arrays`). :func:`golden_vectors` computes the arrays without writing
them (a cluster's worker computes, the client writes).

For MoE layers only the experts the ids actually chose are written (with the router), which keeps the
files small for real checkpoints; ``layers`` restricts the layers written.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from safetensors import SafetensorError
from safetensors.numpy import save_file

from .. import schema
from ..errors import Lfm2npError, shown
from ..io.files import overwrites, read_identities
from ..model import Model
from ..ops import ROUTER_NORM_EPS
from .trace import record

FORMAT_VERSION = 2


FORMATS = ("safetensors", "npz")
#: the time stamp of every member of the .npz files written here: the same values make the same bytes
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def save_arrays(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Write ``arrays`` to ``path``, a ``.safetensors`` or an ``.npz`` file (uncompressed, one ``.npy`` member per
    array, fixed time stamps: the same arrays give the same bytes); a failure to write it names the file."""
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
                for name, value in arrays.items():
                    buffer = io.BytesIO()
                    np.lib.format.write_array(buffer, np.ascontiguousarray(value), allow_pickle=False)
                    zf.writestr(zipfile.ZipInfo(f"{name}.npy", _ZIP_TIME), buffer.getvalue())
        else:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    except (OSError, SafetensorError) as e:
        raise Lfm2npError(f"{path}: cannot write ({e.strerror if isinstance(e, OSError) else e})") from None


def _checked_layers(layers: Any, n: int) -> set[int]:
    """``layers`` of :func:`write_golden`: None (all ``n``) or a collection of distinct layer indices in
    ``0 .. n-1``; anything else is an error naming the argument."""
    if layers is None:
        return set(range(n))
    expected = "expected a list of layer indices such as [0, 2] (or None: every layer)"
    if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Iterable):
        raise Lfm2npError(f"layers is {shown(layers)} (of type {type(layers).__name__}); {expected}")
    try:
        items = list(layers)
    except TypeError:  # a 0-d array: iterable by its type, not by its value
        raise Lfm2npError(f"layers is {shown(layers)} (of type {type(layers).__name__}); {expected}") from None
    for i in items:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise Lfm2npError(f"layers holds {shown(i)} (of type {type(i).__name__}); {expected}")
    seen: set[int] = set()
    twice = sorted({int(i) for i in items if int(i) in seen or seen.add(int(i))})
    if twice:
        raise Lfm2npError(f"layers names layer {', '.join(map(str, twice))} more than once; {expected}")
    if any(i < 0 for i in seen):
        raise Lfm2npError(f"layers holds {min(seen)}: layer indices count from 0 (no negative indices); the "
                          f"model has layers 0..{n - 1}")
    bad = sorted(i for i in seen if i >= n)
    if bad:
        raise Lfm2npError(f"layers {bad} do not exist; the model has {n} (0..{n - 1})")
    return seen


def _checked_out(out: Any) -> Path:
    """``out`` of :func:`write_golden`: a path naming a directory, or where one can be created."""
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise Lfm2npError(f"out is {shown(out)}; expected the path of a directory to write the golden files into")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise Lfm2npError(f"out {path} is a file, not a directory; golden vectors are a directory of files")
    ancestor = next((p for p in path.absolute().parents if p.exists()), None)
    if not path.exists() and ancestor is not None and not ancestor.is_dir():
        raise Lfm2npError(f"out {path}: {ancestor} is a file, not a directory")
    return path


def _checked_model(model: Any, ids: Any) -> None:
    if not isinstance(model, Model):
        raise Lfm2npError(f"model must be an lfm2np Model (lfm2np.load); got {type(model).__name__}")
    if model.numerics.round_weights:
        raise Lfm2npError("golden vectors are written from the float32 or float64 model, not the bf16 emulation")
    if model.check_ids(ids).ndim != 1:
        raise Lfm2npError(f"golden vectors are written for one sequence of ids, shape (T,); got shape "
                          f"{np.shape(ids)}")


def write_golden(model: Model, ids: Any, out: "str | os.PathLike[str]", layers: Iterable[int] | None = None,
                 fmt: str = "safetensors") -> Path:
    """Write the golden vectors of ``model`` (float32 or float64) on ``ids`` (T,) into directory ``out`` (created
    if missing): see the module docstring. ``layers`` (a list of distinct layer indices; None: every layer)
    restricts the layers written; ``fmt`` is "safetensors" or "npz". Every argument is checked before anything is
    computed or created: an :class:`Lfm2npError` names the one at fault. Returns ``out`` as a Path."""
    _checked_model(model, ids)
    _checked_layers(layers, model.config.num_hidden_layers)
    out = _checked_out(out)
    source = model.params.describe().get("path")  # never write over what the model reads (its weights are read lazily)
    why = None if source is None else overwrites(out, *read_identities(source), into=True)
    if why is not None:
        raise Lfm2npError(f"out {out}: {why.replace('this command reads', 'the model reads')}; choose another "
                          f"directory")
    if fmt not in FORMATS:
        raise Lfm2npError(f"fmt is {shown(fmt)}; expected one of {', '.join(FORMATS)}")
    return save_golden(golden_vectors(model, ids, layers), out, fmt)


def save_golden(vectors: "tuple[list[tuple[str, dict[str, np.ndarray]]], dict[str, Any]]",
                out: "str | os.PathLike[str]", fmt: str = "safetensors") -> Path:
    """Write what :func:`golden_vectors` computed into directory ``out`` (created if missing) as ``fmt`` files:
    each operator's ``NNN_<name>.<fmt>``, ``model.<fmt>`` and ``manifest.json`` naming them."""
    files, manifest = vectors
    out = _checked_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Lfm2npError(f"out {out}: cannot create the directory ({e.strerror or e})") from None
    for stem, arrays in files:
        save_arrays(arrays, out / f"{stem}.{fmt}")
    manifest = {**manifest, "operators": [{**op, "file": f"{op['file']}.{fmt}"} for op in manifest["operators"]]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def golden_task(model: Model, payload: "tuple[Any, Iterable[int] | None]"):
    """:func:`golden_vectors` of ``payload = (ids, layers)``: one prompt of ``lfm2np golden --prompts`` (a task a
    cluster's worker runs)."""
    return golden_vectors(model, *payload)


def golden_vectors(model: Model, ids: Any, layers: Iterable[int] | None = None) \
        -> tuple[list[tuple[str, dict[str, np.ndarray]]], dict[str, Any]]:
    """The golden vectors of ``model`` on ``ids``, computed, not written: ``(files, manifest)``, each file a
    ``(stem, arrays)`` pair (the model's logits last, as ``model``) and the manifest's operators naming their
    file by its stem (:func:`save_golden` adds the format's suffix)."""
    _checked_model(model, ids)
    c, W = model.config, model.params
    wanted = _checked_layers(layers, c.num_hidden_layers)
    logits, trace = record(model, ids)
    t = trace.tensors
    ids = np.asarray(trace.meta["ids"], dtype=np.int64)
    ops_written: list[dict[str, Any]] = []
    files: list[tuple[str, dict[str, np.ndarray]]] = []

    def write(name: str, function: str, params: dict, inputs: dict, weights: dict, outputs: dict) -> None:
        stem = f"{len(ops_written):03d}_{name}"
        arrays = {**{f"input.{k}": v for k, v in inputs.items()}, **{f"weight.{k}": v for k, v in weights.items()},
                  **{f"output.{k}": v for k, v in outputs.items()}}
        files.append((stem, arrays))
        qualified = function if "." in function else f"lfm2np.ops.{function}"  # the layer and MoE: lfm2np.layers
        ops_written.append({"name": name, "file": stem, "function": qualified, "params": params,
                            "inputs": list(inputs), "weights": list(weights), "outputs": list(outputs)})

    positions = np.arange(len(ids))
    for kind in schema.attention_kinds(c):
        r = f"model.rotary_emb.{kind}."
        write(r[:-1], "lfm2np.layers.rope", {"kind": kind, "rope_theta": c.rope(kind).theta,
                                             "rotated_pairs": c.rotated_pairs(kind), "head_dim": c.head_dim,
                                             "rope_in_float32": c.rope_in_float32},
              {"positions": positions}, {}, {k: t[r + k] for k in ("inv_freq", "cos", "sin")})
    write("model.embed_tokens", "embed", {}, {"ids": ids}, {schema.HEAD_TIED: W[schema.HEAD_TIED]},
          {"hidden": t["model.embed_tokens"]})
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h_in = t["model.embed_tokens"] if i == 0 else t[f"model.layers.{i - 1}"]
        if i not in wanted:
            continue
        names = schema.layer_names(c, i)
        steps = [step for step, _ in schema.layer_steps(c, i)]

        def outputs(block: str) -> dict[str, np.ndarray]:  # the block's schema values, by their step in it
            return {step[len(block):]: t[p + step] for step in steps if step.startswith(block)}

        def norm(role: str, x: np.ndarray) -> None:
            write(p + role, "rms_norm", {"eps": c.norm_eps}, {"x": x}, {names[role]: W[names[role]]},
                  {"y": t[p + role]})

        norm("operator_norm", h_in)
        mixer_weights = {n: W[n] for n in schema.layer_names(c, i, schema.MIXER_PARTS).values()}
        if c.is_attention(i):
            kind = c.layer_types[i]
            r = f"model.rotary_emb.{kind}."
            write(p + "self_attn", "lfm2np.layers.attention_block",
                  {"eps": c.norm_eps, "window": c.window(i), "head_dim": c.head_dim,
                   "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                   "rope_in_float32": c.rope_in_float32, "causal": c.causal},
                  {"x": t[p + "operator_norm"], "cos": t[r + "cos"], "sin": t[r + "sin"]}, mixer_weights,
                  outputs("self_attn."))
            mixer_out = t[p + "self_attn.out_proj"]
        else:
            write(p + "conv", "lfm2np.layers.short_conv", {"conv_L_cache": c.conv_L_cache, "causal": c.causal},
                  {"x": t[p + "operator_norm"]}, mixer_weights, outputs("conv."))
            mixer_out = t[p + "conv.out_proj"]
        if "post_operator_norm" in names:  # LFM3's sandwich norm
            norm("post_operator_norm", mixer_out)
        norm("ffn_norm", t[p + "mixer_residual"])
        f = p + "feed_forward."
        if c.is_moe_layer(i):
            chosen = sorted(set(t[f + "selected_experts"].ravel().tolist()))
            weights = {names[r]: W[names[r]] for r in ("gate", "expert_bias") if r in names}
            for e in chosen:
                weights.update({n: W[n] for n in schema.expert_names(i, e)})
            write(f[:-1], "lfm2np.layers.moe_block",
                  {"num_experts": c.num_experts, "num_experts_per_tok": c.num_experts_per_tok,
                   "norm_topk_prob": c.norm_topk_prob, "router_norm_eps": ROUTER_NORM_EPS,
                   "routed_scaling_factor": c.routed_scaling_factor, "experts_written": chosen},
                  {"x": t[p + "ffn_norm"]}, weights, outputs("feed_forward."))
        else:
            write(f[:-1], "lfm2np.layers.swiglu", {}, {"x": t[p + "ffn_norm"]},
                  {names[r]: W[names[r]] for r in ("w1", "w3", "w2")}, outputs("feed_forward."))
        if "post_ffn_norm" in names:
            norm("post_ffn_norm", t[f + "output"])
        write(p[:-1], "lfm2np.layers.decoder_layer", {"window": c.window(i)}, {"h": h_in}, {}, {"h": t[p[:-1]]})
    last = f"model.layers.{c.num_hidden_layers - 1}"
    write("model.embedding_norm", "rms_norm", {"eps": c.norm_eps}, {"x": t[last]},
          {"model.embedding_norm.weight": W["model.embedding_norm.weight"]}, {"y": t["model.embedding_norm"]})
    head = schema.head_name(c)
    write("lm_head", "lm_head", {"tied": c.tie_word_embeddings}, {"h": t["model.embedding_norm"]}, {head: W[head]},
          {"logits": logits})
    files.append(("model", {"ids": ids, "logits": logits}))
    manifest = {"format": FORMAT_VERSION, "dtype": model.numerics.name, "model": c.source, "config": c.to_dict(),
                "ids": ids.tolist(), "layers": sorted(wanted), "operators": ops_written,
                "note": "tensors are (T, ...) for one sequence; weights under Hugging Face names, (out, in)"}
    return files, manifest
