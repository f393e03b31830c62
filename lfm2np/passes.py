"""How the long elementwise passes run: in cache-sized slices, shared among threads (softmax rows, the
SwiGLU and gate activations of :mod:`lfm2np.ops`).

NumPy runs a ufunc on one core; the BLAS runs its matrix products on all of them. On a long prompt the
passes between the products (the softmax over the attention scores above all) would then leave the other
cores idle, where torch spreads its own kernels over every thread. :func:`in_parallel` hands contiguous,
independent pieces of such a pass to a small pool of threads (NumPy releases the interpreter lock inside
its loops). Each element sees the same operations whatever the split, so the results are the same bits
with one thread or many; small passes (decoding) run whole, in the calling thread.

With OpenBLAS, an idle BLAS worker keeps polling its core for a while after each product (2^26 to 2^28
cycles by default, by build) before it sleeps, which leaves the pool little of that core; ``OPENBLAS_THREAD_TIMEOUT``
(read when NumPy loads) shortens the wait: see docs/performance.md for the measured trade-off.

This module imports nothing from lfm2np.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
from threadpoolctl import ThreadpoolController

#: the fewest elements an elementwise pass splits between threads (below, handing out the work costs more)
PARALLEL_MIN = 1 << 16


def _thread_count() -> int:
    """Threads for the elementwise passes: the BLAS's count when the environment sets one (so
    ``OPENBLAS_NUM_THREADS=1`` means one thread everywhere), else the cores this process may use; never
    more than those cores (or 16)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = max(1, min(cores, 16))
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return min(int(value), cores)
    return cores


#: threads :func:`in_parallel` uses (fixed at import, like the BLAS's own; 1 turns the splitting off)
THREADS = _thread_count()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:  # a forked child has none of its parent's threads (nor their locks' state)
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _helpers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(THREADS - 1, thread_name_prefix="lfm2np")
        return _pool


_blas_controller: ThreadpoolController | None = None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Inside this block the BLAS runs each product on its calling thread alone (through threadpoolctl), for
    work that :func:`in_parallel` shares out one product at a time (the rows of a product, the heads of an
    attention). Two gains: products too small for the BLAS to split well run side by side, one per core; and
    the BLAS's own worker threads, which would otherwise poll a core for a while after each product of
    theirs (see the module docstring), stay asleep while lfm2np's threads run the passes between products.
    The bits are one BLAS thread's whatever the thread count: OpenBLAS's threaded products can differ from
    its one-thread ones in the last bits at some depths (measured: K = 4304, the SigLIP2 MLP's down
    projection; not 1152, 2048 or 8192), while a product cut into row ranges is the same bits as the whole
    on one thread. The count comes back when the block ends. It is the process's, and threadpoolctl lets one
    thread at a time change it: a block another thread enters meanwhile runs with whatever count holds."""
    global _blas_controller
    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    with _blas_controller.limit(limits=1, user_api="blas"):
        yield


def shared_products(n: int, work: Callable[[int, int], None], size: int | None = None, per_thread: int = 1) -> None:
    """:func:`in_parallel` for work made of BLAS products: the BLAS held to one thread (:func:`one_blas_thread`)
    in the calling thread for the whole call and in each piece's thread for its piece, so that every product
    runs on one BLAS thread whichever thread runs it (threadpoolctl changes the count for the whole process with
    a pthreads OpenBLAS, NumPy's, and for the calling thread alone where the BLAS runs on OpenMP)."""

    def piece(lo: int, hi: int) -> None:
        with one_blas_thread():
            work(lo, hi)

    with one_blas_thread():
        in_parallel(n, piece, size, per_thread)


def in_parallel(n: int, work: Callable[[int, int], None], size: int | None = None, per_thread: int = 1) -> None:
    """``work(lo, hi)`` over ``0 .. n`` in up to :data:`THREADS` contiguous pieces at once, for passes whose
    pieces are independent (rows of a softmax, slices of an elementwise chain): each element sees the same
    operations whatever the split, so the result is the same bits. ``size`` (elements in all; default n)
    below :data:`PARALLEL_MIN` runs in one piece here. ``per_thread`` > 1 cuts the work into that many
    pieces per thread, claimed as threads free up: one slowed by other work (the BLAS's idle threads
    polling a core, another process) then takes fewer.

    Each piece is claimed before it runs, by a pool thread or by this one, which takes the first piece and
    then every piece no pool thread has started (a busy pool, a call from inside a piece, a thread that
    cannot start: this thread does the work). When this returns or raises, no piece is still running: an
    error (this thread's first, else a piece's) is raised once every started piece has stopped, and
    Ctrl-C waits for them too. The caller's floating-point settings (``np.errstate``, its callback) hold in
    every piece."""
    parts = min(THREADS * per_thread, n, max(1, (n if size is None else size) // PARALLEL_MIN))
    if parts <= 1 or THREADS <= 1:
        work(0, n)
        return
    bounds = [n * i // parts for i in range(parts + 1)]
    modes, call = np.geterr(), np.geterrcall()
    claims = [threading.Lock() for _ in range(parts)]
    done = [threading.Event() for _ in range(parts)]
    errors: list[BaseException | None] = [None] * parts

    def helper(i: int) -> None:
        if not claims[i].acquire(blocking=False):
            return  # this thread ran it, or gave up on it
        try:
            with np.errstate(call=call, **modes):
                work(bounds[i], bounds[i + 1])
        except BaseException as error:  # raised in the calling thread, below
            errors[i] = error
        finally:
            done[i].set()

    mine: set[int] = set()
    first: BaseException | None = None
    try:
        pool = _helpers()
        for i in range(1, parts):
            try:
                pool.submit(helper, i)
            except RuntimeError:  # no new threads (the interpreter is shutting down): run below
                break
        for i in range(parts):  # the first piece, then any no pool thread has started
            if claims[i].acquire(blocking=False):
                mine.add(i)
                work(bounds[i], bounds[i + 1])
    except BaseException as error:
        first = error
    for i in range(parts):  # from here on no pool thread starts a piece
        if claims[i].acquire(blocking=False):
            mine.add(i)
    interrupted: BaseException | None = None
    for i in set(range(parts)) - mine:
        while True:
            try:
                done[i].wait()
                break
            except KeyboardInterrupt as error:  # keep waiting: that piece is still writing
                interrupted = error
    raised = first or interrupted or next((e for e in errors if e is not None), None)
    if raised is not None:
        raise raised


#: elements per pass of the elementwise chains below: a slice stays in a core's L2 cache (1 MiB of float32)
#: through its four passes; whole activations of a long prompt (tens of MB) would go to memory each time
ELEMENTWISE_CHUNK = 1 << 18


def logistic(x: np.ndarray, numerator: bool, times: np.ndarray | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
    """``1 / (1 + exp(-x))`` (``numerator`` False) or ``x / (1 + exp(-x))`` (True), then times ``times`` if
    given, into ``out`` (a new buffer, or ``x`` itself), a cache-sized slice at a time, the elements shared
    among :func:`in_parallel`'s threads: each sees the same operations whatever the split, so the result
    does not depend on it. exp overflows to inf for very negative x, which gives the right 0."""
    x = np.asarray(x)
    dtype = np.result_type(x, np.float32)  # float16 computes in float32
    x = x.astype(dtype, copy=False)  # (the same values; integers first, as -x of an unsigned one wraps)
    if out is None or not out.flags.c_contiguous or out.dtype != dtype:  # (a strided out: written via a copy)
        out = np.empty(x.shape, dtype=dtype)
    flat_x, flat = x.reshape(-1), out.reshape(-1)
    flat_times = None if times is None else times.reshape(-1)

    def elements(lo: int, hi: int) -> None:  # flat[lo:hi], a slice at a time
        scratch = np.empty(min(ELEMENTWISE_CHUNK, hi - lo), out.dtype)  # 1 + exp(-x) of a slice, in cache
        for i in range(lo, hi, ELEMENTWISE_CHUNK):
            j = min(i + ELEMENTWISE_CHUNK, hi)
            xs, t, d = flat_x[i:j], flat[i:j], scratch[:j - i]
            np.negative(xs, out=d)
            with np.errstate(over="ignore"):
                np.exp(d, out=d)
            d += 1.0
            if numerator:
                np.divide(xs, d, out=t)
            else:
                np.reciprocal(d, out=t)
            if flat_times is not None:
                t *= flat_times[i:j]

    in_parallel(flat.size, elements)
    return out
