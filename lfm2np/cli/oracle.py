"""``lfm2np trace``, ``lfm2np compare`` and ``lfm2np golden``: the oracle's command line. ``trace`` and ``golden``
take a prompts file too (``--prompts``: one trace, or one golden directory, per prompt, computed as tasks: serially,
or on a Dask cluster with ``--workers`` / ``--scheduler``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Lfm2npError
from ..io.tokenizer import Tokenizer
from ..oracle.compare import compare, format_comparison
from ..oracle.follow import following
from ..io.prompts import read_prompts
from ..oracle.golden import golden_task, save_golden, write_golden
from ..oracle.report import html_report
from ..oracle.tolerance import COMPARE_TIERS, default_tier
from ..oracle.trace import Trace, record, trace_task
from .cluster_options import Task, add_cluster_arguments, runner_for
from .common import LayerProgress, Subparsers, add_force_argument, add_model_arguments, check_outputs, load_model
from .common import add_html_argument, encode_prompt, input_file, model_argument, output_dir, output_file, utf8_text
from .common import write_page
from .options import add_ids_argument, add_image_argument, add_layers_argument, add_model_argument, add_text_argument


def _ids(args: argparse.Namespace, model) -> np.ndarray:
    if args.text is not None:
        return np.array(Tokenizer.load(args.model).encode(args.text, add_bos=True))
    return np.array(args.ids, dtype=np.int64)


def _trace_input(args: argparse.Namespace, model) -> tuple[np.ndarray, Any]:
    """The ids to trace and the images that go with them: --ids as given (already expanded, with --image's files
    processed by the model's processor), or --text / --chat expanded by lfm2np."""
    if args.text is None and args.chat is None:
        if args.system is not None:
            raise Lfm2npError("--system goes with --chat")
        return np.array(args.ids, dtype=np.int64), [str(p) for p in args.image] if args.image else None
    ids, images = encode_prompt(model, Tokenizer.load(args.model), args)
    return np.array(ids, dtype=np.int64), images


def _per_prompt(args: argparse.Namespace, fn, payload, what: str, write) -> int:
    """``fn`` on every prompt of ``--prompts`` (the model's tokenizer encodes them), as tasks of the runner; each
    result handed to ``write(prompt, result)`` as it arrives. Returns how many prompts."""
    prompts = read_prompts(args.prompts)
    tokenizer = Tokenizer.load(args.model) if any(p.kind != "ids" for p in prompts) else None
    tasks = [Task(payload(p.encode(tokenizer)), f"prompt {p.id!r}") for p in prompts]
    runner_for(args, args.model, what)(fn, tasks, lambda n, result: write(prompts[n], result))
    return len(prompts)


def _trace_out(value: str) -> Path:
    """--out of trace: a file (one trace) or, with --prompts, a directory; checked in the command."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return Path(value).expanduser()


def _cmd_trace(args: argparse.Namespace) -> int:
    if args.prompts is not None and (args.image or args.system is not None):
        raise Lfm2npError(f"{'--image' if args.image else '--system'} goes with one prompt (--ids, --text or --chat), "
                          f"not --prompts")
    if args.prompts is not None:
        if args.out.exists() and not args.out.is_dir():
            raise Lfm2npError(f"--out {args.out}: is a file; with --prompts, --out is a directory (one trace per "
                              f"prompt)")
        check_outputs([args.out], args.model, args.force, directory=True, reads=[args.prompts])
        def save(prompt, trace: Trace) -> None:
            if not len(trace):
                raise Lfm2npError(f"--pattern {' '.join(args.pattern or [])} matches no intermediate of this model "
                                  f"(prompt {prompt.id!r})")
            args.out.mkdir(parents=True, exist_ok=True)
            trace.save(args.out / f"{prompt.id}.safetensors")

        done = _per_prompt(args, trace_task, lambda ids: (ids, args.pattern), "trace", save)
        print(f"wrote {done} traces to {args.out} (one <prompt id>.safetensors and .json per prompt)")
        return 0
    try:
        output_file(str(args.out))
    except argparse.ArgumentTypeError as e:
        raise Lfm2npError(f"--out {e}") from None
    if args.out.suffix not in ("", ".safetensors"):  # Trace.save would write another name than the one given
        raise Lfm2npError(f"--out {args.out}: a trace is written as .safetensors (with a .json summary beside it); "
                          f"give a name ending in .safetensors or without a suffix, not {args.out.suffix!r}")
    out = args.out.with_suffix(".safetensors")
    check_outputs([out, out.with_suffix(".json")], args.model, args.force)
    model = load_model(args)
    ids, images = _trace_input(args, model)
    _, trace = record(model, ids, args.pattern, progress=LayerProgress("trace"), images=images)
    if args.image:  # the ids it ran are the trace's "ids"; the images beside them
        trace.meta["images"] = [str(p) for p in args.image]
    if not len(trace):
        raise Lfm2npError(f"--pattern {' '.join(args.pattern)} matches no intermediate of this model "
                          f"(names look like model.layers.0.conv.conv_out; see docs/oracle.md)")
    path = trace.save(args.out)
    print(f"wrote {len(trace)} tensors to {path} (summary: {path.with_suffix('.json')})")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    if (args.b is None) == (args.model is None):
        raise Lfm2npError("give the reference as a trace (B) or as a model (--model MODEL), one of the two")
    if args.html is not None:
        check_outputs([args.html], args.model, args.force, reads=[p for p in (args.a, args.b) if p is not None])
    theirs = Trace.load(args.a)
    tier = args.tier or default_tier(getattr(args, "dtype", None) if args.model is not None else None)
    if args.model is not None:  # the reference computed on the backend's ids, following its near-tie choices
        reference = following(load_model(args), theirs, tier)
    else:
        reference = Trace.load(args.b)
    result = compare(theirs, reference, tier, args.pattern, prefix=args.prefix, partial=args.partial)
    if args.json:
        print(json.dumps(result.to_json(), indent=1, allow_nan=False))
    else:
        print(format_comparison(result, all_rows=args.all))
    if args.html is not None:
        write_page(args.html, html_report(comparison=result.to_json(), title=f"lfm2np compare: {args.a.name}"))
    return 0 if result.ok else 1


def _cmd_golden(args: argparse.Namespace) -> int:
    check_outputs([args.out], args.model, args.force, directory=True,
                  reads=[args.prompts] if args.prompts is not None else [])
    if args.prompts is not None:
        done = _per_prompt(args, golden_task, lambda ids: (ids, args.layers or None), "golden",
                           lambda prompt, vectors: save_golden(vectors, args.out / prompt.id))
        print(f"wrote golden vectors of {done} prompts to {args.out} (one directory per prompt)")
        return 0
    model = load_model(args)
    out = write_golden(model, _ids(args, model), args.out, args.layers or None)  # --layers alone: every layer
    print(f"wrote golden vectors to {out} (manifest.json lists the operators)")
    return 0


def _add_input(p: argparse.ArgumentParser, images: bool = False) -> None:
    add_model_argument(p)
    src = p.add_mutually_exclusive_group()
    add_ids_argument(src, "token ids (default: 1 2 3 4 5 6 7 8)", default=[1, 2, 3, 4, 5, 6, 7, 8])
    add_text_argument(src, "text to tokenize with the checkpoint's tokenizer (BOS prepended)")
    if images:
        src.add_argument("--chat", type=utf8_text, help="a user message, formatted with the checkpoint's chat "
                                                       "template (with the assistant header)")
    src.add_argument("--prompts", type=input_file, metavar="FILE",
                     help="a prompts file (.txt: one text per line; .json/.jsonl: texts, conversations, ids): one "
                          "output per prompt, in the directory --out")
    if images:
        p.add_argument("--system", type=utf8_text, help="system message for --chat")
        add_image_argument(p, "LFM2-VL: an image of the sequence, in order of its placeholders")
    add_model_arguments(p)
    add_cluster_arguments(p)


def register(sub: Subparsers) -> None:
    """Add the ``trace``, ``compare`` and ``golden`` subcommands."""
    p = sub.add_parser("trace", help="record every intermediate of a forward pass",
                       description="Run one sequence and save every named intermediate (safetensors + JSON summary). "
                                   "LFM2-VL: --image with --ids that already hold each image's placeholders, or with "
                                   "--text / --chat, which lfm2np expands; the trace records the ids it ran.")
    _add_input(p, images=True)
    p.add_argument("--out", required=True, type=_trace_out,
                   help="output file (.safetensors; a .json summary is written beside it); with --prompts, a "
                        "directory")
    p.add_argument("--pattern", nargs="+", help="only names matching these globs, e.g. 'model.layers.3.*'")
    add_force_argument(p, "an existing trace and its summary")
    p.set_defaults(func=_cmd_trace)

    p = sub.add_parser("compare", help="compare two traces and name the first divergence",
                       description="Compare trace A (the backend under test) with trace B (the reference), or with "
                                   "lfm2np's run of --model MODEL on the same ids. Exit 0 when every tensor is within "
                                   "the tier and enough is shared to localise a divergence; 1 when a tensor is "
                                   "outside it, or too little is shared (see --partial); 2 when the traces ran "
                                   "different inputs.")
    p.add_argument("a", type=input_file, help="trace under test (.safetensors; lfm2np, llama.cpp or transformers "
                                              "names)")
    p.add_argument("b", type=input_file, nargs="?", help="reference trace (.safetensors; any of those names)")
    p.add_argument("-m", "--model", type=model_argument, metavar="MODEL",
                   help="instead of B: the reference computed by lfm2np from MODEL on A's ids, following A's expert "
                        "choices where they are near-ties (so every tensor is judged on equal routing)")
    add_model_arguments(p)
    p.add_argument("--tier", choices=list(COMPARE_TIERS),
                   help="tolerance tier (default fp32; llamacpp-cpu with --model and --dtype llamacpp-cpu)")
    p.add_argument("--pattern", nargs="+", help="only names matching these globs (lfm2np names)")
    p.add_argument("--prefix", action="store_true",
                   help="traces of different lengths: compare their common prefix (their ids must agree on it)")
    p.add_argument("--partial", action="store_true",
                   help="accept a comparison that shares too little to localise a divergence (nothing after the "
                        "embeddings, or under half the reference's layers): without it, that is exit 1")
    p.add_argument("--all", action="store_true", help="show every tensor, not only up to the first divergence")
    p.add_argument("--json", action="store_true", help="print the comparison as strict JSON (a non-finite measure is "
                   "the string \"inf\", \"-inf\" or \"nan\")")
    add_html_argument(p)
    add_force_argument(p, "an existing --html file")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("golden", help="write golden vectors: each operator's inputs, weights and outputs",
                       description="Write one safetensors file per operator instance plus a manifest, for testing "
                                   "another backend kernel by kernel.")
    _add_input(p)
    p.add_argument("--out", required=True, type=output_dir, help="output directory")
    add_layers_argument(p, "the layers to write (default: all)")
    add_force_argument(p, "files in a non-empty output directory")
    p.set_defaults(func=_cmd_golden)


