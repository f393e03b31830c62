"""Corpus scale on Dask: ``--workers N`` / ``--scheduler ADDRESS`` give the results of a serial run, bit for bit.

A local cluster of two worker processes serves the tests (started once); ``conformance make --workers 2`` starts
its own. A failed task is reported with its prompt and tried once more; a worker that dies too; a scheduler that
cannot be reached is one error line within its timeout, never a hang.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lfm2np.cli import main
from lfm2np.cli.cluster_options import TaskProgress
from lfm2np.cluster import ModelSpec, Task, run_tasks
from lfm2np.embedded import embedded_model_path
from lfm2np.errors import Lfm2npError
from lfm2np.oracle.trace import Trace

from test_hostile import cli_refuses

distributed = pytest.importorskip("distributed")  # the dask extra; in dev, so CI has it

PROMPTS = Path(__file__).parent / "data" / "conformance_prompts.json"
SPEC = ModelSpec(str(embedded_model_path()))


@pytest.fixture(scope="module")
def scheduler():
    """A cluster whose scheduler gives up on a task at its first worker's death (allowed-failures 0, as the local
    clusters of --workers do; an existing cluster's own setting decides how often it tries a task again silently)."""
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                      silence_logs=50) as cluster:
            yield cluster.scheduler_address


def forward(model, ids):
    return model.forward(ids)


def dies_once(model, payload):
    """Kills its worker the first time it runs (a marker file remembers), then computes."""
    ids, marker = payload
    if marker is not None and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(3)
    return model.forward(ids)


def always_dies(model, payload):
    os._exit(3)


def fails(model, payload):
    raise Lfm2npError(f"no good: {payload}")


def test_make_on_two_workers_is_the_serial_pack_bit_for_bit(tmp_path, capsys):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert main(["conformance", "make", "embedded", "--prompts", str(PROMPTS), "--out", str(serial)]) == 0
    assert main(["conformance", "make", "embedded", "--prompts", str(PROMPTS), "--out", str(parallel),
                 "--workers", "2"]) == 0
    a = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    b = sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file())
    assert a == b and len(a) > 30
    differ = [str(p) for p in a if (serial / p).read_bytes() != (parallel / p).read_bytes()]
    assert differ == []


def test_trace_golden_and_perplexity_on_a_cluster_are_the_serial_results(scheduler, tmp_path, capsys):
    for command in ("trace", "golden"):
        one, many = tmp_path / f"{command}-serial", tmp_path / f"{command}-cluster"
        assert main([command, "embedded", "--prompts", str(PROMPTS), "--out", str(one)]) == 0
        assert main([command, "embedded", "--prompts", str(PROMPTS), "--out", str(many), "--scheduler",
                     scheduler]) == 0
        files = sorted(p.relative_to(one) for p in one.rglob("*.safetensors"))
        assert files and files == sorted(p.relative_to(many) for p in many.rglob("*.safetensors"))
        for rel in files:  # the values and their metadata (safetensors orders a header's keys as it likes)
            ta, tb = Trace.load(one / rel), Trace.load(many / rel)
            assert list(ta.tensors) == list(tb.tensors) and ta.meta == tb.meta
            assert all(np.array_equal(ta[n], tb[n]) and ta[n].dtype == tb[n].dtype for n in ta.names()), rel
    text = tmp_path / "corpus.txt"
    text.write_text('The "for" statement is used to iterate over the elements of a sequence. ' * 12)
    capsys.readouterr()
    outputs = []
    for extra in ([], ["--scheduler", scheduler]):
        assert main(["perplexity", "embedded", str(text), "--window", "48", "--stride", "16", "--json", "--quiet",
                     *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert json.loads(outputs[0])["windows"] > 5 and outputs[0] == outputs[1]


def test_a_worker_that_dies_is_reported_and_its_task_tried_once_more(scheduler, tmp_path):
    warnings: list[str] = []
    marker = str(tmp_path / "died")
    tasks = [Task(([1, 2, 3 + i], marker if i == 2 else None), f"prompt 'p{i}'") for i in range(4)]
    got = run_tasks(dies_once, SPEC, tasks, workers=2, warn=warnings.append)  # the local cluster of --workers
    model_out = run_tasks(forward, SPEC, [Task(t.payload[0], t.what) for t in tasks])
    assert all(np.array_equal(a, b) for a, b in zip(got, model_out))
    assert any(w.startswith("prompt 'p2': failed on the cluster (its worker died") for w in warnings), warnings
    with pytest.raises(Lfm2npError, match=r"prompt 'p0': failed twice on the cluster: its worker died"):
        run_tasks(always_dies, SPEC, tasks[:1], scheduler=scheduler, warn=warnings.append)
    with pytest.raises(Lfm2npError, match=r"prompt 'p1': failed twice on the cluster: no good: x"):
        run_tasks(fails, SPEC, [Task("x", "prompt 'p1'")], scheduler=scheduler)


def test_progress_is_reported_for_every_task(scheduler):
    seen: list[tuple[int, int]] = []
    tasks = [Task([1, 2 + i], f"p{i}") for i in range(5)]
    run_tasks(forward, SPEC, tasks, scheduler=scheduler, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(k, 5) for k in range(1, 6)]
    clock = iter([0.0, 4.0, 4.0, 4.0]).__next__
    stream = io.StringIO()
    bar = TaskProgress("make", " on 2 workers", stream=stream, every=0.0, clock=clock)
    bar(2, 6)
    assert stream.getvalue() == "[make: 2/6 tasks on 2 workers, 4 s, ETA 8 s]\n"


def test_a_scheduler_that_cannot_be_reached_is_one_line_within_the_timeout(capsys, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    status = main(["trace", "embedded", "--prompts", str(PROMPTS), "--out", str(tmp_path / "t"), "--scheduler",
                   f"tcp://127.0.0.1:{port}", "--scheduler-timeout", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and time.perf_counter() - t0 < 20
    assert len(err) == 1 and err[0].startswith(f"lfm2np: error: --scheduler tcp://127.0.0.1:{port}: no Dask "
                                               f"scheduler answered within 1 s"), err


def test_without_dask_the_cluster_options_say_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the extra were not installed
    status = main(["golden", "embedded", "--prompts", str(PROMPTS), "--out", str(tmp_path / "g"), "--workers", "2"])
    err = capsys.readouterr().err
    assert status == 2 and "need Dask: pip install 'lfm2np[dask]'" in err
    # serially, nothing needs it
    assert main(["golden", "embedded", "--prompts", str(PROMPTS), "--out", str(tmp_path / "g")]) == 0
    with pytest.raises(Lfm2npError, match="not both"):
        run_tasks(forward, SPEC, [], workers=2, scheduler="tcp://x:1")


@pytest.mark.parametrize("address, needle", [
    ("not an address", "no host and port"), ("tcp://host", "no host and port"), ("tcp://host:x", "no host and port"),
    ("tcp://host:99999", "no host and port"), ("tcp://:8786", "no host and port"), ("inproc://x:1", "scheme inproc"),
    ("tcp://host\x1b[2J:8786", "\\x1b")])
def test_a_scheduler_address_that_is_none_is_one_line_before_any_connection(capsys, tmp_path, address, needle):
    """A malformed address made Dask's client fail half-built: the error line, then a traceback from its clean-up
    as the interpreter exited. It is refused before Dask is asked."""
    line = cli_refuses(capsys, ["trace", "embedded", "--prompts", str(PROMPTS), "--out", str(tmp_path / "t"),
                                "--scheduler", address], "--scheduler", needle)
    assert "tcp://host:8786" in line and not (tmp_path / "t").exists()
    with pytest.raises(Lfm2npError, match="no host and port"):  # the Python entry point checks it too
        run_tasks(forward, SPEC, [Task([1, 2], "one")], scheduler="tcp://host")


def test_a_malformed_scheduler_address_leaves_no_traceback_at_exit(tmp_path):
    """The same, in a process of its own: nothing is printed after the error line when the interpreter exits."""
    run = subprocess.run([sys.executable, "-m", "lfm2np", "perplexity", "embedded", str(PROMPTS), "--scheduler",
                          "not an address"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "lfm2np: error: perplexity: argument --scheduler: 'not an address': no host and port (1..65535); expected a "
        "Dask scheduler's address such as tcp://host:8786 (see 'lfm2np perplexity --help')"], run.stderr
