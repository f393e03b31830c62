"""The HTML report: built from real comparisons and diagnoses (two traces of a fixture, one with bugs planted
through the record protocol) and from hand-written data for the edges (no tensors, NaN measures, 40 layers,
hostile names). The page is parsed (every tag closed), its map checked cell by cell against the data, and, where
the machine has a headless Chromium, rendered to a PNG that is decoded and looked at."""

from __future__ import annotations

import copy
import functools
import html
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser

import numpy as np

import lfm2np
from lfm2np.oracle.compare import compare
from lfm2np.oracle.diagnose import diagnose
from lfm2np.oracle.dumps import trace_dump
from lfm2np.oracle.report import NON_FINITE, SCALE, colour, html_report
from lfm2np.oracle.trace import Trace
from lfm2np.schema import layer_of

from conftest import golden, model

CASE = "moe-top1-nobias"  # attention, conv, attention; every layer MoE, one expert per token, no expert bias
EVIL = "<script>alert(\"x\")</script> & 'q' <img src=https://example.com/x.png>"


# ------------------------------------------------------------------------------------- real data
def traced(m: lfm2np.Model, ids: np.ndarray, patch=None) -> Trace:
    """A trace of ``m`` on ``ids``, ``patch(name, value)`` replacing the values it returns (the record protocol)."""
    kept = {}

    def fn(name, value):
        out = patch(name, value) if patch else None
        kept[name] = np.array(value if out is None else out)
        return out

    m.forward(ids, record=fn)
    return Trace(kept, {"ids": [int(i) for i in ids]})


def planted(sign: float, flip: bool = False):
    """Layer 1, position 4: the runner-up expert's score set 1e-6 above (``sign`` +1: it is chosen) or below its
    top score, a near-tie; with ``flip``, layer 2 routes position 2 to the next expert (its scores unchanged)."""
    def patch(name, value):
        if name == "model.layers.1.feed_forward.router_scores":
            v = value.copy()
            top, runner = np.argsort(-v[4], kind="stable")[:2]
            v[4, runner] = v[4, top] + sign * 1e-6
            return v
        if flip and name == "model.layers.2.feed_forward.selected_experts":
            v = value.copy()
            v[2] = (v[2] + 1) % model(CASE).config.num_experts
            return v
        return None
    return patch


@functools.lru_cache(maxsize=None)
def routed() -> dict:
    """A comparison with a near-tie, a flip (the first divergence) and a tensor the backend did not dump."""
    m, ids = model(CASE), golden(CASE)["capture.ids"]
    backend = traced(m, ids, planted(+1, flip=True))
    del backend.tensors["model.layers.0.feed_forward.router_logits"]
    return compare(backend, traced(m, ids, planted(-1))).to_json()


@functools.lru_cache(maxsize=None)
def diagnosed() -> dict:
    """The diagnosis of a backend whose conv taps are reversed, with its comparison to the reference."""
    m, ids = model(CASE), golden(CASE)["capture.ids"]
    params = {n: m.params[n] for n in m.params}
    for i in m.config.conv_layers:
        w = f"model.layers.{i}.conv.conv.weight"
        params[w] = params[w][..., ::-1].copy()
    backend = traced(lfm2np.Model(m.config, params), ids)
    out = diagnose(m, trace_dump(backend, ids)).to_json()
    out["comparison"] = compare(backend, traced(m, ids)).to_json()
    return out


def handmade(layers: int = 40) -> dict:
    """A comparison written by hand: ``layers`` layers, NaN measures as strings, hostile names and problems."""
    def row(name, rel, ok=True, **extra):
        return {"name": name, "layer": layer_of(name), "shape": [3, 8], "max_abs": rel, "max_rel": rel,
                "nmse": rel, "nmse_db": "-inf", "cosine": 1.0, "ok": ok, "position": None, "positions": None, **extra}

    tensors = [row("model.rotary_emb.full_attention.cos", 0.0), row("model.embed_tokens", 0.0)]
    for i in range(layers):
        tensors += [row(f"model.layers.{i}.operator_norm", 10.0 ** -(8 - i % 9)),
                    row(f"model.layers.{i}.self_attn.q_proj", 3e-6), row(f"model.layers.{i}", 2e-6)]
    nan = dict.fromkeys(("max_abs", "max_rel", "nmse", "nmse_db", "cosine"), "nan")
    bad = f"model.layers.{layers // 2}.self_attn.q_proj"  # NaN in the backend: the first divergence
    tensors = [row(bad, 0, False, **nan, position=1, problem=EVIL) if t["name"] == bad else t for t in tensors]
    tensors += [row(f"model.layers.7.{EVIL}", 0.5, False), row(EVIL, 1e-3), row("lm_head", "inf", False)]
    return {"tier": "fp32", "ok": False, "verdict": f"FIRST DIVERGENCE: {bad}: {EVIL}",
            "first_divergence": {"tensor": bad, "layer": layers // 2, "position": 1, "max_rel": "nan"},
            "enough": True, "partial": False, "coverage": {"compared": len(tensors), "reference": len(tensors) + 1,
                                                           "layers": list(range(layers)),
                                                           "reference_layers": list(range(layers))},
            "compared": len(tensors), "only_in_a": [EVIL + "-a"], "only_in_b": ["model.layers.3.ffn_norm"],
            "routing_agreement": {}, "flips": [], "warnings": [EVIL], "notes": [EVIL + " note"], "ids": [1, 2, 3],
            "tensors": tensors,
            "a field from a later version": {"x": 1}}


# ------------------------------------------------------------------------------------- reading the page
VOID = {"meta", "br", "hr", "img", "input", "link", "wbr", "source", "col", "area", "base", "embed", "track"}


class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, attrs, parent, [], ""

    def all(self, tag: str | None = None, **attrs):
        """Every descendant with ``tag`` whose attributes hold ``attrs`` (class: one of its classes)."""
        for child in self.children:
            if (tag is None or child.tag == tag) and all(
                    v in child.attrs.get("class", "").split() if k == "class_" else child.attrs.get(k) == v
                    for k, v in attrs.items()):
                yield child
            yield from child.all(tag, **attrs)

    def one(self, tag: str | None = None, **attrs) -> "Node":
        found = list(self.all(tag, **attrs))
        assert len(found) == 1, (tag, attrs, len(found))
        return found[0]

    def content(self) -> str:
        return self.text + "".join(c.content() for c in self.children)

    @property
    def classes(self) -> list[str]:
        return self.attrs.get("class", "").split()


class Page(HTMLParser):
    """The page as a tree; fails unless every element is closed in order (void elements excepted)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = self.at = Node("#root", {}, None)
        self.start_tags: list[str] = []
        self.doctype = None
        self.feed(text)
        self.close()
        assert self.at is self.root, f"<{self.at.tag}> is never closed"

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self.start_tags.append(tag)
        node = Node(tag, {k: v or "" for k, v in attrs}, self.at)
        self.at.children.append(node)
        if tag not in VOID:
            self.at = node

    def handle_startendtag(self, tag, attrs):
        self.start_tags.append(tag)
        self.at.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.at))

    def handle_endtag(self, tag):
        assert tag not in VOID and tag == self.at.tag, f"</{tag}> closes <{self.at.tag}>"
        self.at = self.at.parent

    def handle_data(self, data):
        self.at.text += data


#: attributes that only hold text (a tooltip, the name of a tensor): an address in them is inert
INERT = {"title", "data-name", "data-id", "data-step", "aria-label"}


def self_contained(text: str, page: Page, hostile: bool = False) -> None:
    """No script, no element or style that points outside the page, nothing to fetch. (A page built from
    hostile names holds their addresses as text: only there.)"""
    assert "<script" not in text.lower() and not {"script", "img", "link", "iframe", "object"} & set(page.start_tags)
    if not hostile:
        assert "http://" not in text and "https://" not in text and "src=" not in text
    for node in page.root.all():
        for key, value in node.attrs.items():
            assert key not in ("src", "href", "srcset", "action", "xlink:href") and not key.startswith("on"), key
            if key not in INERT:
                assert "//" not in value and "url(" not in value.replace("url(#scale)", ""), (key, value)
    style = page.root.one("style").content()
    assert "@import" not in style and "url(" not in style and "@font-face" not in style
    assert page.root.one("html").attrs["lang"] == "en" and page.doctype.lower() == "doctype html"


def check_map(page: Page, c: dict) -> dict[str, Node]:
    """Each compared tensor: one cell, in its layer's row (or the row outside the layers), under its step's
    column; a failed tensor marked without colour (a ×), the first divergence outlined. Returns the cells."""
    cells: dict[str, Node] = {}
    for node in page.root.all("td", class_="c"):
        if "nc" not in node.classes:
            assert node.attrs["data-name"] not in cells, node.attrs["data-name"]
            cells[node.attrs["data-name"]] = node
    assert sorted(cells) == sorted({t["name"] for t in c["tensors"]})
    first = (c.get("first_divergence") or {}).get("tensor")
    for t in c["tensors"]:
        cell, layer = cells[t["name"]], layer_of(t["name"])
        row = cell.parent
        table = row.parent.parent
        assert table.attrs["id"] == ("outside" if layer is None else "layers")
        assert row.attrs["data-layer"] == ("" if layer is None else str(layer))
        steps = [th.attrs["data-step"] for th in table.all("th", class_="step")]
        column = [n for n in row.children if n.tag == "td" and "note" not in n.classes].index(cell)
        step = t["name"] if layer is None else t["name"].split(".", 3)[3] if t["name"].count(".") >= 3 else ""
        assert steps[column] == step, (t["name"], steps[column])
        assert ("fail" in cell.classes) == (not t["ok"]) and ("×" in cell.content()) == (not t["ok"])
        assert ("first" in cell.classes) == (t["name"] == first)
        assert cell.attrs["title"].startswith(t["name"] + "\n") and "max_rel" in cell.attrs["title"]
    return cells


# ------------------------------------------------------------------------------------- tests
def test_a_comparison_reads_at_a_glance():
    c = routed()
    text = html_report(c, title="a backend")
    page = Page(text)
    self_contained(text, page)
    verdict = page.root.one(id="verdict")
    assert verdict.content() == c["verdict"] and verdict.classes == ["verdict", "divergence"]
    assert c["verdict"].startswith("FIRST DIVERGENCE: model.layers.2.feed_forward.selected_experts")
    assert [s.attrs["id"] for s in page.root.all("section")] == ["summary", "map", "routing"]
    summary = page.root.one(id="summary").content()
    assert "compared 61 of the reference's 62 tensors, in 3 of its 3 layers" in summary
    assert "max_rel ≤ 0.0001 and NMSE ≤ -70 dB" in summary
    assert "model.layers.0.feed_forward.router_logits" in summary  # only in the reference, listed
    cells = check_map(page, c)
    assert cells["model.layers.2.feed_forward.selected_experts"].classes == ["c", "fail", "first"]
    assert "≈" in cells["model.layers.1.feed_forward.selected_experts"].content()  # the near-tie, within the tier
    assert "judged on positions < 4" in cells["model.layers.2.self_attn.q_proj"].attrs["title"]
    hatched = page.root.one("td", class_="nc")
    assert hatched.attrs["data-name"] == "model.layers.0.feed_forward.router_logits"
    assert hatched.parent.attrs["data-layer"] == "0"
    assert "first divergence" in cells["model.layers.2.feed_forward.selected_experts"].parent.content()
    assert "fp32 tier: 0.0001" in page.root.one("svg").content()  # the tier on the colour scale
    # routing: agreement per layer, then each near-tie and flip with its layer, position and experts
    per_layer = [[td.content() for td in tr.all("td")] for tr in page.root.one(id="routing-layers").all("tr")][1:]
    assert per_layer == [["0", "100.0%", "0", "0"], ["1", "92.3%", "1", "0"], ["2", "75.0%", "0", "1"]]
    listed = [[td.content() for td in tr.all("td")][:5] for tr in page.root.one(id="flips").all("tr")][1:]
    tie, flip = ([f for f in c["flips"] if f["near_tie"] is kind][0] for kind in (True, False))
    assert listed == [["near-tie", "1", "4", str(tie["only_a"]), str(tie["only_b"])],
                      ["FLIP", "2", "2", str(flip["only_a"]), str(flip["only_b"])]]


def test_a_diagnosis_ranks_its_hypotheses():
    d = diagnosed()
    text = html_report(diagnosis=d)
    page = Page(text)
    self_contained(text, page)
    assert d["best"] == "conv-taps-reversed"
    verdict = page.root.one(id="verdict")
    assert verdict.content().startswith("DIAGNOSED: conv-taps-reversed (reversed) reproduces the dump; first "
                                        "divergence at model.layers.1.conv.conv_out, position 0")
    assert verdict.classes == ["verdict", "divergence"]
    assert page.root.one("p", class_="sub").content() == d["comparison"]["verdict"]
    assert [s.attrs["id"] for s in page.root.all("section")] == ["summary", "map", "routing", "diagnosis"]
    check_map(page, d["comparison"])  # the dump against the reference, carried by the diagnosis
    rows = [r for r in page.root.one(id="hypotheses").all("tr") if "data-id" in r.attrs]
    assert [r.attrs["data-id"] for r in rows] == [h["id"] for h in d["hypotheses"]]  # in rank order
    assert rows[0].classes == ["best"] and not any("best" in r.classes for r in rows[1:])
    assert [("contra" in r.classes) for r in rows] == [h.get("contradicted", False) for h in d["hypotheses"]]
    assert "REPRODUCES" in rows[0].content() and "model.layers.1.conv.conv_out @0" in rows[0].content()
    assert "no catalogued mistake" not in text
    # a comparison given with it is the one mapped; the diagnosis still leads
    both = Page(html_report(routed(), d))
    assert both.root.one(id="verdict").content().startswith("DIAGNOSED")
    check_map(both, routed())


def test_when_nothing_reproduces_it_says_so():
    d = copy.deepcopy(diagnosed())
    d.update(best=None, nothing_reproduces=True)
    hs = d["hypotheses"]
    hs[0].update(reproduces=False, layers=[1], experts=[0, 3])
    hs[1].update(variant="c before b, layer 1", params={"layers": [1]})  # its variant says where: not twice
    hs[2]["params"] = {"layers": [0], "experts": [2]}
    for n, h in enumerate(hs):
        h["contradicted"] = n >= len(hs) - 2
    page = Page(html_report(diagnosis=d))
    verdict = page.root.one(id="verdict")
    assert verdict.classes == ["verdict", "nothing"]
    assert verdict.content().startswith("NOTHING REPRODUCES: no catalogued mistake reproduces this dump; the "
                                        "divergence begins at model.layers.1.conv.conv_out, position 0")
    assert page.root.one("p", class_="nofit").content() == "No catalogued mistake reproduces this dump."
    table = page.root.one(id="hypotheses")
    rows = list(table.all("tr"))[1:]
    assert not any("best" in r.classes for r in rows)
    assert "layers 1 · experts 0, 3" in rows[0].content() and "layers 0 · experts 2" in rows[2].content()
    assert "c before b, layer 1" in rows[1].content() and "·" not in rows[1].content()
    divider = [n for n, r in enumerate(rows) if "divider" in r.classes]
    assert divider == [len(hs) - 1] and [r.classes for r in rows[-2:]] == [["contra"], ["contra"]]
    baseline = rows[len(hs) - 2]  # the reference itself, just above the ruled-out mistakes
    assert baseline.classes == ["baseline"] and "no mistake" in baseline.content()
    assert f"{d['no_mistake']['explained']} / {d['compared']}" in baseline.content()
    assert all("contradicted" in r.content() for r in rows[-2:]) and "ruled out" in rows[divider[0]].content()
    # without the flag, a diagnosis whose best is null says the same
    d.pop("nothing_reproduces")
    assert Page(html_report(diagnosis=d)).root.one(id="verdict").classes == ["verdict", "nothing"]


def test_hostile_names_are_text_and_edges_are_handled():
    c = handmade()
    text = html_report(c, {"kind": "trace", "model": EVIL, "tier": EVIL, "agrees": False, "best": EVIL,
                           "hypotheses": [{"id": EVIL, "variant": EVIL, "reproduces": True, "where": {"tensor": EVIL},
                                           "layers": EVIL}], "first_divergence": {"tensor": EVIL, "position": 0},
                           "not_applicable": [{"id": EVIL, "reason": EVIL}], "skipped": {EVIL: EVIL}},
                       title=EVIL)
    page = Page(text)
    self_contained(text, page, hostile=True)
    assert html.unescape(page.root.one("title").content()).startswith(EVIL)
    cells = check_map(page, c)
    assert sorted(int(r.attrs["data-layer"]) for r in page.root.one(id="layers").all("tr") if r.attrs.get(
        "data-layer")) == list(range(40))
    assert cells[f"model.layers.7.{EVIL}"].parent.attrs["data-layer"] == "7"  # a step no schema knows: a column
    assert cells[EVIL].parent.attrs["data-layer"] == ""
    nan = cells["model.layers.20.self_attn.q_proj"]
    assert nan.attrs["style"].startswith(f"background:{NON_FINITE}") and "max_rel NaN" in nan.attrs["title"]
    assert EVIL in nan.attrs["title"] and "first" in nan.classes
    assert "max_rel inf" in cells["lm_head"].attrs["title"]
    assert EVIL in page.root.one(id="summary").content() and EVIL in page.root.one(id="diagnosis").content()
    assert f"note: {EVIL} note" in page.root.one(id="summary").content()
    # nothing compared, nothing given, nonsense where numbers go
    empty = dict(handmade(0), tensors=[], only_in_a=[], only_in_b=[], first_divergence=None, enough=False, ok=False,
                 verdict="NOT ENOUGH IN COMMON: compared 0 tensors")
    page = Page(html_report(empty))
    assert page.root.one(id="verdict").classes == ["verdict", "little"]
    assert "No tensor was compared" in page.root.one(id="map").content()
    assert Page(html_report()).root.one(id="verdict").content().startswith("NOTHING TO REPORT")
    odd = dict(handmade(2), tensors=[{"name": "model.layers.0", "max_rel": [1], "ok": "yes", "shape": 5}, 7, None],
               only_in_a=None, only_in_b=[[]], flips={}, coverage=[])
    drawn = [n for n in Page(html_report(odd)).root.all("td", class_="c") if "nc" not in n.classes]
    assert len(drawn) == 1 and "×" in drawn[0].content()  # "ok" must be true to pass


def test_the_colour_scale_is_fixed():
    assert colour(0.0) == colour(1e-12) == colour(1e-8) == SCALE[0]
    assert colour(1.0) == colour(50.0) == SCALE[-1] and colour(1e-4) == SCALE[4]
    assert colour(float("nan")) == colour(float("inf")) == colour(None) == NON_FINITE
    steps = [colour(10.0 ** (k / 4)) for k in range(-32, 1)]
    assert len(set(steps)) == len(steps)  # every quarter decade its own colour


# ------------------------------------------------------------------------------------- in a browser
def png_rgb(data: bytes) -> np.ndarray:
    """The pixels (H, W, 3) of an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body, pos = data[pos + 8:pos + 8 + n], pos + 12 + n
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    w, h, depth, kind, _, _, interlace = header
    assert depth == 8 and kind in (2, 6) and not interlace, header
    bpp = 3 if kind == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, w * bpp + 1)
    out, prev = np.zeros((h, w * bpp), np.uint8), np.zeros(w * bpp, np.int64)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if f == 1:  # Sub
            line = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) & 255
        elif f == 2:  # Up
            line = (line + prev) & 255
        elif f in (3, 4):  # Average, Paeth: each byte needs the one decoded before it
            cur, up = line.tolist(), prev.tolist()
            for i in range(len(cur)):
                a, c = (cur[i - bpp], up[i - bpp]) if i >= bpp else (0, 0)
                if f == 3:
                    cur[i] = (cur[i] + (a + up[i]) // 2) & 255
                else:
                    p = a + up[i] - c
                    pa, pb, pc = abs(p - a), abs(p - up[i]), abs(p - c)
                    cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else up[i] if pb <= pc else c)) & 255
            line = np.array(cur, np.int64)
        out[y], prev = line, line
    return out.reshape(h, w, bpp)[..., :3]


def test_the_page_renders_in_a_headless_browser(tmp_path):
    text = html_report(diagnosis=diagnosed(), title="rendered")  # every section: verdict, map, routing, hypotheses
    Page(text)  # the structure, whether or not a browser is here
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:  # no browser on this machine: the structure tests above are the check
        return
    page, png = tmp_path / "report.html", tmp_path / "report.png"
    page.write_text(text, encoding="utf-8")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,800",
                    f"--screenshot={png}", page.as_uri()], capture_output=True, timeout=120, check=False)
    assert png.exists(), "the browser wrote no screenshot"
    pixels = png_rgb(png.read_bytes())
    assert pixels.shape == (800, 1000, 3)
    colours = {tuple(int(v) for v in p) for p in pixels.reshape(-1, 3)}
    assert len(colours) > 50 and (pixels < 128).any() and (pixels == 255).all(axis=-1).mean() > 0.3
    assert (0xb3, 0x26, 0x1e) in colours  # the divergence verdict's bar: the CSS is applied
    assert tuple(int(SCALE[0][i:i + 2], 16) for i in (1, 3, 5)) in colours  # the map's cells are drawn


def test_compare_and_diagnose_write_the_page_with_html(tmp_path):
    """``--html FILE`` on both commands: the page written beside the usual report; an existing page replaced only
    with --force; never a file the command reads, --force or not."""
    from lfm2np.io.safetensors import save_checkpoint

    from conftest import subprocess_env

    m, ids = model(CASE), golden(CASE)["capture.ids"]
    a = traced(m, ids, planted(+1, flip=True)).save(tmp_path / "a")
    b = traced(m, ids, planted(-1)).save(tmp_path / "b")
    page = tmp_path / "report.html"

    def run(*args):
        return subprocess.run([sys.executable, "-m", "lfm2np", *map(str, args)], capture_output=True, text=True,
                              env=subprocess_env(), timeout=300)

    done = run("compare", a, b, "--html", page)
    assert done.returncode == 1, done.stderr  # the planted flip
    shown = Page(page.read_text(encoding="utf-8"))
    assert shown.root.one(id="verdict").content() == done.stdout.splitlines()[0]
    first = page.read_bytes()
    again = run("compare", a, b, "--html", page)
    assert again.returncode == 2 and "exists; give --force" in again.stderr and page.read_bytes() == first
    before = a.read_bytes()
    for target in (a, tmp_path / "." / "a.safetensors"):
        refused = run("compare", a, b, "--html", target, "--force")
        assert refused.returncode == 2 and "is a file this command reads" in refused.stderr, refused.stderr
    assert a.read_bytes() == before
    assert run("compare", a, a, "--html", page, "--force").returncode == 0
    assert Page(page.read_text(encoding="utf-8")).root.one(id="verdict").classes == ["verdict", "agree"]

    save_checkpoint(tmp_path / "ck", m.config, {n: m.params[n] for n in m.params})
    diag = tmp_path / "diagnosis.html"
    done = run("diagnose", tmp_path / "ck", "--dump", a, "--html", diag)
    assert done.returncode == 1, done.stderr
    hypotheses = Page(diag.read_text(encoding="utf-8")).root.one(id="hypotheses")
    assert hypotheses is not None
    assert run("diagnose", tmp_path / "ck", "--dump", a, "--html", a, "--force").returncode == 2
    assert run("diagnose", tmp_path / "ck", "--catalogue", "--html", diag).returncode == 2
    assert a.read_bytes() == before
