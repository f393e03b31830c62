"""The conformance check's report: a summary table (text), and one HTML page for the whole pack.

The page opens with the verdict and a table of every case (kind, tier, status, worst error, detail); each failed
case follows with its report as ``lfm2np compare --html`` and ``lfm2np diagnose --html`` draw it
(:func:`lfm2np.oracle.report.report_body`: the comparison's error map where the case has one, the ranked
hypotheses of its diagnosis), then the pack itself (model, config hash, lfm2np's version, tiers).
"""

from __future__ import annotations

from html import escape
from typing import Any

from .conformance import Pack
from .conformance_check import CaseResult
from .report import page, report_body

_CSS = """
table.cases{border-collapse:collapse;font-size:13px;margin:6px 0}
table.cases td,table.cases th{border-bottom:1px solid #e3e3e3;padding:3px 10px 3px 0;text-align:left;vertical-align:top}
tr.fail td{background:#fdecea}tr.fail td.s{color:#b3261e;font-weight:700}td.s{color:#0f6b2a;font-weight:700}
section.case{border-top:3px solid #b3261e;margin-top:28px;padding-top:6px}pre{font-size:12px;white-space:pre-wrap}
"""


def _worst(v: CaseResult) -> float | None:
    values = [p["max_rel"] for p in v.parts if isinstance(p.get("max_rel"), (int, float))]
    return max(values) if values else None


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def format_check(pack: Pack, verdicts: list[CaseResult], backend: str | None = None, diagnoses: bool = True) -> str:
    """The summary table: one line per case, the failures' diagnoses after it, then the verdict."""
    m = pack.manifest["model"]
    lines = [f"conformance: {len(verdicts)} cases of {pack.directory} ({m['name']}, {pack.config_hash[:19]}...)"
             + (f" for backend {backend}" if backend else ""),
             f"{'case':44s} {'kind':9s} {'tier':8s} {'status':6s} {'max_rel':>9s}  detail"]
    for v in verdicts:
        lines.append(f"{v.id:44s} {v.kind:9s} {v.tier:8s} {v.status.upper() if not v.ok else v.status:6s} "
                     f"{_g(_worst(v)):>9s}  {v.detail}")
    failed = [v for v in verdicts if not v.ok]
    if diagnoses:
        for v in failed:
            if v.diagnosis_text:
                lines += ["", f"--- {v.id}: {v.detail}", v.diagnosis_text]
    ties = sum(v.not_judged for v in verdicts)
    lines.append("")
    skipped = sum(v.status == "skip" for v in verdicts)
    lines.append(f"{'FAIL' if failed else 'PASS'}: {len(verdicts) - len(failed) - skipped} of {len(verdicts)} cases "
                 f"pass" + (f", {skipped} skipped" if skipped else "")
                 + (f"; failed: {', '.join(v.id for v in failed[:8])}{' ...' if len(failed) > 8 else ''}"
                    if failed else "")
                 + (f" ({ties} positions after routing near-ties excused)" if ties else ""))
    return "\n".join(lines)


def html_check(pack: Pack, verdicts: list[CaseResult], backend: str | None = None) -> str:
    """The pack's page (see the module docstring): a complete, self-contained HTML document."""
    e = lambda x: escape(str(x), quote=True)  # noqa: E731
    failed = [v for v in verdicts if not v.ok]
    m = pack.manifest["model"]
    outcome = "divergence" if failed else "agree"
    verdict = (f"FAIL: {len(failed)} of {len(verdicts)} cases fail" if failed
               else f"PASS: all {len(verdicts)} cases within their tiers")
    rows = "".join(
        (f'<tr class="fail"><td class="id"><a href="#case-{e(v.id)}">{e(v.id)}</a></td>' if not v.ok
         else '<tr class="pass"><td class="id">' + e(v.id) + "</td>")
        + f'<td>{e(v.kind)}</td><td>{e(v.tier)}</td><td class="s">{e(v.status)}</td>'
          f'<td class="n">{e(_g(_worst(v)))}</td><td>{e(v.detail)}</td></tr>' for v in verdicts)
    body = [f"<h1>lfm2np conformance · {e(m['name'])}" + (f" · backend {e(backend)}" if backend else "") + "</h1>",
            f'<p class="verdict {outcome}" id="verdict">{e(verdict)}</p>',
            '<section id="cases"><h2>Cases</h2><table class="cases"><tr><th>case</th><th>kind</th><th>tier</th>'
            f'<th>status</th><th>max_rel</th><th>detail</th></tr>{rows}</table></section>']
    for v in failed:
        body.append(f'<section class="case" id="case-{e(v.id)}"><h2>{e(v.id)}: {e(v.detail)}</h2>')
        if v.comparison is not None or v.diagnosis is not None:
            body.append(report_body(v.comparison, v.diagnosis, f"case {v.id}")[2])
        elif v.diagnosis_text:
            body.append(f"<pre>{e(v.diagnosis_text)}</pre>")
        body.append(_parts(v) + "</section>")
    tiers = "".join(f"<li><code>{e(name)}</code>: max_rel &le; {e(t.get('max_rel'))}, NMSE &le; "
                    f"{e(t.get('nmse_db'))} dB ({e(t.get('why'))})</li>" for name, t in pack.manifest["tiers"].items())
    body.append(f'<section id="pack"><h2>The pack</h2><ul class="facts"><li>model {e(m["name"])} '
                f'({e(m.get("format"))}, {len(m.get("tensors", []))} tensors), config hash '
                f'<code>{e(pack.config_hash)}</code></li><li>made by lfm2np {e(pack.manifest.get("lfm2np"))}, '
                f'reference in {e(pack.manifest.get("reference", {}).get("dtype"))}</li>{tiers}</ul></section>')
    return page(f"lfm2np conformance: {verdict}", "".join(body), _CSS)


def _parts(v: CaseResult) -> str:
    """The feeds (or outputs) of a failed case, as a table."""
    e = lambda x: escape(str(x), quote=True)  # noqa: E731
    if not v.parts:
        return ""
    rows = "".join(f'<tr class="{"pass" if p.get("ok") else "fail"}"><td>{e(p.get("output"))}</td>'
                   f'<td>{e(p.get("positions", ""))}</td><td class="n">{e(_g(p.get("max_rel")))}</td>'
                   f'<td>{e(p.get("problem", "ok" if p.get("ok") else ""))}</td></tr>' for p in v.parts)
    return (f'<table class="cases"><tr><th>output</th><th>positions</th><th>max_rel</th><th>problem</th></tr>'
            f'{rows}</table>')


def check_json(data: dict[str, Any], verdicts: list[CaseResult]) -> dict[str, Any]:
    """The check's JSON with each failure's diagnosis text."""
    for case, v in zip(data["cases"], verdicts):
        case["diagnosis_text"] = v.diagnosis_text
    return data
