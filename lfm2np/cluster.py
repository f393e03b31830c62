"""Many independent tasks on one model: serially here, or on a Dask cluster (local processes, or a scheduler's).

``run_tasks(fn, spec, tasks)`` computes ``fn(model, task.payload)`` for every task and returns the results in the
tasks' order; ``model`` is ``spec.load()``. Serially the model is loaded once, here. With ``workers=N`` a local
Dask cluster of N processes (one thread each) runs them, with ``scheduler=ADDRESS`` an existing cluster does: one
task per prompt or window, each worker loading the model once, at its first task (lazily: its memory budget is
the spec's, ``memory_budget``), and keeping it for the next ones. The results are the values ``fn`` returned,
sent back as they were computed: identical, bit for bit, to a serial run's (the same code on the same inputs;
lfm2np's results do not depend on the number of BLAS threads, and Dask's workers run one).

- **Progress**: ``progress(done, total)`` after each task.
- **Failures**: a task that raises, or whose worker dies (its process killed: out of memory, a signal), is
  reported with what it was (``task.what``: its prompt or window) and tried once more, on any worker; failing
  twice is an :class:`~lfm2np.Lfm2npError` naming it. (Serially a failure is raised as it is.)
- **Reaching a scheduler**: a scheduler that does not answer within ``timeout`` seconds is one error line, never
  a hang.

Dask (``dask[distributed]``, the ``dask`` extra) is imported only when a cluster is asked for.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .errors import Lfm2npError, shown
from .loading import load

#: seconds to wait for a scheduler to answer (the command line's --scheduler-timeout)
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the model: :func:`lfm2np.load`'s arguments (hashable: one model per spec per worker)."""

    path: str
    dtype: str = "float32"
    memory_budget: Any = None
    rope_reading: str = "trained"

    def load(self) -> Any:
        return load(self.path, dtype=self.dtype, memory_budget=self.memory_budget, rope_reading=self.rope_reading)


@dataclass(frozen=True)
class Task:
    """One task: ``payload`` for the task function, ``what`` it is in words (for progress and errors)."""

    payload: Any
    what: str


#: the models a worker process loaded, by spec: loaded at the first task that needs one, kept for the next
_LOADED: dict[ModelSpec, Any] = {}


def on_worker(fn: Callable[[Any, Any], Any], spec: ModelSpec, payload: Any) -> Any:
    """What a worker runs for one task: ``fn(model, payload)`` with this process's model of ``spec``."""
    model = _LOADED.get(spec)
    if model is None:
        model = _LOADED[spec] = spec.load()
    return fn(model, payload)


def run_tasks(fn: Callable[[Any, Any], Any], spec: ModelSpec, tasks: Sequence[Task], *, workers: int | None = None,
              scheduler: str | None = None, timeout: float = DEFAULT_TIMEOUT,
              progress: Callable[[int, int], None] | None = None, warn: Callable[[str], None] | None = None,
              on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
    """``[fn(model, t.payload) for t in tasks]`` (see the module docstring): serially when neither ``workers`` nor
    ``scheduler`` is given, else on a Dask cluster. ``warn`` receives a line for each task tried again. With
    ``on_result``, each result is handed to ``on_result(index, result)`` as it arrives (on a cluster, in the order
    the tasks finish) and not kept: a corpus's results need not fit in memory at once (the list returned then
    holds None)."""
    if workers is not None and scheduler is not None:
        raise Lfm2npError("give --workers N (a local cluster) or --scheduler ADDRESS (an existing one), not both")
    keep: Callable[[int, Any], None] = on_result or (lambda n, value: out.__setitem__(n, value))
    out: list[Any] = [None] * len(tasks)
    if workers is None and scheduler is None:
        model = spec.load()
        for n, task in enumerate(tasks):
            keep(n, fn(model, task.payload))
            if progress is not None:
                progress(n + 1, len(tasks))
        return out
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise Lfm2npError(f"workers is {shown(workers)}; expected a number of processes >= 1")
    client, cluster = _connect(workers, scheduler, timeout)
    try:
        _gather(client, fn, spec, list(tasks), progress, warn, keep)
        return out
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _dask():
    try:
        import dask  # noqa: PLC0415 (optional dependency)
        import distributed  # noqa: PLC0415
    except ImportError:
        raise Lfm2npError("--workers and --scheduler need Dask: pip install 'lfm2np[dask]'") from None
    return dask, distributed


#: the schemes of a scheduler another process can reach (Dask's inproc:// is within one process)
SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")


def address_problem(scheduler: Any) -> str | None:
    """Why ``scheduler`` is not the address of a scheduler (``[scheme://]host:port``, the scheme one of
    :data:`SCHEMES`, tcp when none), else None. A malformed address made Dask's client fail half-built, and its
    clean-up print a traceback as the interpreter exited: it is refused before Dask is asked."""
    expected = "expected a Dask scheduler's address such as tcp://host:8786"
    if not isinstance(scheduler, str) or not scheduler.isprintable():
        return expected
    scheme, _, rest = scheduler.rpartition("://")
    host, _, port = rest.rpartition(":")
    if (scheme or "tcp") not in SCHEMES:
        return f"the scheme {scheme}:// is none of {', '.join(SCHEMES)}; {expected}"
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        return f"no host and port (1..65535); {expected}"
    return None


def _connect(workers: int | None, scheduler: str | None, timeout: float) -> tuple[Any, Any]:
    """A client of a new local cluster of ``workers`` processes, or of the scheduler at ``scheduler``."""
    problem = None if scheduler is None else address_problem(scheduler)
    if problem is not None:
        raise Lfm2npError(f"--scheduler {shown(scheduler)}: {problem}")
    dask, distributed = _dask()
    # a worker that dies fails its task at once (KilledWorker): the retry below reports it, then tries once more
    with dask.config.set({"distributed.scheduler.allowed-failures": 0, "distributed.comm.timeouts.connect":
                          f"{timeout}s", "distributed.admin.tick.limit": "1h"}):
        if scheduler is not None:
            try:
                return distributed.Client(scheduler, timeout=timeout, set_as_default=False), None
            except (OSError, TimeoutError, ValueError) as e:
                why = str(e).split("\n")[0][:160] or type(e).__name__
                raise Lfm2npError(f"--scheduler {scheduler}: no Dask scheduler answered within {timeout:g} s "
                                  f"({why})") from None
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address=":0", silence_logs=logging.CRITICAL)
        try:
            return distributed.Client(cluster, set_as_default=False), cluster
        except BaseException:
            cluster.close()
            raise


def _gather(client: Any, fn: Callable, spec: ModelSpec, tasks: list[Task], progress, warn, keep) -> None:
    """Submit every task, hand each result to ``keep(index, result)``, each failed task tried once more."""
    _, distributed = _dask()
    token = uuid.uuid4().hex[:8]

    def submit(n: int, attempt: int) -> Any:
        return client.submit(on_worker, fn, spec, tasks[n].payload, key=f"lfm2np-{token}-{n}-{attempt}", pure=False)

    futures = {submit(n, 0): (n, 0) for n in range(len(tasks))}
    done = 0
    pending = distributed.as_completed(list(futures), loop=client.loop)
    for future in pending:
        n, attempt = futures.pop(future)
        try:
            result = future.result()
        except Exception as e:  # the task's own error, or its worker's death (KilledWorker)
            why = _why(e, distributed)
            if attempt:
                raise Lfm2npError(f"{tasks[n].what}: failed twice on the cluster: {why}") from None
            if warn is not None:
                warn(f"{tasks[n].what}: failed on the cluster ({why}); trying it once more")
            again = submit(n, 1)
            futures[again] = (n, 1)
            pending.add(again)
            continue
        finally:
            future.release()
        keep(n, result)
        done += 1
        if progress is not None:
            progress(done, len(tasks))


def _why(e: BaseException, distributed: Any) -> str:
    if isinstance(e, distributed.KilledWorker):
        return "its worker died (killed: out of memory, or a signal)"
    text = str(e).split("\n")[0][:300]
    return text if isinstance(e, Lfm2npError) else f"{type(e).__name__}: {text}"

