"""Fuzzers for the file readers: real safetensors checkpoints, GGUF files and config.json files mutated byte by
byte (bit flips, 0xFF runs, huge numbers, JSON tokens, inserts, deletes, truncations), each batch read in a
subprocess under an address-space limit and a per-file time limit. The only outcome besides success is an
Lfm2npError: no other exception, no hang, no runaway allocation, no crash of the process.

``LFM2NP_FUZZ_EXAMPLES`` raises the number of batches per fuzzer (CI runs the derandomized profile of
tests/conftest.py with the default, to stay within its time budget).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import lfm2np
from lfm2np.io.safetensors import save_checkpoint
from lfm2np.synthetic import random_params

from conftest import PACKAGE_ROOT, subprocess_env

EXAMPLES = int(os.environ.get("LFM2NP_FUZZ_EXAMPLES", "10"))
BATCH = 100

# ------------------------------------------------------------------------------- limited subprocess
#: Reads every entry of a folder as ``target`` says, under an address-space limit and a per-entry time
#: limit; prints {entry: "ok" | "refused" | "timeout" | "crash: ..."} as JSON.
WORKER = textwrap.dedent("""
    import json, os, resource, signal, sys, warnings
    import numpy as np
    import lfm2np
    from lfm2np.errors import Lfm2npError
    from lfm2np.io.safetensors import Checkpoint
    from lfm2np.io.safetensors_file import STORAGE, SafetensorsFile
    try:
        import gguf, gguf.quants  # imported before the limit, as the reader would be
    except ImportError:
        pass

    warnings.simplefilter("ignore")
    target, folder, limit, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

    def read_safetensors(path):
        f = SafetensorsFile(path, dtypes=tuple(STORAGE))
        for name, info in f.tensors.items():
            f.raw(name)
            if info.shape and info.shape[0]:
                f.raw(name, rows=np.array([0, info.shape[0] - 1, 0]))

    def load_and_run(path):
        model = lfm2np.load(path, memory_budget=0)
        model.forward([1, 2, 3])
        model.step([4], model.step([1, 2])[1])

    def read_config(path):
        config = lfm2np.load_config(path)
        lfm2np.expected_tensors(config)

    READ = {"safetensors": read_safetensors, "load": load_and_run, "config": read_config}[target]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    class Timeout(BaseException):
        pass

    def alarm(signum, frame):
        raise Timeout()

    signal.signal(signal.SIGALRM, alarm)
    outcomes = {}
    for name in sorted(os.listdir(folder)):
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            READ(os.path.join(folder, name))
            outcomes[name] = "ok"
        except Lfm2npError as e:
            outcomes[name] = "refused" if "\\n" not in str(e) else f"crash: a message of several lines: {e}"
        except Timeout:
            outcomes[name] = "timeout"
        except BaseException as e:
            outcomes[name] = f"crash: {type(e).__name__}: {str(e)[:300]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    print(json.dumps(outcomes))
""")
ADDRESS_SPACE = 1 << 30
PER_ENTRY_SECONDS = 5.0



def run_limited(target: str, folder: Path) -> dict[str, str]:
    """Run WORKER on every entry of ``folder``: a hang, a runaway allocation or a crash fails the caller."""
    n = len(os.listdir(folder))
    proc = subprocess.run([sys.executable, "-c", WORKER, target, str(folder), str(ADDRESS_SPACE),
                           str(PER_ENTRY_SECONDS)], capture_output=True, text=True,
                          timeout=60 + PER_ENTRY_SECONDS * n, env=subprocess_env())
    assert proc.returncode == 0, f"worker died with status {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


# ------------------------------------------------------------------------------------- mutations
INTERESTING = [0, 1, 2, 7, 8, 9, 255, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
JSON_TOKENS = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"-", b"9" * 20, b"NaN", b"-Infinity", b"1e999", b"null",
               b"true", b"0.5", b'"dtype"', b'"F32"', b'"BF16"', b'"I64"', b'"shape"', b'"data_offsets"', b'"\\ud800"',
               b"\xff", b"\x00", b'"__metadata__"', b"[[[[[[[[", b'{"a":{"a":', b"-1"]


def mutation(span: int):
    """One mutation at a position below ``span`` (taken modulo the current length)."""
    position = st.integers(0, span)
    return st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("ff"), position, st.integers(1, 8)),
        st.tuples(st.just("set"), position, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("json"), position, st.sampled_from(JSON_TOKENS)),
        st.tuples(st.just("insert"), position, st.sampled_from(JSON_TOKENS) | st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("digits"), position, st.sampled_from(INTERESTING)),
        st.tuples(st.just("u64"), position, st.sampled_from(INTERESTING)),
        st.tuples(st.just("u32"), position, st.sampled_from(INTERESTING[:9])),
        st.tuples(st.just("delete"), position, st.integers(1, 16)),
        st.tuples(st.just("truncate"), position, st.just(0)),
    )


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        pos = pos % (len(b) + 1)
        if op == "flip" and pos < len(b):
            b[pos] ^= 1 << arg
        elif op == "ff":
            b[pos:pos + arg] = b"\xff" * len(b[pos:pos + arg])
        elif op in ("set", "json"):
            b[pos:pos + len(arg)] = arg
        elif op == "insert":
            b[pos:pos] = arg
        elif op == "digits":  # replace the run of digits at or after pos by a chosen number
            while pos < len(b) and not chr(b[pos]).isdigit():
                pos += 1
            end = pos
            while end < len(b) and chr(b[end]).isdigit():
                end += 1
            b[pos:end] = str(arg).encode()
        elif op == "u64":
            b[pos:pos + 8] = struct.pack("<Q", arg)
        elif op == "u32":
            b[pos:pos + 4] = struct.pack("<I", arg % 2**32)
        elif op == "delete":
            del b[pos:pos + arg]
        elif op == "truncate":
            del b[pos:]
    return bytes(b)


def batches(span: int):
    return st.lists(st.lists(mutation(span), min_size=1, max_size=3), min_size=BATCH, max_size=BATCH)


def fuzz_settings(examples: int = EXAMPLES):
    # no shrinking: a failing batch is reported whole, each bad entry with its mutations
    return settings(deadline=None, max_examples=examples, database=None, phases=[Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def check(outcomes: dict[str, str], batch, seed_name: str = "seed") -> None:
    assert outcomes.pop(seed_name) == "ok", "the unmutated seed must load"
    bad = {name: outcome for name, outcome in outcomes.items() if outcome not in ("ok", "refused")}
    assert not bad, {name: (outcome, batch[int(name[:3])]) for name, outcome in bad.items()}


# ------------------------------------------------------------------------------------- seeds
TINY = lfm2np.load_config("tiny-dense")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny bf16 checkpoint: its header (about 4 KB) is what the safetensors fuzzer mutates."""
    return save_checkpoint(tmp_path_factory.mktemp("seed"), TINY, random_params(TINY, seed=11), dtype="bfloat16")


def header_span(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


SAFETENSORS_SEED = (Path(__file__).parent / "golden" / "bf16_rounding.safetensors")


# ------------------------------------------------------------------------------------- the fuzzers
@fuzz_settings()
@given(data=st.data())
def test_fuzzed_checkpoints_load_or_are_refused(tmp_path_factory, checkpoint, data):
    """Mutated safetensors headers of a real checkpoint, loaded with lfm2np.load and run forward and step."""
    seed = (checkpoint / "model.safetensors").read_bytes()
    batch = data.draw(batches(header_span(seed) + 16))
    folder = tmp_path_factory.mktemp("st")
    for i, ops in enumerate([[]] + batch):
        entry = folder / ("seed" if i == 0 else f"{i - 1:03d}")
        entry.mkdir()
        shutil.copy(checkpoint / "config.json", entry / "config.json")
        (entry / "model.safetensors").write_bytes(mutate(seed, ops))
    check(run_limited("load", folder), batch)


@fuzz_settings(max(1, EXAMPLES // 2))
@given(data=st.data())
def test_fuzzed_safetensors_files_are_read_or_refused(tmp_path_factory, data):
    """Mutated headers of a safetensors file of other dtypes (the trace reader's dtypes): every tensor read
    whole and by rows."""
    seed = SAFETENSORS_SEED.read_bytes()
    batch = data.draw(batches(header_span(seed) + 16))
    folder = tmp_path_factory.mktemp("raw")
    (folder / "seed").write_bytes(seed)
    for i, ops in enumerate(batch):
        (folder / f"{i:03d}").write_bytes(mutate(seed, ops))
    check(run_limited("safetensors", folder), batch)


@fuzz_settings()
@given(data=st.data())
def test_fuzzed_configs_load_or_are_refused(tmp_path_factory, checkpoint, data):
    """Mutated config.json files beside real weights: the config is checked, then against the tensors."""
    seed = (checkpoint / "config.json").read_bytes()
    batch = data.draw(batches(len(seed)))
    folder = tmp_path_factory.mktemp("cfg")
    for i, ops in enumerate([[]] + batch):
        entry = folder / ("seed" if i == 0 else f"{i - 1:03d}")
        entry.mkdir()
        (entry / "config.json").write_bytes(mutate(seed, ops))
        os.symlink(checkpoint / "model.safetensors", entry / "model.safetensors")
    check(run_limited("load", folder), batch)


#: Any JSON value: the values a hostile config.json can put in a field.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from(INTERESTING)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["conv", "full_attention", "lfm2", "lfm2_moe", "default", "yarn"]),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=6)
FIELD_BATCH = 25  # JSON values are large draws: a bigger batch would overrun hypothesis's buffer


@fuzz_settings(2 * EXAMPLES)
@given(data=st.data())
def test_configs_with_fields_of_any_value_load_or_are_refused(tmp_path_factory, checkpoint, data):
    """config.json with one to three fields (known ones, or new ones) replaced by any JSON value."""
    seed = json.loads((checkpoint / "config.json").read_text())
    keys = st.sampled_from([*seed, "full_attn_idxs", "rope_parameters", "rope_scaling", "theta", "head_dim",
                            "block_ff_dim", "tie_embedding", "num_experts", "num_dense_layers"])
    batch = data.draw(st.lists(st.dictionaries(keys, JSON_VALUES, min_size=1, max_size=3), min_size=FIELD_BATCH,
                               max_size=FIELD_BATCH))
    folder = tmp_path_factory.mktemp("fields")
    for i, changes in enumerate([{}] + batch):
        entry = folder / ("seed" if i == 0 else f"{i - 1:03d}")
        entry.mkdir()
        (entry / "config.json").write_text(json.dumps({**seed, **changes}))
        os.symlink(checkpoint / "model.safetensors", entry / "model.safetensors")
    check(run_limited("load", folder), batch)


@pytest.fixture(scope="module")
def gguf_seed(tmp_path_factory) -> tuple[bytes, int]:
    """A tiny GGUF written by lfm2np (Q8_0 where it can be), and where its tensor data starts."""
    pytest.importorskip("gguf")
    from lfm2np.io.gguf_file import GgufFile
    from lfm2np.io.gguf_write import write_gguf

    path = tmp_path_factory.mktemp("gguf") / "seed.gguf"
    write_gguf(path, TINY, random_params(TINY, seed=12), "Q8_0")
    with GgufFile(path) as f:
        start = f.data_start
    return path.read_bytes(), start


@fuzz_settings()
@given(data=st.data())
def test_fuzzed_gguf_files_load_or_are_refused(tmp_path_factory, gguf_seed, data):
    """Mutated GGUF files (mostly their header: metadata and tensor infos) through lfm2np.load, forward and
    step: the container's checks (tests/test_gguf_file.py) and the metadata's meaning alike."""
    seed, data_start = gguf_seed
    batch = data.draw(batches(data_start + 64))
    folder = tmp_path_factory.mktemp("gguf")
    (folder / "seed.gguf").write_bytes(seed)
    for i, ops in enumerate(batch):
        (folder / f"{i:03d}.gguf").write_bytes(mutate(seed, ops))
    check(run_limited("load", folder), batch, "seed.gguf")


def test_mutations_change_the_file():
    """The mutation operators do what they say (a fuzzer that never mutates would pass vacuously)."""
    data = b'{"a": 123, "b": [1, 2]}'
    assert mutate(data, [("digits", 0, 2**64 - 1)]) == b'{"a": 18446744073709551615, "b": [1, 2]}'
    assert mutate(data, [("json", 1, b"[[")]) == b'{[[": 123, "b": [1, 2]}'
    assert mutate(data, [("insert", 0, b"NaN")]) == b'NaN{"a": 123, "b": [1, 2]}'
    assert mutate(data, [("truncate", 5, 0)]) == data[:5] and mutate(data, [("delete", 0, 2)]) == data[2:]
    assert mutate(data, [("flip", 0, 0)])[0] == ord("{") ^ 1
    assert mutate(b"\0" * 8, [("u64", 0, 2**63)]) == struct.pack("<Q", 2**63)


# ------------------------------------------------------------------------------------- the command line
CLI_VALUES = ["0", "-1", "1", "2", "3", "99", "1e9", str(2**64), "9" * 400, "nan", "inf", "-inf", "1.5", "0.5", "",
              " ", "x", "0x10", "1_000", "+5", "-0", "caf\udce9", "0,1", ",", "-1,2", "a,b", "q8_0", "Q4_K_M", "fp32"]


@pytest.fixture(scope="module")
def cli_paths(tmp_path_factory, checkpoint) -> list[str]:
    """Paths of every kind a command may be handed: models, traces, files that are none of those."""
    from lfm2np.embedded import embedded_model_path
    from lfm2np.oracle.trace import record

    d = tmp_path_factory.mktemp("cli")
    (d / "garbage.bin").write_bytes(bytes(range(256)) * 3)
    (d / "empty").write_bytes(b"")
    (d / "out").mkdir()
    trace = record(lfm2np.load(checkpoint), [1, 2, 3])[1].save(d / "trace.safetensors")
    root = Path(PACKAGE_ROOT)
    written = [str(d / "out"), str(d / "out" / "new"), str(d / "garbage.bin" / "x"), str(d / "empty"),
               str(d / "missing" / "x"), "9" * 300, "a\nb"]  # outputs only here: never into the repository,
    # /dev or / (run as root, golden --out /nonexistent/x would make /nonexistent, and other tests need it absent)
    read = [str(embedded_model_path()), str(checkpoint), str(trace), str(d / "garbage.bin"), str(root / "README.md"),
            "/nonexistent", "/dev/null", "LFM2-350M", "tiny-moe", "org/not-cached", "\udcff", *written]
    return {"read": read, "written": written, "cwd": str(d)}


@fuzz_settings(8 * EXAMPLES)
@given(data=st.data())
def test_fuzzed_command_lines_end_in_one_line(capsys, cli_paths, data):
    """Any subcommand with random positional paths and options of random values: it succeeds, reports a
    divergence (compare: 1), or prints one ``lfm2np: error:`` line and exits 2. Nothing else escapes."""
    from lfm2np.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    command = data.draw(st.sampled_from(sorted(set(sub.choices) - {"chat"})), label="command")  # chat reads stdin
    p = sub.choices[command]
    argv = [command]
    nested = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
    if nested:  # a command of commands (conformance make / check / run): one of them
        name = data.draw(st.sampled_from(sorted(nested[0].choices)), label=f"{command} command")
        p = nested[0].choices[name]
        argv.append(name)
    for action in p._actions:
        if not action.option_strings:
            argv.append(data.draw(st.sampled_from(cli_paths["read"]), label=action.dest))
    # --workers / --scheduler start or reach a Dask cluster (seconds each, 256 processes at most): their bad values
    # and an unreachable scheduler are tested in tests/test_cluster.py
    options = [a for a in p._actions if a.option_strings and a.option_strings[0] not in ("-h", "--help")
               and a.dest not in ("workers", "scheduler")]
    for action in data.draw(st.lists(st.sampled_from(options), max_size=3, unique_by=id) if options else st.just([]),
                            label="options"):
        argv.append(action.option_strings[-1])
        values = cli_paths["written"] if action.dest == "out" else CLI_VALUES + cli_paths["read"]
        if action.nargs != 0:
            argv += data.draw(st.lists(st.sampled_from(values), min_size=1, max_size=2 if action.nargs == "+" else 1),
                              label=action.dest)
    if command in ("trace", "golden") and "--out" not in argv:
        argv += ["--out", data.draw(st.sampled_from(cli_paths["written"]), label="out")]
    if command in ("generate", "demo"):
        argv += ["--max-new-tokens", "2"]
    here = os.getcwd()
    os.chdir(cli_paths["cwd"])  # relative outputs ("a\nb") land in the fixture's directory, not the repository
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    finally:
        os.chdir(here)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status in (0, 1, 2), (argv, status, err)
    if status == 2:
        assert lines and lines[-1].startswith("lfm2np: error: ") and "Traceback" not in err, (argv, err)
        assert sum(line.startswith("lfm2np: error:") for line in lines) == 1, (argv, err)
