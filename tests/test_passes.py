"""lfm2np.passes: long elementwise passes shared among threads give the same bits as one thread."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lfm2np import ops, passes
from conftest import split


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(7,), (3, 5), (4, 3, 6), (2, 1, 9)]),
       axis=st.integers(-3, 2), threads=st.integers(1, 5), transpose=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_softmax_shared_among_threads_equals_the_formula(seed, shape, axis, threads, transpose, dtype):
    x = (6 * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)
    x = x.T if transpose else x
    axis = axis % x.ndim
    with split(4, 1):
        alone = ops.softmax(x, axis=axis)
    with split(4, threads):
        got = ops.softmax(x, axis=axis)
        in_place = x.copy()
        returned = ops.softmax(in_place, axis=axis, in_place=True)
    np.testing.assert_array_equal(got, alone)  # the same bits with one thread or many
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(axis=axis, keepdims=True), rtol=4 * np.finfo(dtype).eps, atol=0)
    np.testing.assert_array_equal(in_place, got)
    assert returned is in_place


def test_attention_of_a_long_prompt_is_the_same_with_one_thread_or_three():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((300, h, 16)).astype(np.float32) for h in (4, 2, 2))
    with split(1 << 18, 1):
        one = ops.attention(q, k, v, block=64)
    with split(1 << 18, 3):
        three = ops.attention(q, k, v, block=64)
    np.testing.assert_array_equal(one, three)


def test_every_piece_runs_once_and_errors_reach_the_caller():
    seen = []
    with split(1, 3):
        passes.in_parallel(10, lambda lo, hi: seen.append((lo, hi)))
        assert sorted(seen) == [(0, 3), (3, 6), (6, 10)]

        def fail(lo, hi):
            if lo:
                raise ValueError(f"piece {lo}")

        with pytest.raises(ValueError, match="piece"):
            passes.in_parallel(9, fail)


def test_small_passes_run_whole_in_the_calling_thread():
    seen = []
    passes.in_parallel(100, lambda lo, hi: seen.append((lo, hi)), size=passes.PARALLEL_MIN - 1)
    assert seen == [(0, 100)]


def test_the_callers_floating_point_settings_hold_in_every_thread():
    x = np.full((8, 8), np.inf, np.float32)  # inf - inf: "invalid value"
    with split(1, 2), warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="ignore"):
            ops.softmax(x)  # silent in every piece
        with pytest.raises(RuntimeWarning):
            ops.softmax(x)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_its_own_threads():
    with split(1, 2):
        ops.softmax(np.ones((4, 4)))  # the parent's pool exists now
        pid = os.fork()
        if pid == 0:  # the child: the parent's threads are gone, the pass must still finish
            try:
                ok = np.array_equal(ops.softmax(np.zeros((4, 4))), np.full((4, 4), 0.25))
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("env, expected", [
    ({"OPENBLAS_NUM_THREADS": "1"}, 1), ({"OPENBLAS_NUM_THREADS": "3", "OMP_NUM_THREADS": "1"}, 3),
    ({"OMP_NUM_THREADS": "2"}, 2), ({"OPENBLAS_NUM_THREADS": "many"}, None), ({}, None),
    ({"OPENBLAS_NUM_THREADS": "4096"}, 4096),  # never more than the cores
])
def test_threads_follow_the_blas_setting_or_the_cores(monkeypatch, env, expected):
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cores = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(), 16)
    assert passes._thread_count() == (min(expected, cores) if expected is not None else cores)


def test_a_pass_still_runs_when_no_new_thread_can_start(monkeypatch):
    class Refusing:  # what an executor says once the interpreter is shutting down
        def submit(self, *args):
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(passes, "_pool", Refusing())
    seen = []
    with split(1, 3):
        passes.in_parallel(9, lambda lo, hi: seen.append((lo, hi)))
    assert seen == [(0, 3), (3, 6), (6, 9)]


def test_a_thread_that_cannot_start_leaves_no_piece_to_run_twice_or_later(monkeypatch):
    # ThreadPoolExecutor queues a job before it starts a thread for it: when the start fails, the job stays
    # queued; the piece must run exactly once, before in_parallel returns
    runs = []
    monkeypatch.setattr(passes, "_pool", None)
    real_start = threading.Thread.start

    def refuse(self):
        raise RuntimeError("can't start new thread")

    with split(1, 3):
        monkeypatch.setattr(threading.Thread, "start", refuse)
        passes.in_parallel(3, lambda lo, hi: runs.append(lo))
        monkeypatch.setattr(threading.Thread, "start", real_start)
        assert sorted(runs) == [0, 1, 2]
        passes.in_parallel(3, lambda lo, hi: None)  # threads start again: the queued jobs find nothing to do
        passes._pool.shutdown(wait=True)
    assert sorted(runs) == [0, 1, 2]
    monkeypatch.setattr(passes, "_pool", None)


@pytest.fixture
def own_pool(monkeypatch):
    """A pool of its own for the test (as many threads as the test's split gives), shut down after it."""
    monkeypatch.setattr(passes, "_pool", None)
    yield
    if passes._pool is not None:
        passes._pool.shutdown(wait=True)


def test_an_error_is_raised_only_once_every_piece_has_stopped(own_pool):
    started, finished = threading.Event(), []

    def work(lo, hi):
        if lo == 0:
            assert started.wait(5)  # piece 2 is running in another thread
        elif lo == 1:
            raise ValueError("piece 1")
        else:
            started.set()
            time.sleep(0.2)
            finished.append(lo)

    with split(1, 3), pytest.raises(ValueError, match="piece 1"):
        passes.in_parallel(3, work)
    assert finished == [2]


def test_ctrl_c_waits_for_the_pieces_still_running(own_pool):
    finished = []

    def work(lo, hi):
        if lo == 1:
            time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGINT)  # reaches the main thread while it waits for the pieces
        elif lo == 2:
            time.sleep(0.3)
        if lo:
            finished.append(lo)

    with split(1, 3), pytest.raises(KeyboardInterrupt):
        passes.in_parallel(3, work)
    assert sorted(finished) == [1, 2]


def test_the_callers_error_callback_holds_in_every_thread():
    calls = []
    x = np.full((8, 8), np.inf, np.float32)
    with split(1, 4), np.errstate(all="call", call=lambda kind, flag: calls.append(kind)):
        ops.softmax(x)
    assert calls and set(calls) == {"invalid value"}


def test_a_pass_inside_a_piece_does_not_wait_on_itself(own_pool):  # one pool thread, busy with the outer piece
    inner = []

    def outer(lo, hi):
        passes.in_parallel(4, lambda a, b: inner.append((a, b)))

    done = threading.Event()

    def run():
        with split(1, 2):
            passes.in_parallel(2, outer)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(10), "a pass called from inside a piece hung"
    assert sorted(inner) == [(0, 2), (0, 2), (2, 4), (2, 4)]


def test_a_scalar_softmax_is_one_and_integer_sigmoids_do_not_wrap():
    with split(1, 3):
        assert ops.softmax(np.array(2.5)) == 1.0
        np.testing.assert_array_equal(ops.sigmoid(np.array([1, 200], np.uint8)),
                                      ops.sigmoid(np.array([1, 200], np.float32)))
        np.testing.assert_array_equal(ops.silu(np.array([-3, 7], np.int64)), ops.silu(np.array([-3.0, 7.0])))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), hd=st.sampled_from([16, 64, 128]), T=st.integers(1, 9),
       past=st.integers(0, 7), mode=st.sampled_from(["float32", "float64", "bfloat16"]))
def test_attention_scores_scaled_through_q_are_the_scores_scaled(seed, hd, T, past, mode):
    # for a power-of-two scale (head dim 16 or 64) ops.attention scales q before the product: the result
    # must be the same bits as the formula's order, softmax(rnd(rnd(q k^T) * hd^-0.5) + mask) v
    from lfm2np.numerics import MODES

    numerics = MODES[mode]
    rnd, dtype = numerics.round, numerics.dtype
    rng = np.random.default_rng(seed)
    S = T + past
    q, k, v = (rnd(rng.standard_normal(shape).astype(dtype)) for shape in ((T, 4, hd), (S, 2, hd), (S, 2, hd)))
    got = ops.attention(q, k, v, rnd=rnd)
    qg = q.reshape(T, 2, 2, hd).transpose(1, 2, 0, 3).reshape(2, 2 * T, hd)
    scores = rnd(qg @ k.transpose(1, 2, 0)).reshape(2, 2, T, S)
    scores = rnd(scores * dtype.type(hd ** -0.5))
    scores[..., np.arange(S)[None, :] > past + np.arange(T)[:, None]] = -np.inf
    probs = rnd(ops.softmax(scores)).reshape(2, 2 * T, S)
    expected = rnd(probs @ v.transpose(1, 0, 2)).reshape(2, 2, T, hd).transpose(2, 0, 1, 3).reshape(T, -1)
    np.testing.assert_array_equal(got, expected)


@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(7,), (3, 5), (4, 3, 6), (0, 4)]),
       threads=st.integers(1, 4), transpose=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]))
def test_gelu_tanh_shared_among_threads_is_the_formula_bit_for_bit(seed, shape, threads, transpose, dtype):
    """gelu_tanh runs in place, a slice per thread: each element's operations in the formula's own order."""
    x = (np.random.default_rng(seed).standard_normal(shape) * 4).astype(dtype)
    x = x.T if transpose else x
    t = x.dtype.type
    want = t(0.5) * x * (t(1) + np.tanh(t(np.sqrt(2 / np.pi)) * (x + t(0.044715) * (x * x * x))))
    with split(4, threads):
        got = ops.gelu_tanh(x)
    assert got.shape == x.shape and got.dtype == x.dtype
    np.testing.assert_array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8))


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_one_blas_thread_limits_the_blas_and_gives_its_count_back():
    before = _blas_threads()
    assert before, "NumPy's BLAS is not visible to threadpoolctl"
    for _ in range(2):  # again: the first block must leave nothing behind
        with passes.one_blas_thread():
            assert _blas_threads() == [1] * len(before)
            with passes.one_blas_thread():  # nested
                assert _blas_threads() == [1] * len(before)
            assert _blas_threads() == [1] * len(before)
        assert _blas_threads() == before
    with pytest.raises(ZeroDivisionError):  # an error inside a block gives the count back too
        with passes.one_blas_thread():
            1 / 0
    assert _blas_threads() == before


def test_blocks_in_several_threads_leave_the_count_as_it_was_and_later_blocks_work():
    before = _blas_threads()
    first_in, second_out = threading.Event(), threading.Event()

    def first() -> None:  # enters first, leaves last
        with passes.one_blas_thread():
            first_in.set()
            second_out.wait(10)

    def second() -> None:
        first_in.wait(10)
        with passes.one_blas_thread():
            pass
        second_out.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _blas_threads() == before
    seen: list[list[int]] = []

    def later() -> None:  # a thread that never held the count before
        with passes.one_blas_thread():
            seen.append(_blas_threads())

    for _ in range(2):
        t = threading.Thread(target=later)
        t.start()
        t.join()
        with passes.one_blas_thread():  # and this one
            seen.append(_blas_threads())
    assert seen == [[1] * len(before)] * 4
    assert _blas_threads() == before


@pytest.mark.parametrize("seed", range(3))
def test_vision_attention_heads_shared_among_threads_are_the_same_bits(seed, monkeypatch):
    from lfm2np import ops_vision

    rng = np.random.default_rng(seed)
    P, H, hd = int(rng.integers(40, 200)), int(rng.integers(2, 7)), int(rng.integers(8, 40))
    q, k, v = (rng.standard_normal((P, H, hd)).astype(np.float32) for _ in range(3))
    mask = (rng.random(P) < 0.8).astype(np.int64)
    mask[0] = 1
    monkeypatch.setattr(passes, "THREADS", 1)
    one = ops_vision.encoder_attention(q, k, v, mask)
    monkeypatch.setattr(passes, "THREADS", 3)
    monkeypatch.setattr(passes, "PARALLEL_MIN", 1)
    monkeypatch.setattr(passes, "_pool", None)
    shared = ops_vision.encoder_attention(q, k, v, mask)
    np.testing.assert_array_equal(shared.view(np.uint32), one.view(np.uint32))
    # and the formula, head by head, in float64
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("phd,khd->hpk", q64, k64) / np.sqrt(hd) + np.where(mask > 0, 0, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("hpk,khd->phd", p / p.sum(-1, keepdims=True), v64).reshape(P, H * hd)
    np.testing.assert_allclose(shared, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 3), (37, 4304, 96), (300, 1152, 40), (5, 2, 7, 64)])
def test_a_shared_linear_is_one_blas_threads_product_bit_for_bit(shape, monkeypatch):
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(len(shape))
    *lead, k, n = shape
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    w, b = rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    with threadpool_limits(1, "blas"):
        want = x @ w.T + b
    monkeypatch.setattr(passes, "THREADS", 3)
    monkeypatch.setattr(passes, "PARALLEL_MIN", 1)
    monkeypatch.setattr(passes, "_pool", None)
    got = ops.linear(x, w, b, shared=True)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert _blas_threads() != [] and ops.linear(x, w, None, shared=True).shape == want.shape


@pytest.mark.parametrize("shape, dtype", [((300, 1152), np.float32), ((3, 5, 7), np.float64), ((9,), np.float32),
                                          ((4, 2, 48), np.float16)])
def test_layer_norm_shared_among_threads_is_the_formula_bit_for_bit(shape, dtype, monkeypatch):
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    wdt = np.float64 if dtype == np.float64 else np.float32
    w, b = rng.standard_normal(shape[-1]).astype(wdt), rng.standard_normal(shape[-1]).astype(wdt)
    xf = x.astype(np.promote_types(dtype, np.float32))
    centred = xf - np.mean(xf, axis=-1, keepdims=True)
    want = (centred * (1.0 / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + xf.dtype.type(1e-6)))
            * w + b).astype(dtype)
    monkeypatch.setattr(passes, "THREADS", 3)
    monkeypatch.setattr(passes, "PARALLEL_MIN", 1)
    monkeypatch.setattr(passes, "_pool", None)
    got = ops.layer_norm(x, w, b, 1e-6)
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_array_equal(got, want)
    wide = ops.layer_norm(x.astype(np.float32), w.astype(np.float64), b.astype(np.float64), 1e-6)  # promoted
    assert wide.dtype == np.float32


def test_shared_products_run_every_piece_on_one_blas_thread_and_give_the_count_back(monkeypatch):
    before = _blas_threads()
    monkeypatch.setattr(passes, "THREADS", 3)
    monkeypatch.setattr(passes, "PARALLEL_MIN", 1)
    monkeypatch.setattr(passes, "_pool", None)
    seen: dict[int, tuple[str, list[int]]] = {}

    def piece(lo: int, hi: int) -> None:
        time.sleep(0.01)  # let the pool's threads take pieces too
        for i in range(lo, hi):
            seen[i] = (threading.current_thread().name, _blas_threads())

    passes.shared_products(12, piece, per_thread=4)
    assert sorted(seen) == list(range(12))
    assert all(counts == [1] * len(before) for _, counts in seen.values())
    assert len({name for name, _ in seen.values()}) > 1  # more than one thread ran pieces
    assert _blas_threads() == before
