"""A minimal thread pool for the request path: one lock-free queue put per job.

``concurrent.futures.ThreadPoolExecutor`` builds a work item and a Future per call and
``asyncio`` chains a second Future onto it; on a 2-core machine that bookkeeping, done on the
event loop for every image, is throughput taken from decoding and inference. Jobs here report
their own outcome (to an asyncio future, via ``call_soon_threadsafe``), so the pool needs no
futures at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

logger = logging.getLogger("defect.workers")

Job = tuple[Callable[..., None], tuple[Any, ...]]


class PoolClosedError(RuntimeError):
    """The pool is shut down (the service is stopping)."""


def start_daemon_threads(
    target: Callable[[], None], name: str, count: int
) -> list[threading.Thread]:
    """``count`` started daemon threads named ``name-0``, ``name-1``, ... running ``target``."""
    threads = [
        threading.Thread(target=target, name=f"{name}-{index}", daemon=True)
        for index in range(count)
    ]
    for thread in threads:
        thread.start()
    return threads


class WorkerPool:
    """``threads`` daemon threads running submitted jobs in order of submission."""

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError("a worker pool needs at least one thread")
        self._queue: SimpleQueue[Job | None] = SimpleQueue()
        self._closed = False
        self._threads = start_daemon_threads(self._work, name, threads)

    def submit(self, function: Callable[..., None], *args: Any) -> None:
        """Queue ``function(*args)``. It must report its own result and errors; anything it
        raises is logged and dropped."""
        if self._closed:
            raise PoolClosedError("the worker pool is shut down")
        self._queue.put((function, args))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Finish the queued jobs, then stop the threads."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            function, args = job
            try:
                function(*args)
            except BaseException:  # a job must not kill its thread
                logger.exception("worker job failed")
