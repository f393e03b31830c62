"""What the commands share: the dtype option, loading a model with its tokenizer, streaming a generation,
the sampling options, and progress lines on stderr."""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..calc import parse_bytes
from ..config import ROPE_READINGS
from ..errors import Lfm2npError
from ..embedded import resolve as resolve_embedded
from ..generate import Generation, Sampling, checked_stop_ids, generation_defaults, sampling_for
from ..io.files import file_kind
from ..io.hub import resolve
from ..io.params import parse_budget
from ..io.tokenizer import Tokenizer
from ..loading import load
from ..numerics import MODES
from ..prompting import encode_with_images
from .outputs import add_force_argument, check_outputs, write_page  # noqa: F401  (the commands that write import them here)

#: argparse's subparsers object, which each command module's ``register`` receives (its class is private).
Subparsers = Any

#: The ``--dtype`` choices of every command that runs a model.
DTYPE_CHOICES = list(MODES)
DTYPE_HELP = ("compute dtype (float64: the oracle mode; bfloat16: the emulation; llamacpp-cpu: llama.cpp's CPU "
              "arithmetic on a GGUF file (a checkpoint's weights as GGUF tensors of their stored type), "
              "llamacpp-cpu-kv-f32 with an f32 KV cache)")


# ----------------------------------------------------------------------------- argument types
# argparse ``type=`` functions: a value outside its range is a parser error (one line, exit 2) naming the
# argument, before anything is loaded.
MAX_SEED = 2**64 - 1  #: seeds are 0 .. 2**64 - 1 (numpy's default_rng takes any non-negative integer)


def clipped(text: str, width: int = 40) -> str:
    """``text`` cut to about ``width`` characters for a message."""
    return text if len(text) <= width else text[:width - 3] + "..."


def shown(text: str, width: int = 40) -> str:
    """``text`` quoted for a message, cut to about ``width`` characters."""
    return repr(clipped(text, width))


#: the largest integer an option takes (an int64: token ids, counts and lengths are stored as such)
MAX_INT = 2**63 - 1


def ascii_number(text: str) -> str:
    """``text`` when it is written in ASCII: Python's ``int`` and ``float`` also read other scripts' digits
    (``'٣'`` is 3, ``'１２'`` is 12), which a command line should not take as a number unseen."""
    if not text.isascii():
        raise ValueError(text)
    return text


def _integer(text: str, low: int, what: str, high: int = MAX_INT) -> int:
    try:
        value = int(ascii_number(text), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not an integer") from None
    digits = clipped(str(value))
    if value < low:
        raise argparse.ArgumentTypeError(f"{digits} is not {what}")
    if value > high:
        raise argparse.ArgumentTypeError(f"{digits} is too large (at most {high})")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1, "a positive integer (>= 1)")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0, "an integer >= 0")


def seed(text: str) -> int:
    """A random seed: an integer in 0 .. 2**64 - 1."""
    return _integer(text, 0, f"a seed (0 .. {MAX_SEED})", high=MAX_SEED)


def _float(text: str) -> float:
    try:
        value = float(ascii_number(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a finite number")
    return value


def _number_in(name: str, ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: a finite number for which ``ok`` holds, else an error saying ``expected``."""
    def convert(text: str) -> float:
        value = _float(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{value:g}: expected {expected}")
        return value
    convert.__name__ = name
    convert.__doc__ = f"A number: {expected}."
    return convert


temperature = _number_in("temperature", lambda v: v >= 0, "a temperature >= 0 (0 is greedy)")
probability = _number_in("probability", lambda v: 0 < v <= 1, "a number in (0, 1]")
unit_interval = _number_in("unit_interval", lambda v: 0 <= v <= 1, "a number in [0, 1]")
positive_float = _number_in("positive_float", lambda v: v > 0, "a number > 0")
top_p = _number_in("top_p", lambda v: 0 < v <= 1, "0 < top_p <= 1 (1: off)")
min_p = _number_in("min_p", lambda v: 0 <= v <= 1, "0 <= min_p <= 1 (0: off)")
repetition_penalty = _number_in("repetition_penalty", lambda v: v > 0, "repetition_penalty > 0 (1: off)")


def utf8_text(value: str) -> str:
    """Text that is valid Unicode (command-line bytes that are not UTF-8 arrive as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text (position {e.start})") from None
    return value


#: the help of a MODEL argument that runs a model (the calculators take presets and configs too)
MODEL_HELP = ("checkpoint directory, cached repo id (e.g. LiquidAI/LFM2-350M), .gguf file, or 'embedded' "
              "(the tiny model shipped inside lfm2np)")


def model_argument(value: str) -> str:
    """A MODEL argument: a checkpoint directory, a cached repo id, a .gguf file, a preset name (for the
    calculators), or ``embedded`` for the shipped tiny model; never empty (a path "" is the current directory)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty model name (give '.' for the current directory)")
    return str(resolve_embedded(utf8_text(value)))  # "embedded": as lfm2np.load reads it


def _path_type(check):
    """An argparse type from ``check(value, path)``; an OSError (a name too long, a loop of links) is the
    argument's error too."""
    def convert(value: str) -> Path:
        if not value.strip():  # Path("") is the current directory: never what an empty argument meant
            raise argparse.ArgumentTypeError("an empty path")
        if "\0" in value:  # no file name holds one (os functions raise ValueError)
            raise argparse.ArgumentTypeError(f"{shown(value)}: a NUL character in a file name")
        try:
            path = Path(value).expanduser()
            check(value, path)
        except OSError as e:
            raise argparse.ArgumentTypeError(f"{shown(value)}: {e.strerror or e}") from None
        except ValueError as e:  # a NUL in the name
            raise argparse.ArgumentTypeError(f"{shown(value)}: {e}") from None
        return path
    convert.__name__ = check.__name__.lstrip("_")
    convert.__doc__ = check.__doc__
    return convert


def _input_file(value: str, path: Path) -> None:
    """An existing regular file (what is there instead is named: a directory, a FIFO, a loop of links)."""
    kind = file_kind(path)
    if kind == "missing":
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    if kind is not None:
        raise argparse.ArgumentTypeError(f"{value}: is {kind}, not a regular file")


def _output_file(value: str, path: Path) -> None:
    """A file to write: not a directory, in a directory that exists."""
    if path.is_dir() or value.endswith(("/", "\\")):
        raise argparse.ArgumentTypeError(f"{value}: is a directory; expected a file name")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: the directory {path.parent} does not exist")


def _output_dir(value: str, path: Path) -> None:
    """A directory to write into (created if missing): not a file, and under directories, not files."""
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: is a file; expected a directory")
    ancestor = next((p for p in path.absolute().parents if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: {ancestor} is a file, not a directory")


input_file = _path_type(_input_file)
output_file = _path_type(_output_file)
output_dir = _path_type(_output_dir)


def add_html_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--html", type=output_file, metavar="FILE",
                   help="also write the verdict as one self-contained HTML page (the verdict, the error map of every "
                        "layer, routing, hypotheses; no script, nothing loaded from elsewhere)")


def progress(message: str) -> None:
    """One line on stderr (the commands' progress and timing reports)."""
    print(message, file=sys.stderr, flush=True)


_BARE_NUMBER = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*")
SIZE_UNITS = "8G or 8GiB (2^30 bytes each), 8GB (10^9), 512M, 512MB, 4096B"


def size(value: str) -> int:
    """A size in bytes from a number and its unit (:func:`lfm2np.calc.parse_bytes`: ``8G`` = ``8GiB``, ``8GB``
    = 8e9). A bare number other than 0 is refused: ``8`` could mean bytes or GiB, and read as bytes it once made
    ``memory --budget 8`` an 8-byte budget."""
    try:
        n = parse_bytes(value)
    except Lfm2npError as e:
        if "too large" in str(e):
            raise argparse.ArgumentTypeError(f"{shown(value)} is too large (above any machine's memory)") from None
        raise argparse.ArgumentTypeError(f"{shown(value)} is not a size; expected a number and a unit: "
                                         f"{SIZE_UNITS}") from None
    except OverflowError:  # a number beyond float range
        raise argparse.ArgumentTypeError(f"{shown(value)} is too large") from None
    bare = _BARE_NUMBER.fullmatch(value)
    if bare and float(bare.group(1)):
        v = bare.group(1)
        raise argparse.ArgumentTypeError(f"{shown(value)} has no unit, so it could be bytes or GiB: write {v}G "
                                         f"(= {v}GiB, 2^30 bytes each), {v}GB (10^9 bytes) or {v}B (bytes)")
    return n


def memory_budget(value: str) -> "str | int":
    """``--memory-budget``: a :func:`size` ("6GiB", "6G", "500MB", 0) or "all"; checked now, used by
    :func:`load_model`."""
    if value.strip().lower() in ("all", "inf", "unlimited"):
        return "all"
    n = size(value)
    parse_budget(n, 0)  # within what load() takes
    return n


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options of every command that runs a model: --dtype, --memory-budget, --rope-reading, --mmproj."""
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--memory-budget", type=memory_budget, default=None, metavar="SIZE",
                   help="converted weights kept in memory: a size with its unit (6G = 6GiB, 6GB, 0) or 'all' "
                        "(default: everything when it fits a fifth of the available memory, else a fifth of it)")
    p.add_argument("--rope-reading", choices=ROPE_READINGS, default="trained",
                   help="an LFM3 RoPE labelled 'default' with a partial factor: as trained (default) or as "
                        "transformers 5.24 reads it")
    p.add_argument("--mmproj", metavar="FILE", default=None,
                   help="LFM2-VL from llama.cpp's pair: MODEL is the text GGUF, FILE its mmproj GGUF (vision tower "
                        "and projector)")


def load_model(args: argparse.Namespace, source: Any = None) -> Any:
    """:func:`lfm2np.load` of ``source`` (default ``args.model``) with the options of :func:`add_model_arguments`."""
    return load(args.model if source is None else source, dtype=getattr(args, "dtype", "float32"),
                memory_budget=getattr(args, "memory_budget", None),
                rope_reading=getattr(args, "rope_reading", "trained"), mmproj=getattr(args, "mmproj", None))


class LayerProgress:
    """A forward pass's progress callback for the commands: silent for the first seconds, then a line on
    stderr every few seconds ("layer 12/40, 9 s"), so a long prefill of a large model shows it is moving."""

    def __init__(self, what: str = "forward", quiet_for: float = 3.0, every: float = 5.0):
        self.what, self.quiet_for, self.every = what, quiet_for, every
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.t0 >= self.quiet_for and (now - self.last >= self.every or done == total):
            progress(f"[{self.what}: layer {done}/{total}, {now - self.t0:.0f} s]")
            self.last = now


def load_for_generation(model_arg: str, args: argparse.Namespace | None = None):
    """The model and its tokenizer for a MODEL argument: a checkpoint directory, a cached repo id, or a .gguf
    file (its weights and the tokenizer and chat template it carries); ``args`` gives the model options."""
    t0 = time.perf_counter()
    source = model_arg if str(model_arg).lower().endswith(".gguf") else resolve(model_arg)
    model = load_model(args if args is not None else argparse.Namespace(model=model_arg), source)
    tokenizer = Tokenizer.load(source)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise Lfm2npError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"vocabulary is {model.config.vocab_size}")
    progress(f"loaded {model} in {time.perf_counter() - t0:.2f} s")
    return model, tokenizer


def encode_prompt(model, tokenizer, args: argparse.Namespace) -> tuple[list[int], Any]:
    """The ids of ``--text`` (BOS prepended) or ``--chat`` (with ``--system``, rendered by the chat template) and,
    with ``--image`` (LFM2-VL), the processed images, their placeholders expanded in the ids
    (:func:`lfm2np.prompting.encode_with_images`); the images are None without ``--image``."""
    images = getattr(args, "image", None)
    chat, system = getattr(args, "chat", None), getattr(args, "system", None)
    if images:
        return encode_with_images(model, tokenizer, [str(p) for p in images], text=args.text, chat=chat,
                                  system=system)
    if chat is not None:
        return tokenizer.encode_chat(([{"role": "system", "content": system}] if system else []) +
                                     [{"role": "user", "content": chat}]), None
    return tokenizer.encode(args.text, add_bos=True), None


def run_generation(model, tokenizer, prompt_ids: list[int], args: argparse.Namespace, out=None,
                   defaults: dict | None = None, images: Any = None) -> list[int]:
    """Stream a generation to ``out`` (stdout) with a progress line on stderr; returns the generated ids.
    ``defaults``: the checkpoint's :func:`generation_defaults_for` (None: read them for ``args.model``);
    ``images``: LFM2-VL's images of the prompt."""
    out = out or sys.stdout
    if defaults is None:
        defaults = generation_defaults_for(args.model)
    sampling = sampling_from(args, defaults)
    stop = stop_ids_for(model, tokenizer, defaults)
    gen = Generation(model, prompt_ids, args.max_new_tokens, sampling, stop, progress=LayerProgress("prefill"),
                     images=images)
    t0 = time.perf_counter()
    first = None

    def timed():
        nonlocal first
        for token in gen:
            if first is None:
                first = time.perf_counter()
            yield token

    for piece in tokenizer.stream(timed()):
        out.write(piece)
        out.flush()
    end = time.perf_counter()
    out.write("\n")
    n = len(gen.tokens)
    if gen.state is None:  # --max-new-tokens 0: the prompt was never run, so there is no prefill to time
        prefill = "not run (--max-new-tokens 0)"
    else:
        prefill = f"prefill {len(prompt_ids) / max((first or end) - t0, 1e-9):.1f} tokens/s"
    decode = end - (first or end)
    progress(f"[prompt {len(prompt_ids)} tokens, {prefill}; "
              f"generated {n} tokens, {max(n - 1, 0) / max(decode, 1e-9):.1f} tokens/s; "
              f"finish: {gen.finish_reason}; sampling: {describe_sampling(sampling)}]")
    return gen.tokens


#: The sampling options: (flag, Sampling field).
SAMPLING_OPTIONS = [("--temperature", "temperature"), ("--top-k", "top_k"), ("--top-p", "top_p"),
                    ("--min-p", "min_p"), ("--repetition-penalty", "repetition_penalty"), ("--seed", "seed")]


def sampling_from(args: argparse.Namespace, defaults: dict | None = None) -> Sampling:
    """The Sampling of the command-line options over the checkpoint's ``defaults`` (its
    generation_config.json; None or {}: lfm2np's, greedy). Called once before anything is loaded, to
    validate the options."""
    if args.max_new_tokens < 0:
        raise Lfm2npError(f"--max-new-tokens is {args.max_new_tokens}; expected >= 0")
    return sampling_for(defaults, **{field: getattr(args, field) for _, field in SAMPLING_OPTIONS})


def stop_ids_for(model, tokenizer, defaults: dict) -> frozenset[int]:
    """The ids that end a reply: the tokenizer's end-of-turn ids and the config's eos, plus the
    generation_config.json's eos_token_id (checked against the vocabulary, naming the file)."""
    extra = checked_stop_ids(defaults.get("stop_ids", ()), model.config.vocab_size,
                             "generation_config.json: eos_token_id")
    V = model.config.vocab_size  # a tokenizer's special id beyond the model's vocabulary can never come
    return frozenset(i for i in tokenizer.stop_ids(model.config.eos_token_id) if 0 <= i < V) | extra


def generation_defaults_for(model_arg: str) -> dict:
    """The sampling defaults of a MODEL argument: its checkpoint directory's generation_config.json
    ({} for a file such as a .gguf, or a directory without one)."""
    if Path(model_arg).expanduser().is_file():
        return {}
    return generation_defaults(resolve(model_arg))


def describe_sampling(s: Sampling) -> str:
    if s.greedy:
        what = "greedy"
    else:
        what = f"temperature {s.temperature:g}" + "".join(
            f", {name} {value:g}" for name, value, off in (("top_k", s.top_k, 0), ("top_p", s.top_p, 1),
                                                           ("min_p", s.min_p, 0)) if value != off)
        what += f", seed {s.seed}" if s.seed is not None else ", unseeded"
    return what + (f", repetition_penalty {s.repetition_penalty:g}" if s.repetition_penalty != 1 else "")


#: ``--max-new-tokens`` of generate, chat and demo: long enough for a real model's chat reply (LFM2's replies
#: often pass 64 tokens, and a reply cut short is a poor first answer); a reply ends at its end-of-turn id anyway
DEFAULT_MAX_NEW_TOKENS = 256


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """--max-new-tokens (-n), the sampling options and the model options. The sampling options default to the
    checkpoint's generation_config.json (read as transformers reads it), else greedy."""
    p.add_argument("--max-new-tokens", "-n", type=non_negative_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help=f"at most N new tokens (default {DEFAULT_MAX_NEW_TOKENS}; a reply also ends at its "
                        f"end-of-turn id)")
    p.add_argument("--temperature", type=temperature, help="0 is greedy (default: the checkpoint's "
                   "generation_config.json, else 0)")
    p.add_argument("--top-k", type=non_negative_int, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=top_p, help="nucleus sampling mass (1: off)")
    p.add_argument("--min-p", type=min_p, help="drop tokens below min_p times the top probability (0: off)")
    p.add_argument("--repetition-penalty", type=repetition_penalty, help="divide the logits of tokens already seen "
                   "(prompt and reply) by this, as transformers does (1: off)")
    p.add_argument("--seed", type=seed, default=None, help=f"makes sampling reproducible (0 .. {MAX_SEED})")
    add_model_arguments(p)
