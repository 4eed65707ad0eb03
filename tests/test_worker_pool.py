"""The request path's thread pool: jobs run off the caller's thread, failures stay contained."""

from __future__ import annotations

import logging
import threading

import pytest

from app.worker_pool import PoolClosedError, WorkerPool


def test_jobs_run_on_pool_threads_and_shutdown_finishes_the_queue() -> None:
    pool = WorkerPool(2, name="test-pool")
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()

    def job(index: int) -> None:
        with lock:
            seen.append((index, threading.current_thread().name))

    for index in range(200):
        pool.submit(job, index)
    pool.shutdown()
    assert sorted(index for index, _ in seen) == list(range(200))
    assert {name.rsplit("-", 1)[0] for _, name in seen} == {"test-pool"}
    assert all(not thread.is_alive() for thread in pool._threads)


def test_a_failing_job_is_logged_and_the_thread_keeps_working(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = WorkerPool(1, name="test-pool")
    done = threading.Event()

    def boom() -> None:
        raise ValueError("job failed")

    with caplog.at_level(logging.ERROR, logger="defect.workers"):
        pool.submit(boom)
        pool.submit(done.set)
        assert done.wait(5)
    pool.shutdown()
    assert any("worker job failed" in record.message for record in caplog.records)


def test_submit_after_shutdown_is_refused() -> None:
    pool = WorkerPool(1, name="test-pool")
    pool.shutdown()
    pool.shutdown()  # idempotent
    with pytest.raises(PoolClosedError, match="shut down"):
        pool.submit(print)


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        WorkerPool(0, name="test-pool")
