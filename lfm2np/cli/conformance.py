"""``lfm2np conformance make | check | run``: the conformance kit for LFM backends (docs/conformance.md)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..config import ROPE_READINGS
from ..errors import Lfm2npError, shown
from ..io.files import identity
from ..io.gguf import read_gguf_config
from ..io.hub import resolve
from ..io.prompts import read_prompts
from ..io.tokenizer import Tokenizer
from ..loading import is_gguf, load, load_config
from ..oracle.conformance import Pack
from ..oracle.conformance_backends import KV_TYPES, LlamaCppBackend, TransformersBackend
from ..oracle.conformance_cases import BUILTIN_PROMPTS
from ..oracle.conformance_check import Results, check, summary_json
from ..oracle.conformance_diagnose import MODES, diagnose_failures
from ..oracle.conformance_make import make_pack
from ..oracle.conformance_report import check_json, format_check, html_check
from ..oracle.conformance_run import Lfm2npBackend, run_pack
from ..oracle.tolerance import COMPARE_TIERS
from .cluster_options import Task, TaskProgress, add_cluster_arguments, runner_for
from .common import Subparsers, add_force_argument, add_html_argument, add_model_arguments, check_outputs
from .common import MODEL_HELP, input_file, load_model, memory_budget, model_argument, output_dir, positive_int, progress
from .common import write_page
from .options import add_model_argument, layer_list

BACKENDS = ("lfm2np", "llama.cpp", "transformers")


def _source(model: str) -> Path:
    """The files a MODEL argument names: a .gguf file, or a checkpoint directory (a cached repo id's snapshot)."""
    return Path(model) if is_gguf(model) else resolve(model)


def _name(model: str, source: Path, given: str | None) -> str:
    """The model's name in llama.cpp's file names: --name, else the directory's (or .gguf's) name, else the repo
    id's last part (a cached snapshot's directory is a commit hash)."""
    if given:
        return given
    if Path(model).expanduser().exists():
        return source.name[:-5] if source.name.lower().endswith(".gguf") else source.name
    return model.rstrip("/").split("/")[-1]


def _not_inside(out: Path, what: str, directory: Path) -> None:
    """An output never lies in a directory the command reads (the pack, the results), whatever links or names lead
    there: ``run --out PACK --force`` wrote its results over the pack's references, ``check --html
    PACK/manifest.json --force`` over its manifest."""
    place = identity(directory)
    if place is None:
        return
    real = Path(os.path.realpath(out.expanduser()))
    inside = next((p for p in (real, *real.parents) if identity(p) == place), None)
    if inside is not None:
        raise Lfm2npError(f"{out}: is inside {what} {directory}, which this command reads; choose an output "
                          f"outside it")


def _model_name(value: str) -> str:
    """--name: the model's part of llama.cpp's file names (pytorch-<name>.bin): a file name, no directory."""
    if not value or value in (".", "..") or any(c in value for c in "/\\") or not value.isprintable():
        raise argparse.ArgumentTypeError(f"{shown(value)}: expected a name for llama.cpp's files (pytorch-NAME.bin): "
                                         f"no path separator or control character, not empty")
    return value


def _cmd_make(args: argparse.Namespace) -> int:
    check_outputs([args.out], args.model, args.force, directory=True,
                  reads=[args.prompts] if args.prompts else [])
    t0 = time.perf_counter()
    source = _source(args.model)
    config = read_gguf_config(source) if is_gguf(str(source)) else load_config(source, args.rope_reading)
    prompts = read_prompts(args.prompts) if args.prompts else list(BUILTIN_PROMPTS)
    try:
        tokenizer = Tokenizer.load(source)
    except Lfm2npError:
        if any(p.kind != "ids" for p in prompts):
            raise
        tokenizer = None  # prompts of token ids need none
    layers = None if args.op_layers is None else (list(range(config.num_hidden_layers)) if not args.op_layers
                                                  else args.op_layers)
    out = make_pack(args.out, name=_name(args.model, source, args.name), source=source, config=config,
                    tokenizer=tokenizer, prompts=prompts, runner=runner_for(args, source, "conformance make"),
                    dtype=args.dtype, op_layers=layers, task=Task)
    cases = json.loads((out / "manifest.json").read_text())["cases"]
    kinds = {k: sum(c["kind"] == k for c in cases) for k in ("oneshot", "decode", "operator", "llama.cpp")}
    print(f"wrote a conformance pack of {len(cases)} cases to {out} ({kinds['oneshot']} oneshot, {kinds['decode']} "
          f"decoding scenarios, {kinds['operator']} operators" + (", llama.cpp's files" if kinds["llama.cpp"] else "")
          + f") in {time.perf_counter() - t0:.1f} s")
    return 0


def _diagnosis_model(args: argparse.Namespace, pack: Pack):
    """The model diagnose runs: --model, else the pack's own source when it is on this machine (else None)."""
    model = args.model or pack.manifest["model"].get("source")
    if model is None or (args.model is None and not Path(model).exists()):
        return None
    return load(model, dtype=args.dtype or pack.manifest.get("reference", {}).get("dtype", "float32"),
                memory_budget=args.memory_budget)


def _cmd_check(args: argparse.Namespace) -> int:
    if args.html is not None:
        check_outputs([args.html], None, args.force)
        _not_inside(args.html, "the pack", args.pack)
        _not_inside(args.html, "the results directory", args.results)
    pack = Pack.open(args.pack)
    results = Results(args.results, pack)
    verdicts = check(pack, results, args.tier, args.cases)
    if any(not v.ok for v in verdicts) and args.diagnose != "none":
        model = _diagnosis_model(args, pack)
        if model is None:
            for v in verdicts:
                if not v.ok:
                    v.diagnosis_text = (f"not diagnosed: the pack's model ({pack.manifest['model'].get('source')}) is "
                                        f"not on this machine; give --model MODEL")
        else:
            diagnose_failures(model, pack, results, verdicts, args.diagnose,
                              None if args.json else lambda s: progress(f"[{s}]"))
    backend = results.meta.get("backend")
    if args.json:
        print(json.dumps(check_json(summary_json(pack, results, verdicts), verdicts), indent=1, allow_nan=False))
    else:
        print(format_check(pack, verdicts, backend))
    if args.html is not None:
        write_page(args.html, html_check(pack, verdicts, backend))
    return 0 if all(v.ok for v in verdicts) else 1


def _cmd_run(args: argparse.Namespace) -> int:
    check_outputs([args.out], args.model, args.force, directory=True)
    _not_inside(args.out, "the pack", args.pack)
    pack = Pack.open(args.pack)
    if args.backend == "lfm2np":
        backend = Lfm2npBackend(load_model(args), f"lfm2np ({args.dtype})")
    elif args.backend == "llama.cpp":
        if not is_gguf(args.model):
            raise Lfm2npError(f"the llama.cpp backend runs a .gguf file; got {args.model}")
        backend = LlamaCppBackend(args.model, args.kv, args.threads, args.flash_attn)
    else:
        backend = TransformersBackend(_source(args.model))
    counts = run_pack(pack, backend, args.out, args.cases, TaskProgress(f"conformance run ({args.backend})"))
    print(f"wrote {backend.name}'s results to {args.out}: {counts['cases']} cases, {counts['operators']} operators"
          + (f" ({counts['skipped']} operator cases the backend cannot run alone)" if counts["skipped"] else ""))
    return 0


def _layers_or_all(value: str) -> list[int]:
    return [] if value == "all" else layer_list(value)


def register(sub: Subparsers) -> None:
    p = sub.add_parser("conformance", help="a conformance pack for LFM backends: make, check, run",
                       description="A self-describing pack of reference outputs (prompts, logits, decoding "
                                   "scenarios, per-operator cases, llama.cpp's files) a backend's CI runs against; "
                                   "docs/conformance.md.")
    cmds = p.add_subparsers(dest="conformance_command", metavar="COMMAND")
    cmds.required = True

    m = cmds.add_parser("make", help="make a pack from a model",
                        description="Compute the reference of every case (one task per prompt or scenario) and "
                                    "write the pack: manifest (model, config hash, every tensor's SHA-256, tiers, "
                                    "cases), prompts, references, operator cases, llama.cpp's files.")
    add_model_argument(m)
    m.add_argument("--out", required=True, type=output_dir, help="the pack's directory")
    m.add_argument("--prompts", type=input_file, metavar="FILE",
                   help="prompts file (.txt: one per line; .json/.jsonl: texts, conversations with tools, or ids); "
                        "default: a text, a chat and a tool call")
    m.add_argument("--op-layers", type=_layers_or_all, nargs="+", metavar="LAYER", default=None,
                   action=_Flatten, help="layers of the operator cases ('all', or indices; default: the first layer "
                                         "of each kind)")
    m.add_argument("--name", type=_model_name, help="the model's name in llama.cpp's file names (default: its directory's name)")
    m.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="the reference's numerics (float64: the oracle mode)")
    m.add_argument("--memory-budget", type=memory_budget, default=None,
                   metavar="SIZE", help="converted weights each process keeps in memory (as other commands)")
    m.add_argument("--rope-reading", default="trained", choices=ROPE_READINGS,
                   help="an LFM3 RoPE labelled 'default' with a partial factor: as trained, or as transformers reads it")
    add_cluster_arguments(m)
    add_force_argument(m, "files in a non-empty output directory")
    m.set_defaults(func=_cmd_make)

    c = cmds.add_parser("check", help="judge a backend's results against a pack",
                        description="Judge each case's results at its tier (near-tie aware), diagnose every failure "
                                    "(with the pack's model, or --model). Exit 0 when every case passes, 1 when one "
                                    "fails (or the backend wrote nothing for it), 2 on bad input (a pack changed "
                                    "by hand, results for another model).")
    c.add_argument("pack", type=Path, help="the pack's directory")
    c.add_argument("--results", required=True, type=Path, help="the backend's results directory "
                                                                "(docs/conformance.md: the layout)")
    c.add_argument("-m", "--model", type=model_argument, help="the model diagnose runs (default: the pack's source, "
                                                              "when it is on this machine)")
    c.add_argument("--dtype", choices=["float32", "float64"], help="diagnose's numerics (default: the pack's)")
    c.add_argument("--memory-budget", type=memory_budget, metavar="SIZE",
                   help="converted weights kept in memory for the diagnosis")
    c.add_argument("--tier", choices=list(COMPARE_TIERS), help="judge every case at this tier instead of its own "
                                                               "(a bf16 or quantised backend: bf16, q8_0, ...)")
    c.add_argument("--cases", nargs="+", metavar="GLOB", help="only the cases whose ids match ('oneshot-*', "
                                                              "'decode-*', 'op-*', llama.cpp)")
    c.add_argument("--diagnose", choices=MODES, default="all", help="diagnose every failed case (all), the first of "
                                                                    "each kind, or none")
    c.add_argument("--json", action="store_true", help="print the verdicts as strict JSON")
    add_html_argument(c)
    add_force_argument(c, "an existing --html file")
    c.set_defaults(func=_cmd_check)

    r = cmds.add_parser("run", help="run a pack's cases on a backend and write its results",
                        description="Play the pack's cases on a backend and write its results in the layout "
                                    "'conformance check' reads: llama.cpp (llama-cpp-python, a .gguf; an F32 KV "
                                    "cache unless --kv), transformers (a checkpoint), or lfm2np itself (any "
                                    "checkpoint or GGUF, any --dtype).")
    r.add_argument("pack", type=Path, help="the pack's directory")
    r.add_argument("--backend", required=True, choices=BACKENDS, help="the backend to run")
    r.add_argument("model", type=model_argument, metavar="MODEL", help=f"what the backend runs: {MODEL_HELP}")
    r.add_argument("--out", required=True, type=output_dir, help="the results directory")
    r.add_argument("--cases", nargs="+", metavar="GLOB", help="only the cases whose ids match")
    r.add_argument("--kv", choices=list(KV_TYPES), default="f32", help="llama.cpp's KV cache type (default f32)")
    r.add_argument("--threads", type=positive_int, help="llama.cpp's threads (default 2)")
    r.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash attention (default off: on the CPU "
                                                             "it rounds through f16, about 2e-4 of the logits' scale)")
    add_model_arguments(r)
    add_force_argument(r, "files in a non-empty results directory")
    r.set_defaults(func=_cmd_run)


class _Flatten(argparse.Action):
    """--op-layers 0,2 5 -> [0, 2, 5]; --op-layers all -> []."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [x for v in values for x in v])
