"""``lfm2np diagnose``: from a backend's dump (logits, a trace, or its greedy tokens) to the porting mistake."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import Lfm2npError
from ..oracle.diagnose import diagnose, format_diagnosis
from ..io.hub import resolve
from ..io.tokenizer import Tokenizer
from ..oracle.dumps import load_dump, read_npz, token_stream
from ..oracle.image_mistakes import IMAGE_BY_ID, diagnose_processor, format_processor_diagnosis
from ..oracle.processor_dump import is_processor_dump, processor_dump
from ..processor import ImageTokens, ProcessorConfig
from ..oracle.mistakes import BY_ID, CATALOGUE
from ..oracle.report import html_report
from ..oracle.tolerance import COMPARE_TIERS, default_tier
from .common import LayerProgress, Subparsers, add_force_argument, add_html_argument, add_model_arguments, check_outputs
from .common import load_model, MODEL_HELP, positive_int, write_page
from .options import add_ids_argument, add_model_argument


def _mistake_id(text: str) -> str:
    if text not in BY_ID and text not in IMAGE_BY_ID:
        raise argparse.ArgumentTypeError(f"unknown mistake {text!r} (see --catalogue)")
    return text


def _catalogue(model) -> int:
    for m in CATALOGUE:
        status = "applies" if m.concerns(model) else f"not applicable: needs {m.requires}"
        print(f"{m.id:26s} {status}\n    {m.description}\n    shipped by: {m.shipped_by}\n    in a trace: {m.in_a_trace}")
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    given = sum(x is not None for x in (args.dump, args.tokens)) + bool(args.catalogue)
    if given != 1:
        raise Lfm2npError("give exactly one of --dump FILE, --tokens IDS (with --ids) or --catalogue")
    if args.tokens is not None and args.ids is None:
        raise Lfm2npError("--tokens needs --ids: the prompt ids the backend generated the tokens after")
    if args.html is not None:
        if args.catalogue:
            raise Lfm2npError("--html writes a diagnosis; --catalogue only lists the mistakes")
        check_outputs([args.html], args.model, args.force, reads=[Path(args.dump)] if args.dump else [])
    if args.dump is not None and Path(args.dump).suffix.lower() == ".npz":
        arrays = read_npz(args.dump)
        if is_processor_dump(arrays):
            return _diagnose_processor(args, processor_dump(arrays, args.dump))
    if args.image:
        raise Lfm2npError("--image goes with a processor dump (pixel_values, spatial_shapes, image_tokens, ...)")
    model = load_model(args)
    if args.catalogue:
        return _catalogue(model)
    if args.dump is not None:
        dump = load_dump(args.dump, args.ids, args.prefill, vocab_size=model.config.vocab_size)
    else:
        dump = token_stream(args.ids, args.tokens, args.prefill, source="--tokens")
    result = diagnose(model, dump, args.tier or default_tier(model.numerics.name), only=args.only,
                      combine=not args.no_combine)
    if args.json:
        print(json.dumps(result.to_json(), indent=1, allow_nan=False))
    else:
        print(format_diagnosis(result))
    if args.html is not None:
        what = Path(args.dump).name if args.dump is not None else "tokens"
        write_page(args.html, html_report(diagnosis=result.to_json(), title=f"lfm2np diagnose: {what}"))
    return 0 if result.agrees else 1


def _diagnose_processor(args: argparse.Namespace, dump) -> int:
    """A processor dump: judged against the settings (and tokenizer) of MODEL's directory; no weights are read."""
    if args.html is not None:
        raise Lfm2npError("--html reports a model diagnosis; a processor dump's is printed (or --json)")
    directory = resolve(args.model)
    config = ProcessorConfig.from_dir(directory)
    tokens = ImageTokens.from_tokenizer(Tokenizer.from_dir(directory)) \
        if (directory / "tokenizer.json").is_file() else None
    only = [m for m in args.only or () if m in IMAGE_BY_ID] if args.only else None
    if args.only and not only:
        raise Lfm2npError(f"--only names no image mistake; they are {', '.join(IMAGE_BY_ID)}")
    result = diagnose_processor(dump, config, args.image, tokens, only,
                                combine=not args.no_combine)
    print(json.dumps(result.to_json(), indent=1) if args.json else format_processor_diagnosis(result))
    return 0 if result.agrees else 1


def register(sub: Subparsers) -> None:
    """Add the ``diagnose`` subcommand."""
    p = sub.add_parser(
        "diagnose", help="name the porting mistake behind a backend's logits, trace or tokens",
        description="Compare a backend's dump with the reference and rank the catalogue of porting mistakes "
                    "(router softmax, conv taps reversed, interleaved RoPE, ...) by how well each, applied to the "
                    "reference, reproduces it; for a processor dump, the image processor's mistakes (llama.cpp's "
                    "rounding, tiling off, no antialiasing, another normalisation, ...), judged against MODEL's "
                    "processor settings. Exit 0 when the dump agrees with the reference, 1 when not.")
    add_model_argument(p, "the reference: " + MODEL_HELP)
    p.add_argument("--dump", help=".npz or .safetensors: 'ids' + 'logits' (T, V); 'ids' + 'tokens'; or a trace "
                                  "(lfm2np, transformers or llama.cpp names); or a processor dump (.npz: "
                                  "pixel_values, pixel_attention_mask, spatial_shapes, image_tokens, image_sizes, "
                                  "ids), judged against MODEL's processor settings")
    p.add_argument("--image", action="append", metavar="FILE",
                   help="with a processor dump: an image the backend processed, in order (repeat for several)")
    add_ids_argument(p, "with --tokens: the prompt ids; with --dump: the ids, when the file does not say")
    add_ids_argument(p, "the tokens the backend generated greedily after --ids", name="--tokens")
    p.add_argument("--prefill", type=positive_int,
                   help="how many ids the backend processed in its first call (where its second call began); "
                        "default: the end of the prompt for tokens, the first divergence for dumps")
    p.add_argument("--tier", choices=list(COMPARE_TIERS),
                   help="tolerance tier (default fp32; llamacpp-cpu with --dtype llamacpp-cpu)")
    add_model_arguments(p)
    p.add_argument("--only", type=_mistake_id, nargs="+", metavar="ID", help="test only these catalogue ids")
    p.add_argument("--no-combine", action="store_true",
                   help="do not try combinations of mistakes when no single one reproduces the dump")
    p.add_argument("--catalogue", action="store_true", help="list the catalogue of mistakes and which apply")
    p.add_argument("--json", action="store_true", help="print the diagnosis as JSON (strict: no NaN/Infinity)")
    add_html_argument(p)
    add_force_argument(p, "an existing --html file")
    p.set_defaults(func=_cmd_diagnose)
