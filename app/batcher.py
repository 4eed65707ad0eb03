"""Dynamic micro-batching: coalesce concurrent images into one model run.

Design (measured on a 2-core CPU, where decoding costs as much as the model):

* Admission first. A request *reserves* its slots before it decodes anything, so an overloaded
  service refuses work (503 + Retry-After) before spending CPU on it, and the bound covers
  everything admitted and not yet running, not just the queue proper.
* Worker threads own the model runs (one per parallel run; on a CPU, several single-threaded
  runs side by side beat one multi-threaded run). Requests decode in their own threads (Pillow
  and onnxruntime both release the GIL) and hand tensors over, so decoding and inference overlap.
* Wait only when it can pay. The worker waits up to ``max_wait`` for batch-mates only while some
  reserved request is still decoding; a lone request runs at once, so batching costs nothing at
  concurrency 1.
* Isolation. If a batch run fails, each item is retried alone, so one bad item cannot fail its
  batch-mates. Every item gets its own result or its own exception.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from app.worker_pool import start_daemon_threads

logger = logging.getLogger("defect.batcher")

In = TypeVar("In")
Out = TypeVar("Out")


class QueueFullError(RuntimeError):
    """No room for more work: answer 503 with Retry-After."""


class BatcherClosedError(RuntimeError):
    """The service is shutting down."""


@dataclass(frozen=True, slots=True)
class Completed(Generic[Out]):
    """One item's result plus how it was served."""

    value: Out
    queue_seconds: float
    run_seconds: float
    batch_size: int


class BatchObserver(Protocol):
    def observe_batch(self, size: int, queue_seconds: Sequence[float], run_seconds: float) -> None:
        """Called by the worker after every model run (for metrics)."""


@dataclass(slots=True)
class _Item(Generic[In, Out]):
    payload: In
    future: Future[Completed[Out]]
    enqueued: float


class BatcherReservation(Generic[In, Out]):
    """Slots held by one request. Each :meth:`submit` uses one; :meth:`release` frees unused
    ones. Its counter is only touched under the batcher's lock: a batch request submits from
    several decoding threads at once."""

    __slots__ = ("_batcher", "_remaining")

    def __init__(self, batcher: MicroBatcher[In, Out], count: int) -> None:
        self._batcher = batcher
        self._remaining = count

    def submit(self, item: In) -> Future[Completed[Out]]:
        return self._batcher._enqueue(item, self)

    def release(self, count: int | None = None) -> None:
        """Give back ``count`` unused slots (all by default), e.g. for an image that failed
        to decode, so the worker stops waiting for it."""
        self._batcher._unreserve(self, count)

    def __enter__(self) -> BatcherReservation[In, Out]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class MicroBatcher(Generic[In, Out]):
    """Runs ``run_batch(items) -> outputs`` (same length, same order) on worker threads."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[In]], Sequence[Out]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        observer: BatchObserver | None = None,
        workers: int = 1,
        name: str = "micro-batcher",
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0 or workers < 1:
            raise ValueError("max_batch_size, max_queue and workers must be >= 1, max_wait_s >= 0")
        self._run_batch = run_batch
        self._max_batch = max_batch_size
        self._max_wait = max_wait_s
        self._max_queue = max_queue
        self._observer = observer
        self._queue: deque[_Item[In, Out]] = deque()
        self._expected = 0  # reserved slots not yet submitted (their images are decoding)
        self._closed = False
        self._collecting = False  # a worker is forming a batch
        self._condition = threading.Condition(threading.Lock())
        self._threads = start_daemon_threads(self._work, name, workers)

    @property
    def pending(self) -> int:
        """Admitted items not yet picked up by the worker."""
        return self._expected + len(self._queue)

    def reserve(self, count: int = 1) -> BatcherReservation[In, Out]:
        """Hold ``count`` slots or raise :class:`QueueFullError` at once (never blocks)."""
        if count < 1:
            raise ValueError("reserve at least one slot")
        with self._condition:
            if self._closed:
                raise BatcherClosedError("the service is shutting down")
            if self._expected + len(self._queue) + count > self._max_queue:
                raise QueueFullError(
                    f"{self._expected + len(self._queue)} images pending, the limit is "
                    f"{self._max_queue}"
                )
            self._expected += count
        return BatcherReservation(self, count)

    def _unreserve(self, reservation: BatcherReservation[In, Out], count: int | None) -> None:
        with self._condition:
            held = reservation._remaining
            count = held if count is None else max(0, min(count, held))
            if count:
                reservation._remaining -= count
                self._expected -= count
                self._condition.notify_all()  # a collecting worker may stop waiting

    def _enqueue(
        self, payload: In, reservation: BatcherReservation[In, Out]
    ) -> Future[Completed[Out]]:
        future: Future[Completed[Out]] = Future()
        with self._condition:
            if reservation._remaining <= 0:
                raise RuntimeError("reservation exhausted: reserve one slot per submitted item")
            reservation._remaining -= 1
            self._expected -= 1
            if self._closed:
                future.set_exception(BatcherClosedError("the service is shutting down"))
                return future
            self._queue.append(_Item(payload, future, time.perf_counter()))
            self._condition.notify_all()  # wake the collecting worker, not only an idle one
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting work, finish what is queued, and join the worker."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _take_batch(self) -> list[_Item[In, Out]] | None:
        with self._condition:
            # One worker collects a batch at a time; the others wait their turn instead of
            # splitting it (they still run side by side once their batches are formed).
            while not self._queue or self._collecting:
                if self._closed and not self._queue:
                    return None
                self._condition.wait()
            self._collecting = True
            try:
                batch = [self._queue.popleft()]
                deadline = batch[0].enqueued + self._max_wait
                while len(batch) < self._max_batch:
                    if self._queue:
                        batch.append(self._queue.popleft())
                        continue
                    remaining = deadline - time.perf_counter()
                    if self._expected == 0 or remaining <= 0 or self._closed:
                        break
                    self._condition.wait(remaining)
            finally:
                self._collecting = False
                self._condition.notify_all()  # the next worker may start collecting
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            # Drop items whose caller gave up (client disconnected) before running them.
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if live:
                self._run(live)

    def _run(self, batch: list[_Item[In, Out]]) -> None:
        started = time.perf_counter()
        waits = [started - item.enqueued for item in batch]
        try:
            outputs = self._run_batch([item.payload for item in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"{len(outputs)} outputs for {len(batch)} inputs")
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                self._observe(1, waits, time.perf_counter() - started)
                return
            logger.warning(
                "batch run failed; retrying items one by one",
                extra={"fields": {"batch_size": len(batch), "error": repr(exc)}},
            )
            for item in batch:
                self._run_alone(item)
            return
        run_seconds = time.perf_counter() - started
        self._observe(len(batch), waits, run_seconds)
        size = len(batch)
        for item, output, wait in zip(batch, outputs, waits, strict=True):
            item.future.set_result(Completed(output, wait, run_seconds, size))

    def _run_alone(self, item: _Item[In, Out]) -> None:
        started = time.perf_counter()
        wait = started - item.enqueued
        try:
            outputs = self._run_batch([item.payload])
            if len(outputs) != 1:
                raise RuntimeError(f"{len(outputs)} outputs for 1 input")
        except Exception as exc:
            item.future.set_exception(exc)
            self._observe(1, [wait], time.perf_counter() - started)
            return
        run_seconds = time.perf_counter() - started
        self._observe(1, [wait], run_seconds)
        item.future.set_result(Completed(outputs[0], wait, run_seconds, 1))

    def _observe(self, size: int, waits: Sequence[float], run_seconds: float) -> None:
        if self._observer is not None:
            try:
                self._observer.observe_batch(size, waits, run_seconds)
            except Exception:  # metrics must never break serving
                logger.exception("batch observer failed")


class DirectReservation(Generic[In, Out]):
    __slots__ = ("_executor", "_remaining")

    def __init__(self, executor: DirectExecutor[In, Out], count: int) -> None:
        self._executor = executor
        self._remaining = count

    def submit(self, item: In) -> Future[Completed[Out]]:
        self._executor._take_slot(self)
        try:
            return self._executor._run_now(item)
        finally:
            self._executor._free_slots(1)

    def release(self, count: int | None = None) -> None:
        self._executor._unreserve(self, count)

    def __enter__(self) -> DirectReservation[In, Out]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class DirectExecutor(Generic[In, Out]):
    """Batching off: each item runs alone, in the submitting thread, with the same admission
    bound and the same metrics as the batcher (so the two are comparable in benchmarks)."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[In]], Sequence[Out]],
        *,
        max_queue: int,
        observer: BatchObserver | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._max_queue = max_queue
        self._observer = observer
        self._in_flight = 0
        self._closed = False
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._in_flight

    def reserve(self, count: int = 1) -> DirectReservation[In, Out]:
        if count < 1:
            raise ValueError("reserve at least one slot")
        with self._lock:
            if self._closed:
                raise BatcherClosedError("the service is shutting down")
            if self._in_flight + count > self._max_queue:
                raise QueueFullError(
                    f"{self._in_flight} images in flight, the limit is {self._max_queue}"
                )
            self._in_flight += count
        return DirectReservation(self, count)

    def _take_slot(self, reservation: DirectReservation[In, Out]) -> None:
        with self._lock:
            if reservation._remaining <= 0:
                raise RuntimeError("reservation exhausted: reserve one slot per submitted item")
            reservation._remaining -= 1

    def _free_slots(self, count: int) -> None:
        with self._lock:
            self._in_flight -= count

    def _unreserve(self, reservation: DirectReservation[In, Out], count: int | None) -> None:
        with self._lock:
            held = reservation._remaining
            count = held if count is None else max(0, min(count, held))
            reservation._remaining -= count
            self._in_flight -= count

    def _run_now(self, payload: In) -> Future[Completed[Out]]:
        future: Future[Completed[Out]] = Future()
        started = time.perf_counter()
        try:
            outputs = self._run_batch([payload])
            if len(outputs) != 1:
                raise RuntimeError(f"{len(outputs)} outputs for 1 input")
        except Exception as exc:
            future.set_exception(exc)
            return future
        run_seconds = time.perf_counter() - started
        if self._observer is not None:
            try:
                self._observer.observe_batch(1, [0.0], run_seconds)
            except Exception:
                logger.exception("batch observer failed")
        future.set_result(Completed(outputs[0], 0.0, run_seconds, 1))
        return future

    def close(self) -> None:
        with self._lock:
            self._closed = True
