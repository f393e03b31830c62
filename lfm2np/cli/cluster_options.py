"""The options of the commands that run many tasks (``conformance make``, ``trace``/``golden`` over a prompts file,
``perplexity``): ``--workers N`` (a local Dask cluster of N processes) or ``--scheduler ADDRESS`` (an existing
one), and a progress bar on stderr (:class:`TaskProgress`)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, TextIO

from ..cluster import DEFAULT_TIMEOUT, ModelSpec, Task, address_problem, run_tasks
from ..errors import shown
from .common import positive_float, positive_int


def workers(text: str) -> int:
    """``--workers N``: 1 .. 256 processes."""
    n = positive_int(text)
    if n > 256:
        raise argparse.ArgumentTypeError(f"{n} is too many worker processes (at most 256)")
    return n


def scheduler_address(text: str) -> str:
    """``--scheduler ADDRESS``: ``[scheme://]host:port``, checked before anything is loaded."""
    problem = address_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{shown(text)}: {problem}")
    return text


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=workers, metavar="N",
                   help="run the tasks (one per prompt, case or window) on a local Dask cluster of N processes, each "
                        "loading the model once (needs the dask extra: pip install 'lfm2np[dask]'); the results "
                        "are identical, bit for bit, to a serial run's")
    g.add_argument("--scheduler", type=scheduler_address, metavar="ADDRESS",
                   help="run the tasks on an existing Dask cluster (tcp://host:8786); its workers need lfm2np and "
                        "the model's files at the same path")
    p.add_argument("--scheduler-timeout", type=positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"give up on a scheduler that does not answer within this time (default {DEFAULT_TIMEOUT:g})")


class TaskProgress:
    """``[what: 3/12 tasks, 2 workers, 14 s, ETA 40 s]`` on stderr: one line rewritten in place on a terminal,
    a line every ``every`` seconds elsewhere (none for a run shorter than that)."""

    def __init__(self, what: str, where: str = "", stream: TextIO | None = None, every: float = 10.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.what, self.where = what, where
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every, self.clock = every, clock
        self.t0 = self.last = clock()

    def line(self, done: int, total: int) -> str:
        elapsed = self.clock() - self.t0
        eta = f", ETA {elapsed / done * (total - done):.0f} s" if 0 < done < total else ""
        return f"[{self.what}: {done}/{total} tasks{self.where}, {elapsed:.0f} s{eta}]"

    def __call__(self, done: int, total: int) -> None:
        text = self.line(done, total)
        if self.terminal:
            self.stream.write("\r" + text + ("\n" if done == total else ""))
            self.stream.flush()
        elif self.clock() - self.last >= self.every and done < total:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last = self.clock()


def warn_line(message: str) -> None:
    print(f"lfm2np: warning: {message}", file=sys.stderr, flush=True)


def runner_for(args: argparse.Namespace, source: Any, what: str) -> Callable[..., list]:
    """``runner(fn, tasks, on_result=None)`` (:func:`lfm2np.cluster.run_tasks`) for the command's model ``source``
    and its cluster options."""
    spec = ModelSpec(str(source), getattr(args, "dtype", "float32"), getattr(args, "memory_budget", None),
                     getattr(args, "rope_reading", "trained"))
    where = f" on {args.workers} workers" if args.workers else f" on {args.scheduler}" if args.scheduler else ""
    quiet = getattr(args, "quiet", False)

    def run(fn: Callable, tasks: list, on_result: Callable[[int, Any], None] | None = None) -> list:
        return run_tasks(fn, spec, tasks, workers=args.workers, scheduler=args.scheduler,
                         timeout=args.scheduler_timeout, progress=None if quiet else TaskProgress(what, where),
                         warn=warn_line, on_result=on_result)
    return run


__all__ = ["Task", "TaskProgress", "add_cluster_arguments", "runner_for", "scheduler_address", "warn_line", "workers"]
