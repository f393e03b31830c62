"""The oracle: named traces of every intermediate, and comparing two traces to find the first divergence.

Names are the Hugging Face module path plus the step, in forward order, e.g.::

    model.embed_tokens
    model.layers.3.operator_norm
    model.layers.3.conv.{in_proj, b_gate, c_gate, x, bx, conv_out, y, out_proj}
    model.layers.3.self_attn.{q_proj, k_proj, v_proj, q_normed, k_normed, q_rope, k_rope, attn_out, out_proj}
    model.layers.3.mixer_residual                  (h + mixer output)
    model.layers.3.ffn_norm
    model.layers.3.feed_forward.{w1, w3, act, w2}  (dense SwiGLU)
    model.layers.3.feed_forward.{router_logits, selected_experts, routing_weights}  (MoE)
    model.layers.3.feed_forward.output
    model.layers.3                                 (the residual stream after the layer)
    model.embedding_norm
    lm_head                                        (the logits)

Each name may carry an alias: the name llama.cpp's graph callback gives the same tensor (its LFM2 graph
names some after the Hugging Face modules, others generically: ``Qcur-3``, ``ffn_moe_logits-3``,
``l_out-3``). Tensors are ``(T, ...)`` for one sequence of T tokens. Recording costs nothing when off: the
forward pass calls the recorder only when one is given.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import Lfm2npError

# ------------------------------------------------------------------------------ aliases
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
#: llama.cpp's LFM2 graph (src/models/lfm2.cpp) names tensors with a literal "{}" where the layer goes, and its
#: graph callback appends "-{layer}" (ggml_format_name(cur, "%s-%d", name, il)): "model.layers.{}.conv.conv-3".
#: Checked against real dumps (tools/dump_llama_cpp_trace.py, llama-cpp-python 0.3.36). The FFN norm's output
#: is named "model.layers.{}.ffn_out" when it is computed (it was "...ffn_norm" when the graph was built: a
#: reshape of it is "model.layers.{}.ffn_norm-3 (reshaped)"), and the projections are "Qcur"/"Kcur"/"Vcur".
_LLAMA_HF_STYLE = {"operator_norm": "operator_norm", "conv.in_proj": "conv.in_proj", "conv.conv_out": "conv.conv",
                   "conv.out_proj": "conv.out_proj", "self_attn.q_normed": "self_attn.q_layernorm",
                   "self_attn.k_normed": "self_attn.k_layernorm", "self_attn.out_proj": "self_attn.out_proj",
                   "ffn_norm": "ffn_out"}
#: ... and the generic graph helpers name the rest "<name>-{layer}" (build_attn, build_ffn, build_moe_ffn).
#: Dense FFN layers have no name for their output (the down projection); MoE layers call it ffn_moe_out.
_LLAMA_GENERIC = {"self_attn.q_proj": "Qcur", "self_attn.k_proj": "Kcur", "self_attn.v_proj": "Vcur",
                  "self_attn.attn_out": "kqv_out", "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up",
                  "feed_forward.act": "ffn_swiglu", "feed_forward.output": "ffn_moe_out"}
_LLAMA_MOE = {"feed_forward.router_logits": "ffn_moe_logits", "feed_forward.selected_experts": "ffn_moe_topk",
              "feed_forward.routing_weights": "ffn_moe_weights_norm"}


def llama_cpp_alias(name: str) -> str | None:
    """The name llama.cpp's graph callback gives the same tensor, where one exists."""
    if name == "model.embed_tokens":
        return name
    if name == "model.embedding_norm":
        return "result_norm"
    if name == "lm_head":
        return "result_output"
    m = re.fullmatch(r"model\.layers\.(\d+)", name)
    if m:
        return f"l_out-{m.group(1)}"
    m = _LAYER.match(name)
    if not m:
        return None
    i, step = m.groups()
    if step in _LLAMA_HF_STYLE:
        return f"model.layers.{{}}.{_LLAMA_HF_STYLE[step]}-{i}"
    if step in _LLAMA_GENERIC:
        return f"{_LLAMA_GENERIC[step]}-{i}"
    if step in _LLAMA_MOE:
        return f"{_LLAMA_MOE[step]}-{i}"
    return None


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


# -------------------------------------------------------------------------------- Trace
class Trace:
    """Named intermediates of one forward pass, in forward order."""

    def __init__(self, tensors: "dict[str, np.ndarray] | None" = None, meta: "dict[str, Any] | None" = None):
        self.tensors: dict[str, np.ndarray] = dict(tensors or {})
        self.meta: dict[str, Any] = dict(meta or {})

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def __len__(self) -> int:
        return len(self.tensors)

    def names(self) -> list[str]:
        return list(self.tensors)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per tensor: shape, dtype, mean, rms, max |x|, and the llama.cpp alias."""
        out = {}
        for name, a in self.tensors.items():
            f = np.asarray(a, dtype=np.float64)
            out[name] = {"shape": list(a.shape), "dtype": str(a.dtype),
                         "mean": float(f.mean()) if f.size else 0.0,
                         "rms": float(np.sqrt(np.mean(f * f))) if f.size else 0.0,
                         "max_abs": float(np.max(np.abs(f))) if f.size else 0.0,
                         "llama_cpp": llama_cpp_alias(name)}
        return out

    def save(self, path: "str | os.PathLike[str]") -> Path:
        """Write ``path`` (safetensors, tensors in forward order) and ``path`` with ``.json`` (the summary)."""
        from safetensors.numpy import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        order = list(self.tensors)
        save_file({n: np.ascontiguousarray(a) for n, a in self.tensors.items()}, str(path),
                  metadata={"lfm2np_trace": "1", "order": json.dumps(order), "meta": json.dumps(self.meta)})
        path.with_suffix(".json").write_text(json.dumps({"meta": self.meta, "tensors": self.summary()}, indent=1))
        return path

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "Trace":
        """Read a trace written by :meth:`save`, or any safetensors file of named tensors (e.g. a dump from
        transformers or llama.cpp whose names are trace names or llama.cpp aliases)."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                order = json.loads(meta["order"]) if "order" in meta else keys
                tensors = {k: f.get_tensor(k) for k in order}
        except Exception as e:  # safetensors raises its own error types
            raise Lfm2npError(f"{path}: not a readable trace ({e})") from None
        return cls(tensors, json.loads(meta.get("meta", "{}")))


#: transformers forward-hook captures (module path + ".output", or a function-level step) -> trace names.
_FROM_TRANSFORMERS = [
    (r"model\.embed_tokens\.output", "model.embed_tokens"),
    (r"model\.layers\.(\d+)\.operator_norm\.output", r"model.layers.\1.operator_norm"),
    (r"model\.layers\.(\d+)\.conv\.in_proj\.output", r"model.layers.\1.conv.in_proj"),
    (r"model\.layers\.(\d+)\.conv\.(bx|conv_out)", r"model.layers.\1.conv.\2"),
    (r"model\.layers\.(\d+)\.conv\.output", r"model.layers.\1.conv.out_proj"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k)_layernorm\.output", r"model.layers.\1.self_attn.\2_normed"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_rope|k_rope|attn_out)", r"model.layers.\1.self_attn.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.output", r"model.layers.\1.self_attn.out_proj"),
    (r"model\.layers\.(\d+)\.ffn_norm\.output", r"model.layers.\1.ffn_norm"),
    (r"model\.layers\.(\d+)\.feed_forward\.gate\.(router_logits|selected_experts|routing_weights)",
     r"model.layers.\1.feed_forward.\2"),
    (r"model\.layers\.(\d+)\.feed_forward\.output", r"model.layers.\1.feed_forward.output"),
    (r"model\.layers\.(\d+)\.output", r"model.layers.\1"),
    (r"model\.embedding_norm\.output", "model.embedding_norm"),
    (r"lm_head\.output", "lm_head"),
]


def from_transformers(captured: "dict[str, np.ndarray]") -> Trace:
    """A trace from tensors captured with forward hooks on a transformers LFM2 model (keys: module path +
    ``.output``, as ``tools/make_fixtures.py`` and ``tools/dump_transformers_trace.py`` record them)."""
    tensors = {}
    for key, value in captured.items():
        for pattern, name in _FROM_TRANSFORMERS:
            if re.fullmatch(pattern, key):
                tensors[re.sub(pattern, name, key)] = value
                break
    return Trace(tensors, {"source": "transformers"})


def record(model: Any, ids: Any, patterns: Sequence[str] | None = None) -> tuple[np.ndarray, Trace]:
    """Run ``model`` on one sequence ``ids`` (T,) and record the intermediates whose names match one of
    ``patterns`` (fnmatch globs, e.g. ``"model.layers.3.*"``; None: all). Returns the logits and the trace."""
    ids = model.check_ids(ids)
    if ids.ndim != 1:
        raise Lfm2npError(f"a trace records one sequence, shape (T,); got shape {ids.shape}")
    tensors: dict[str, np.ndarray] = {}

    def keep(name: str, value: np.ndarray) -> None:
        if _matches(name, patterns):
            tensors[name] = np.array(value)

    logits, _ = model._run(ids, record=keep)
    meta = {"ids": ids.tolist(), "dtype": model.dtype.name, "model": model.config.source,
            "model_type": model.config.model_type}
    return logits, Trace(tensors, meta)


# ----------------------------------------------------------------------- tolerance tiers
@dataclass(frozen=True)
class CompareTier:
    """When two traces agree. ``max_rel`` bounds ``max|a - b| / max|b|`` per tensor; ``nmse_db`` bounds the
    normalised mean squared error ``10 log10(sum (a-b)^2 / sum b^2)``; ``exact_routing`` requires identical
    chosen experts."""

    name: str
    max_rel: float
    nmse_db: float
    exact_routing: bool
    why: str


COMPARE_TIERS = {t.name: t for t in (
    CompareTier("fp32", 1e-4, -70.0, True,
                "float32 vs float32 (other summation orders): measured 2e-7..1e-6 on the fixtures; "
                "1e-4 is the whole-model logits tier of lfm2np.tolerance.FP32"),
    CompareTier("fp16", 2e-2, -40.0, False,
                "float16 activations: unit roundoff 4.9e-4, grown by depth and by softmax/normalisation"),
    CompareTier("bf16", 8e-2, -30.0, False,
                "bfloat16 activations and weights: unit roundoff 3.9e-3 (8 significant bits), grown by depth"),
    CompareTier("q8_0", 1.5e-1, -25.0, False,
                "8-bit block quantised weights (Q8_0: 32 weights share one f16 scale; ~0.4% per weight)"),
    CompareTier("q4", 6e-1, -12.0, False,
                "4-bit block quantised weights (Q4_0/Q4_K: ~6% per weight); expect routing changes"),
)}


@dataclass(frozen=True)
class TensorDiff:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    nmse: float
    nmse_db: float
    cosine: float
    routing_agreement: float | None  # for selected_experts: fraction of tokens with the same expert set
    ok: bool
    problem: str = ""


def diff_tensors(name: str, a: np.ndarray, b: np.ndarray, tier: CompareTier) -> TensorDiff:
    """Error metrics of ``a`` against the reference ``b``. Axes of length 1 are ignored (a dump may keep a
    batch or sequence axis); other shape differences are reported as a failed tensor."""
    if a.shape != b.shape and a.size == b.size and np.squeeze(a).shape == np.squeeze(b).shape:
        a, b = np.squeeze(a), np.squeeze(b)
    if a.shape != b.shape:
        return TensorDiff(name, a.shape, math.inf, math.inf, math.inf, math.inf, 0.0, None, False,
                          f"shape {list(a.shape)} vs reference {list(b.shape)}")
    if name.endswith("selected_experts"):
        same = np.all(np.sort(a, axis=-1) == np.sort(b, axis=-1), axis=-1)
        agreement = float(same.mean()) if same.size else 1.0
        ok = agreement == 1.0 or not tier.exact_routing
        return TensorDiff(name, a.shape, float(np.max(np.abs(a - b))) if a.size else 0.0, 0.0, 0.0, -math.inf,
                          1.0, agreement, ok)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a64 - b64
    max_abs = float(np.max(np.abs(d))) if d.size else 0.0
    scale = float(np.max(np.abs(b64))) if b64.size else 0.0
    max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf)
    energy = float(np.sum(b64 * b64))
    nmse = float(np.sum(d * d)) / energy if energy else (0.0 if max_abs == 0 else math.inf)
    nmse_db = 10 * math.log10(nmse) if nmse > 0 else -math.inf
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    cosine = float(np.sum(a64 * b64) / (na * nb)) if na and nb else (1.0 if na == nb else 0.0)
    ok = max_rel <= tier.max_rel and nmse_db <= tier.nmse_db
    return TensorDiff(name, a.shape, max_abs, max_rel, nmse, nmse_db, cosine, None, ok)


@dataclass
class Comparison:
    tier: CompareTier
    diffs: list[TensorDiff]
    only_in_a: list[str]
    only_in_b: list[str]

    @property
    def first_divergence(self) -> TensorDiff | None:
        """The first tensor, in forward order, outside the tier."""
        return next((d for d in self.diffs if not d.ok), None)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None and bool(self.diffs)

    def routing(self) -> dict[str, float]:
        return {d.name: d.routing_agreement for d in self.diffs if d.routing_agreement is not None}

    def to_json(self) -> dict[str, Any]:
        first = self.first_divergence
        return {"tier": self.tier.name, "ok": self.ok, "first_divergence": first.name if first else None,
                "compared": len(self.diffs), "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
                "routing_agreement": self.routing(),
                "tensors": [{"name": d.name, "shape": list(d.shape), "max_abs": d.max_abs, "max_rel": d.max_rel,
                             "nmse": d.nmse, "nmse_db": d.nmse_db, "cosine": d.cosine, "ok": d.ok,
                             **({"problem": d.problem} if d.problem else {})}
                            for d in self.diffs]}


def compare(a: Trace, b: Trace, tier: "str | CompareTier" = "fp32",
            patterns: Sequence[str] | None = None) -> Comparison:
    """Compare trace ``a`` (the backend under test) with ``b`` (the reference), tensor by tensor in ``a``'s
    forward order. Names in ``b`` may be trace names or llama.cpp aliases."""
    if isinstance(tier, str):
        if tier not in COMPARE_TIERS:
            raise Lfm2npError(f"unknown tier {tier!r}; expected one of {', '.join(COMPARE_TIERS)}")
        tier = COMPARE_TIERS[tier]
    b_by_name = dict(b.tensors)
    for name in list(a.tensors):
        alias = llama_cpp_alias(name)
        if name not in b_by_name and alias and alias in b.tensors:
            b_by_name[name] = b.tensors[alias]
    diffs, only_a = [], []
    for name, value in a.tensors.items():
        if not _matches(name, patterns):
            continue
        if name not in b_by_name:
            only_a.append(name)
            continue
        diffs.append(diff_tensors(name, np.asarray(value), np.asarray(b_by_name[name]), tier))
    used = set(a.tensors) | {llama_cpp_alias(n) for n in a.tensors}
    only_b = [n for n in b.tensors if n not in used]
    return Comparison(tier, diffs, only_a, only_b)


def format_comparison(c: Comparison, all_rows: bool = False) -> str:
    """A readable report: the first divergence, then one row per tensor (up to it unless ``all_rows``)."""
    lines = [f"tier {c.tier.name}: max_rel <= {c.tier.max_rel:g}, NMSE <= {c.tier.nmse_db:g} dB"
             f"{', identical experts' if c.tier.exact_routing else ''} ({c.tier.why})"]
    first = c.first_divergence
    if not c.diffs:
        lines.append("no tensor in common: nothing compared")
    elif first is None:
        lines.append(f"all {len(c.diffs)} tensors agree")
    else:
        detail = first.problem or (f"max_rel {first.max_rel:.3g}, NMSE {first.nmse_db:.1f} dB" + (
            f", routing agreement {first.routing_agreement:.1%}" if first.routing_agreement is not None else ""))
        lines.append(f"FIRST DIVERGENCE: {first.name} ({detail})")
    lines.append(f"{'tensor':56s} {'max_abs':>10s} {'max_rel':>10s} {'NMSE dB':>9s} {'cosine':>10s}  ok")
    for d in c.diffs:
        extra = f"  experts agree {d.routing_agreement:.1%}" if d.routing_agreement is not None else ""
        lines.append(f"{d.name:56s} {d.max_abs:10.3g} {d.max_rel:10.3g} {d.nmse_db:9.1f} {d.cosine:10.7f}"
                     f"  {'yes' if d.ok else 'NO'}{extra}")
        if d is first and not all_rows:
            lines.append(f"... {len(c.diffs) - c.diffs.index(d) - 1} more (--all to show)")
            break
    if c.only_in_a or c.only_in_b:
        lines.append(f"not compared: {len(c.only_in_a)} only in A, {len(c.only_in_b)} only in B")
    return "\n".join(lines)
