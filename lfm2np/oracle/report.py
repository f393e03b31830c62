"""One HTML page a person reads at a glance: the verdict, an error map, routing per MoE layer, the hypotheses.

:func:`html_report` takes the JSON data of :meth:`lfm2np.oracle.compare.Comparison.to_json` and
:meth:`lfm2np.oracle.diagnose.Diagnosis.to_json` (either or both; a diagnosis may carry its own ``comparison``).
The page needs nothing but itself: inline CSS and SVG, no script, no font, image or address outside it. Every
string from the data (tensor names, problems, model paths) is escaped; unknown keys are ignored, missing ones
leave their part out. The error map has one row per layer (and one outside the layers), one column per step of
:data:`lfm2np.schema.STEP_ORDER`, one cell per tensor compared, coloured by ``log10(max_rel)`` on the fixed
:data:`SCALE`: ``×`` a failed tensor, ``≈`` experts chosen apart only by near-ties, the first divergence
outlined, hatched a tensor one trace only holds. docs/oracle.md ("A report at a glance") tells how to read it.
"""

from __future__ import annotations

import itertools
import math
from html import escape
from typing import Any

from ..schema import STEP_ORDER, layer_of, order_key
from .tolerance import COMPARE_TIERS

#: The colour of ``max_rel``, one per decade from 1e-8 (and below, exact zero included) to 1 (and above),
#: interpolated linearly in RGB in between: blues for float rounding, pale near the fp32 tier (1e-4), orange to
#: dark red for real divergences (after ColorBrewer's RdYlBu, readable by most colour-blind readers).
SCALE = ("#313695", "#4575b4", "#74add1", "#abd9e9", "#e0f3f8", "#fee090", "#fdae61", "#f46d43", "#a50026")
LOG_MIN, LOG_MAX = -8, 0
NON_FINITE = "#000000"  # NaN or infinity: a tensor failed by a problem (a NaN, a shape, a flip)

OUTCOMES = {"agree": "agree", "divergence": "divergence", "little": "not enough in common",
            "nothing": "nothing reproduces"}
_CSS = """

body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d1d1f;margin:0;
padding:20px 28px;max-width:1180px;background:#fff}
h1{font-size:15px;font-weight:600;color:#555;margin:0 0 8px}
h2{font-size:16px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.verdict{font-size:18px;font-weight:600;padding:10px 14px;border-radius:6px;border-left:8px solid;margin:0 0 6px;
overflow-wrap:anywhere}
.verdict.agree{background:#e7f5ea;border-color:#1e7b34;color:#0f4d20}
.verdict.divergence{background:#fdecea;border-color:#b3261e;color:#7a120c}
.verdict.little{background:#fff4de;border-color:#b26a00;color:#6b3f00}
.verdict.nothing{background:#f3e8fb;border-color:#6a1b9a;color:#45105f}.sub{margin:2px 0 0 22px;color:#444}
.warn{color:#8a4b00}.muted{color:#777}ul.facts{margin:6px 0;padding-left:20px}
code{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px;overflow-wrap:anywhere}
table.map{border-collapse:separate;border-spacing:2px;margin:6px 0 4px}
table.map th{font-weight:normal;font-size:11px;color:#444;padding:0 2px}
th.row{text-align:right;white-space:nowrap;padding-right:6px}
table.map th.group{border-bottom:1px solid #bbb;font-weight:600}
th.step div{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap;margin:0 auto}
td.c{width:20px;min-width:20px;height:20px;padding:0;text-align:center;font-size:14px;line-height:20px;
border-radius:2px;font-weight:700}
td.nc{background:repeating-linear-gradient(45deg,#d6d6d6 0 2px,#fff 2px 5px)}
td.first{outline:3px solid #000;outline-offset:1px;box-shadow:0 0 0 1px #fff}
td.note{font-size:12px;color:#7a120c;padding-left:8px;white-space:nowrap;font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:4px 18px;align-items:center;font-size:12px;color:#333;margin:4px 0}
.key{display:inline-block;width:16px;height:16px;line-height:16px;text-align:center;vertical-align:middle;
border-radius:2px;margin-right:4px;font-weight:700}
table.list{border-collapse:collapse;margin:6px 0;font-size:13px}
table.list th,table.list td{border-bottom:1px solid #e3e3e3;padding:3px 10px 3px 0;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}td.id{white-space:nowrap}
tr.best td{background:#e7f5ea;font-weight:600}tr.contra td{color:#888}tr.divider td{color:#6a1b9a;font-style:italic}tr.baseline td{font-style:italic;border-top:1px solid #999}
p.nofit{color:#45105f;font-weight:700;font-size:15px}.yes{color:#0f6b2a;font-weight:700}
.flip{color:#b3261e;font-weight:700}details{margin:4px 0}summary{cursor:pointer;color:#333}
"""


# ------------------------------------------------------------------------------------------- values
def _e(value: Any) -> str:
    """Any value of the data as escaped HTML text (quotes too: it may land in an attribute)."""
    return escape(str(value), quote=True)


def _num(x: Any) -> float | None:
    """A measure as a float: a number, or the strings "inf", "-inf", "nan"; None for anything else."""
    if isinstance(x, bool) or not (isinstance(x, (int, float)) or isinstance(x, str) and x in ("inf", "-inf", "nan")):
        return None
    try:
        return float(x)
    except OverflowError:  # an integer beyond a float
        return math.inf if x > 0 else -math.inf


def _g(x: Any, unit: str = "") -> str:
    """A measure for a person: 3 significant digits, NaN, inf, or a dash when absent."""
    v = _num(x)
    return "–" if v is None else ("NaN" if math.isnan(v) else f"{v:.3g}" if math.isfinite(v) else
                                  "inf" if v > 0 else "-inf") + unit


def colour(max_rel: float | None) -> str:
    """The cell colour of ``max_rel`` on :data:`SCALE` (:data:`NON_FINITE` when it is not a finite number)."""
    if max_rel is None or not math.isfinite(max_rel):
        return NON_FINITE
    t = LOG_MIN if max_rel <= 0 else min(max(math.log10(max_rel), LOG_MIN), LOG_MAX)
    pos = (t - LOG_MIN) / (LOG_MAX - LOG_MIN) * (len(SCALE) - 1)
    i = min(int(pos), len(SCALE) - 2)
    low, high = bytes.fromhex(SCALE[i][1:]), bytes.fromhex(SCALE[i + 1][1:])
    return "#" + "".join(f"{round(x + (y - x) * (pos - i)):02x}" for x, y in zip(low, high))


def _ink(background: str) -> str:
    """Black or white, whichever reads on ``background``."""
    r, g, b = bytes.fromhex(background[1:])
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def _at(where: Any, short: bool = False) -> str:
    """Where a value is: ``tensor, step s, position p``, from whichever of those keys the dict has (``short``:
    ``tensor @p``, as the text report writes it)."""
    if not isinstance(where, dict):
        return "–"
    if short and "tensor" in where and where.get("position") is not None and where.get("step") is None:
        return f"{where['tensor']} @{where['position']}"
    parts = [str(where["tensor"])] if "tensor" in where else []
    return ", ".join(parts + [f"{k} {where[k]}" for k in ("step", "position") if where.get(k) is not None]) or "–"


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _short(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters, an ellipsis marking the cut (the whole text goes in a tooltip)."""
    return text if len(text) <= n else text[:max(1, n - 1)] + "…"


def _details(label: str, items: list[str]) -> str:
    """A folded list (``<details>`` opens without a script) of plain-text ``items``."""
    rows = "".join(f"<li><code>{_e(x)}</code></li>" for x in items)
    return f'<details><summary>{_e(label)} ({len(items)})</summary><ul class="facts">{rows}</ul></details>' \
        if items else ""


def _table(id_: str, head: list[str], rows: list[str]) -> str:
    """A list table: ``head`` plain text, ``rows`` ready ``<tr>`` elements."""
    return (f'<table class="list" id="{id_}"><thead><tr>{"".join(f"<th>{_e(h)}</th>" for h in head)}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


# ------------------------------------------------------------------------------------------- verdict
def _nothing(d: dict) -> bool:
    """Whether no catalogued mistake reproduces a dump that disagrees (the diagnosis says so, or has no best)."""
    return d.get("agrees") is not True and bool(d.get("nothing_reproduces", d.get("best") is None))


def _verdicts(c: dict | None, d: dict | None) -> tuple[str, list[str]]:
    """The outcome (a key of :data:`OUTCOMES`) and the verdict lines, the diagnosis's first."""
    lines, outcome = [], "agree"
    if d is not None:
        fd, best = d.get("first_divergence"), d.get("best")
        variant = next((h.get("variant") for h in _list(d.get("hypotheses")) if isinstance(h, dict)
                        and h.get("id") == best), None)
        if d.get("agrees") is True:
            lines.append(f"AGREE: the dump agrees with the reference at the {d.get('tier', '?')} tier")
        elif _nothing(d):
            outcome = "nothing"
            lines.append(f"NOTHING REPRODUCES: no catalogued mistake reproduces this dump; the divergence begins at "
                         f"{_at(fd)}")
        else:
            outcome = "divergence"
            lines.append(f"DIAGNOSED: {best}{f' ({variant})' if variant else ''} reproduces the dump; first "
                         f"divergence at {_at(fd)}")
        lines += [f"IMPOSSIBLE: {note}" for note in _list(d.get("impossible")) if isinstance(note, str)]
    if c is not None:
        kind = ("divergence" if c.get("first_divergence") is not None else "little" if c.get("enough") is False
                else "agree" if c.get("ok", True) is not False else "divergence")
        lines.append(c["verdict"] if isinstance(c.get("verdict"), str) else OUTCOMES[kind].upper())
        outcome = kind if d is None else outcome
    return outcome, lines


def _tier(name: Any) -> str:
    t = COMPARE_TIERS.get(name) if isinstance(name, str) else None
    return f"tier <b>{_e(name)}</b>" if t is None else (
        f"tier <b>{_e(t.name)}</b>: a tensor agrees when max_rel ≤ {t.max_rel:g} and NMSE ≤ {t.nmse_db:g} dB "
        f'<span class="muted">({_e(t.why)})</span>')


def _summary(c: dict) -> str:
    cov, out = _dict(c.get("coverage")), [f"<li>{_tier(c.get('tier'))}</li>"]
    if cov:
        layers, ref_layers = _list(cov.get("layers")), _list(cov.get("reference_layers"))
        missing = ", ".join(str(x) for x in ref_layers if x not in layers)
        out.append(f"<li>coverage: compared {_e(cov.get('compared', '?'))} of the reference's "
                   f"{_e(cov.get('reference', '?'))} tensors, in {len(layers)} of its {len(ref_layers)} layers"
                   + (f" (not compared: layers {_e(missing)})" if missing else "")
                   + ("" if cov.get("after_embeddings", True) else "; nothing after the embeddings")
                   + ("; a partial comparison accepted" if c.get("partial") else "") + "</li>")
    if isinstance(c.get("ids"), list):
        out.append(f"<li>input: {len(c['ids'])} ids, the same in both traces</li>")
    out += [f'<li class="warn">warning: {_e(w)}</li>' for w in _list(c.get("warnings"))]
    out += [f"<li>note: {_e(n)}</li>" for n in _list(c.get("notes"))]
    return (f'<ul class="facts">{"".join(out)}</ul>'
            + _details("only in A, the trace under test: not compared", _list(c.get("only_in_a")))
            + _details("only in B, the reference: not compared", _list(c.get("only_in_b"))))


# ------------------------------------------------------------------------------------------- the map
def _step(name: str) -> str:
    return name.split(".", 3)[3] if name.count(".") >= 3 else ""


def _step_label(step: str) -> str:
    """A column's label: the step after its block (``conv_out``), ``layer out`` for the layer's output."""
    return _short(step.split(".", 1)[-1] if step in STEP_ORDER else step, 24) or "layer out"


def _top_label(name: str, kinds: int) -> str:
    """A name outside the layers, short: ``rope cos`` (``rope sliding cos`` with several ``kinds``), ``lm_head``."""
    if name.startswith("model.rotary_emb."):
        kind, _, table = name[len("model.rotary_emb."):].partition(".")
        return f"rope {kind.split('_')[0]} {table}" if kinds > 1 else f"rope {table}"
    return _short(name.removeprefix("model."), 24)


def _legend(tier: Any) -> str:
    """The colour scale as an SVG bar, decades marked, the tier's max_rel drawn on it; then the symbols."""
    w, x0, span = 400, 26, LOG_MAX - LOG_MIN
    stops = "".join(f'<stop offset="{n / (len(SCALE) - 1):.3f}" stop-color="{s}"/>' for n, s in enumerate(SCALE))
    ticks = "".join(f'<line x1="{x:.1f}" y1="22" x2="{x:.1f}" y2="26" stroke="#555"/><text x="{x:.1f}" y="37" '
                    f'text-anchor="middle">{"≥1" if k == span else "≤" * (k == 0) + f"1e{LOG_MIN + k}"}</text>'
                    for k in range(span + 1) for x in [x0 + w * k / span])
    t = COMPARE_TIERS.get(tier) if isinstance(tier, str) else None
    if t is not None:
        x = x0 + w * (min(max(math.log10(t.max_rel), LOG_MIN), LOG_MAX) - LOG_MIN) / span
        ticks += (f'<line x1="{x:.1f}" y1="2" x2="{x:.1f}" y2="26" stroke="#000" stroke-width="2"/>'
                  f'<text x="{x + 4:.1f}" y="10" font-weight="600">{_e(t.name)} tier: {t.max_rel:g}</text>')
    bar = (f'<svg width="{w + 2 * x0 + 70}" height="42" role="img" aria-label="colour scale of max_rel" '
           f'font-size="11" font-family="sans-serif"><defs><linearGradient id="scale">{stops}</linearGradient>'
           f'</defs><rect x="{x0}" y="12" width="{w}" height="12" fill="url(#scale)" stroke="#999"/>{ticks}'
           f'<text x="{x0 + w + 14}" y="22">max_rel</text></svg>')
    keys = "".join(f'<span><span class="key" style="{style}">{symbol}</span>{text}</span>' for style, symbol, text in (
        (f"background:{NON_FINITE};color:#fff", "×", "NaN, inf or no number (failed)"),
        (f"background:{SCALE[-1]};color:#fff", "×", "outside the tier"),
        (f"background:{SCALE[0]};color:#fff", "≈", "experts: near-tie only"),
        ("background:#fff;outline:3px solid #000;outline-offset:-3px", "", "first divergence"),
        ("background:repeating-linear-gradient(45deg,#d6d6d6 0 2px,#fff 2px 5px)", "", "in one trace only"),
        ("border:1px dotted #ccc", "", "no such step")))
    return f'<div class="legend">{bar}</div><div class="legend">{keys}</div>'


def _cell(t: dict, first: bool, ties: set) -> str:
    """One tensor's cell: its colour, × when it failed, ≈ for chosen experts within the tier by a near-tie."""
    name, max_rel, ok = str(t.get("name")), _num(t.get("max_rel")), t.get("ok") is True
    tie = ok and layer_of(name) in ties and name.endswith(".selected_experts")
    lines = [name, f"max_rel {_g(max_rel)} · NMSE {_g(t.get('nmse_db'), ' dB')} · cosine {_g(t.get('cosine'))} · "
                   f"max_abs {_g(t.get('max_abs'))}"]
    lines += [f"shape {t['shape']}"] if isinstance(t.get("shape"), list) else []
    lines.append(("within the tier" + " (a near-tie of the chosen experts)" * tie) if ok else "OUTSIDE THE TIER"
                 + (f", first at position {t['position']}" if t.get("position") is not None else ""))
    lines += [f"judged on positions < {t['positions']}"] if t.get("positions") is not None else []
    lines += [f"problem: {t['problem']}"] if t.get("problem") else []
    bg = colour(max_rel)
    return (f'<td class="c{" fail" * (not ok)}{" first" * first}" style="background:{bg};color:{_ink(bg)}" '
            f'data-name="{_e(name)}" title="{_e(chr(10).join(lines))}">{"×" if not ok else "≈" if tie else ""}</td>')


def _error_map(c: dict) -> str:
    """The legend, the row outside the layers, then one row per layer, one column per step (see the module)."""
    first = _dict(c.get("first_divergence")).get("tensor")
    first = None if first is None else str(first)
    ties = {f.get("layer") for f in _list(c.get("flips")) if isinstance(f, dict) and f.get("near_tie")}
    cells: dict[tuple[Any, str], str] = {}  # (layer or None, step or the name outside the layers) -> <td>
    for t in _list(c.get("tensors")):
        if isinstance(t, dict) and "name" in t:
            name, layer = str(t["name"]), layer_of(str(t["name"]))
            cells.setdefault((layer, name if layer is None else _step(name)), _cell(t, name == first, ties))
    for key, side in (("only_in_a", "A, the trace under test"), ("only_in_b", "B, the reference")):
        for name in map(str, _list(c.get(key))):
            cells.setdefault((layer_of(name), name if layer_of(name) is None else _step(name)),
                             f'<td class="c nc" data-name="{_e(name)}" title="{_e(name)}&#10;not compared: only in '
                             f'{side}"></td>')
    if not cells:
        return '<p class="muted">No tensor was compared: nothing to map.</p>'
    first_layer = layer_of(first) if first else None
    top = sorted({s for layer, s in cells if layer is None}, key=order_key)
    layers = sorted({layer for layer, _ in cells if layer is not None})
    steps = sorted({s for layer, s in cells if layer is not None},
                   key=lambda s: order_key(f"model.layers.0.{s}" if s else "model.layers.0"))
    out = [_legend(c.get("tier"))]
    if top:
        kinds = len({s.split(".")[2] for s in top if s.startswith("model.rotary_emb.") and s.count(".") >= 3})
        head = "".join(f'<th class="step" data-step="{_e(s)}" title="{_e(s)}"><div>{_e(_top_label(s, kinds))}</div>'
                       f'</th>' for s in top)
        note = '<td class="note">◀ first divergence</td>' if first is not None and first_layer is None else ""
        out.append(f'<table class="map" id="outside"><thead><tr><th></th>{head}</tr></thead><tbody><tr data-layer="">'
                   f'<th class="row">outside the layers</th>{"".join(cells[None, s] for s in top)}{note}</tr></tbody>'
                   f'</table>')
    if layers:
        groups = [(g, len(list(run))) for g, run in itertools.groupby(  # conv, self_attn, feed_forward
            steps, key=lambda s: s.split(".")[0] if "." in s and s in STEP_ORDER else "")]
        group_row = "".join(f'<th class="group" colspan="{n}" title="{_e(g)}">{_e(_short(g, n * 3))}</th>' if g
                            else f'<th colspan="{n}"></th>' for g, n in groups)
        head = "".join(f'<th class="step" data-step="{_e(s)}" title="{_e(s)}"><div>{_e(_step_label(s))}</div></th>'
                       for s in steps)
        rows = []
        for layer in layers:
            have = {s for (x, s) in cells if x == layer}
            kind = " ".join(k for k, p in (("conv", "conv."), ("attn", "self_attn."), ("MoE", "feed_forward.router"))
                            if any(s.startswith(p) for s in have))
            note = (f'<td class="note">◀ first divergence: {_e(_step_label(_step(first)))}</td>'
                    if layer == first_layer else "")
            rows.append(f'<tr data-layer="{layer}"><th class="row">layer {layer} <span class="muted">{kind}</span>'
                        f'</th>{"".join(cells.get((layer, s), "<td></td>") for s in steps)}{note}</tr>')
        out.append(f'<table class="map" id="layers"><thead><tr><th></th>{group_row}</tr><tr><th></th>{head}</tr>'
                   f'</thead><tbody>{"".join(rows)}</tbody></table>')
    out.append('<p class="muted">Colour: log10 of max_rel, max|A − B| / max(max|A|, max|B|), on the scale above '
               '(the same for every tier). Hover a cell for its numbers.</p>')
    return "".join(out)


# ------------------------------------------------------------------------------------------- routing
def _routing(c: dict) -> str:
    """The share of tokens with the same experts per MoE layer, its near-ties and flips, then each of them."""
    agreement, flips = _dict(c.get("routing_agreement")), [f for f in _list(c.get("flips")) if isinstance(f, dict)]
    if not agreement and not flips:
        return ""
    rows = []
    for name, share in agreement.items():
        layer, v = layer_of(str(name)), _num(share)
        ties = sum(1 for f in flips if f.get("layer") == layer and f.get("near_tie"))
        real = sum(1 for f in flips if f.get("layer") == layer) - ties
        rows.append(f'<tr><td>{_e(name if layer is None else layer)}</td><td class="n">'
                    f'{"–" if v is None or not math.isfinite(v) else f"{v:.1%}"}</td><td class="n">{ties}</td>'
                    f'<td class="n{" flip" * bool(real)}">{real}</td></tr>')
    out = [_table("routing-layers", ["layer", "same experts", "near-ties", "flips"], rows)]
    if flips:
        items = [f'<tr><td class="{"" if tie else "flip"}">{"near-tie" if tie else "FLIP"}</td><td class="n">'
                 f'{_e(f.get("layer"))}</td><td class="n">{_e(f.get("position"))}</td><td>{_e(f.get("only_a"))}</td>'
                 f'<td>{_e(f.get("only_b"))}</td><td class="n">{_g(f.get("margin"))}</td><td class="n">'
                 f'{_g(f.get("tolerance"))}</td></tr>' for f in flips for tie in [f.get("near_tie") is True]]
        cut = [f.get("position") for f in flips if f.get("near_tie") is True and isinstance(f.get("position"), int)]
        out.append('<p>A <b>near-tie</b>: the experts only one side chose are within the tier of each other in the '
                   'router scores (a correct lower-precision run may choose either); a <b>flip</b> is beyond it.'
                   + (f" A near-tie changes every later position: later tensors are judged on the positions before "
                      f"{min(cut)}." if cut else "") + "</p>")
        out.append(_table("flips", ["kind", "layer", "position", "only A chose", "only B chose", "margin",
                                    "tolerance"], items))
    return "".join(out)


# ------------------------------------------------------------------------------------------- diagnosis
def _first(d: dict) -> str:
    """The diagnosis's first divergence in words, whatever the dump: a trace, logits or tokens."""
    f = d.get("first_divergence")
    if not isinstance(f, dict):
        return "the dump agrees with the reference everywhere" if d.get("agrees") else ""
    if "token" in f:
        top = ", ".join(f"{t.get('id')} ({_g(t.get('logit'))})" for t in _list(f.get("reference_top"))[:3]
                        if isinstance(t, dict))
        return (f"first different token at {_at(f)}: {f['token']}, the reference's top: {top}; margin "
                f"{_g(f.get('margin'))} against float32 noise {_g(f.get('tolerance'))}: "
                + ("a near-tie" if f.get("near_tie") else "a real deviation")
                + (f"; first real deviation at {_at(f['first_deviation'])}" if f.get("first_deviation") else ""))
    size = (f"routing agreement {_g(f['routing_agreement'])}" if "routing_agreement" in f
            else f"max_rel {_g(f.get('max_rel'))}")
    argmax = {True: "; its argmax agrees", False: "; its argmax differs"}.get(f.get("argmax_agrees"), "")
    return f"first divergence: {_at(f)} ({size}{argmax})"


def _hypotheses(d: dict) -> str:
    """What was diagnosed, the first divergence, the hypotheses in their rank (the best one marked)."""
    best, marked, divided, rows = d.get("best"), False, False, []
    baseline = _dict(d.get("no_mistake"))
    for n, h in enumerate([h for h in _list(d.get("hypotheses")) if isinstance(h, dict)] + [None], 1):
        contra = h is None or h.get("contradicted") is True
        if contra and not divided and d.get("agrees") is not True and (baseline or (h is not None and n > 1)):
            divided = True
            if baseline:  # the reference itself: what the contradicted mistakes rank below
                rows.append(f'<tr class="baseline"><td class="n">–</td><td class="id">no mistake</td><td>the '
                            f'reference as it is</td><td></td><td class="n">{_g(baseline.get("error"))}</td>'
                            f'<td class="n">{_e(baseline.get("explained", "–"))} / {_e(d.get("compared", "?"))}</td>'
                            f'<td></td></tr>')
            if h is not None:
                rows.append('<tr class="divider"><td colspan="7">ruled out: the mistakes below would change values '
                            'the dump shows unchanged</td></tr>')
        if h is None:
            break
        is_best = not marked and best is not None and h.get("id") == best
        marked = marked or is_best
        verdict = ('<span class="yes">REPRODUCES</span>' if h.get("reproduces") is True else "contradicted" if contra
                   else "no" if h.get("visible", True) else "no effect here")
        params = _dict(h.get("params"))  # a mistake localised to some layers (experts), unless its variant says so
        where = "" if "layer" in str(h.get("variant")) else "".join(
            f" · {k} {', '.join(map(str, v)) if isinstance(v, list) else v}" for k in ("layers", "experts")
            if (v := h.get(k, params.get(k))) is not None)
        still = "" if h.get("first_disagreement") is None else f"still differs at {_at(h['first_disagreement'])}"
        rows.append(f'<tr class="{"best" if is_best else "contra" if contra else ""}" data-id="{_e(h.get("id"))}" '
                    f'title="{_e(still)}"><td class="n">{n}</td><td class="id"><code>{_e(h.get("id"))}</code></td>'
                    f'<td>{_e(h.get("variant", ""))}{_e(where)}</td><td>{verdict}</td><td class="n">'
                    f'{_g(h.get("error"))}</td><td class="n">{_e(h.get("explained", "–"))} / '
                    f'{_e(d.get("compared", "?"))}</td><td><code>{_e(_at(h.get("where"), short=True))}</code></td>'
                    f'</tr>')
    kind = {"logits": f"logits of {d.get('positions')} positions", "trace": f"a trace of {d.get('compared')} tensors",
            "tokens": f"{d.get('compared')} generated tokens"}.get(d.get("kind"), f"a dump ({d.get('kind')})")
    unit = {"logits": "positions", "trace": "tensors", "tokens": "steps"}.get(d.get("kind"), "")
    prefill = (f"<li>second call at position {_e(d['prefill'])} ({_e(d.get('prefill_from'))})</li>"
               if d.get("prefill") is not None else "")
    return ('<p class="nofit">No catalogued mistake reproduces this dump.</p>' * _nothing(d)
            + f'<ul class="facts"><li>{_e(kind)} against <code>{_e(d.get("model", "?"))}</code>, {_tier(d.get("tier"))}'
            f'</li><li>{_e(_first(d))}</li>{prefill}</ul>'
            + (_table("hypotheses", ["#", "mistake", "variant", "verdict", "error", f"explains ({unit})", "acts at"],
                      rows) if rows else "")
            + _details("not applicable", [f"{x.get('id')}: {x.get('reason')}" for x in _list(d.get("not_applicable"))
                                          if isinstance(x, dict)])
            + _details("tensors of the dump not compared", [f"{k}: {v}" for k, v in _dict(d.get("skipped")).items()]))


# ------------------------------------------------------------------------------------------- the page
def report_body(comparison: dict | None = None, diagnosis: dict | None = None, title: str = "lfm2np") \
        -> tuple[str, str, str]:
    """:func:`html_report`'s page as ``(outcome, verdict line, body HTML)``, for a page of several reports."""
    c = comparison if isinstance(comparison, dict) else None
    d = diagnosis if isinstance(diagnosis, dict) else None
    if c is None and d is not None and isinstance(d.get("comparison"), dict):
        c = d["comparison"]
    outcome, lines = _verdicts(c, d)
    if not lines:
        outcome, lines = "little", ["NOTHING TO REPORT: neither a comparison nor a diagnosis was given"]
    body = [f"<h1>{_e(title)} · {OUTCOMES[outcome]}</h1>",
            f'<p class="verdict {outcome}" id="verdict">{_e(lines[0])}</p>',
            *(f'<p class="sub">{_e(x)}</p>' for x in lines[1:])]
    if c is not None:
        body.append(f'<section id="summary"><h2>Comparison</h2>{_summary(c)}</section>'
                    f'<section id="map"><h2>Error map</h2>{_error_map(c)}</section>')
        routing = _routing(c)
        body.append(f'<section id="routing"><h2>Routing, per MoE layer</h2>{routing}</section>' if routing else "")
    if d is not None:
        body.append(f'<section id="diagnosis"><h2>Diagnosis</h2>{_hypotheses(d)}</section>')
    return outcome, lines[0], "".join(body)


def page(title: str, body: str, css: str = "") -> str:
    """A complete HTML5 document: ``title`` (escaped), the report's style and ``css``, ``body`` as given."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
            f'<style>{_CSS}{css}</style></head><body>{body}</body></html>\n')


def html_report(comparison: dict | None = None, diagnosis: dict | None = None, title: str = "lfm2np") -> str:
    """The page (a complete HTML5 document) for a comparison's and/or a diagnosis's JSON data: see the module
    docstring. ``title`` names the page (escaped like the data)."""
    _, verdict, body = report_body(comparison, diagnosis, title)
    return page(f"{title}: {verdict[:120]}", body)
