"""Micro-batcher behaviour with a fake model: coalescing, waiting rules, bounds, isolation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor

import pytest

from app.batcher import (
    BatcherClosedError,
    Completed,
    DirectExecutor,
    MicroBatcher,
    QueueFullError,
)

RESULT_TIMEOUT = 5.0


class FakeModel:
    """Doubles each number; fails on negative numbers; records every batch it ran."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.gate: threading.Event | None = None
        self.lock = threading.Lock()

    def __call__(self, items: Sequence[int]) -> list[int]:
        if self.gate is not None:
            assert self.gate.wait(RESULT_TIMEOUT)
        with self.lock:
            self.batches.append(list(items))
            self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        if any(item < 0 for item in items):
            raise ValueError(f"negative input in {list(items)}")
        return [item * 2 for item in items]


class RecordingObserver:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.waits: list[float] = []

    def observe_batch(self, size: int, queue_seconds: Sequence[float], run_seconds: float) -> None:
        self.sizes.append(size)
        self.waits.extend(queue_seconds)


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


BatcherFactory = Callable[..., MicroBatcher[int, int]]


@pytest.fixture
def make_batcher(model: FakeModel) -> Iterator[BatcherFactory]:
    created: list[MicroBatcher[int, int]] = []

    def factory(
        max_batch_size: int = 8, max_wait_s: float = 0.5, max_queue: int = 64
    ) -> MicroBatcher[int, int]:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            model, max_batch_size=max_batch_size, max_wait_s=max_wait_s, max_queue=max_queue
        )
        created.append(batcher)
        return batcher

    yield factory
    for batcher in created:
        batcher.close(timeout=RESULT_TIMEOUT)


def test_lone_item_runs_at_once_without_waiting(
    make_batcher: BatcherFactory, model: FakeModel
) -> None:
    batcher = make_batcher(max_wait_s=2.0)
    started = time.perf_counter()
    with batcher.reserve(1) as reservation:
        result = reservation.submit(21).result(RESULT_TIMEOUT)
    assert result.value == 42
    assert result.batch_size == 1
    assert time.perf_counter() - started < 1.0  # did not sit out the 2 s wait
    assert model.batches == [[21]]


def test_items_of_reserved_requests_are_coalesced(
    make_batcher: BatcherFactory, model: FakeModel
) -> None:
    batcher = make_batcher(max_wait_s=2.0)
    reservation = batcher.reserve(4)
    futures = [reservation.submit(value) for value in (1, 2, 3, 4)]
    results = [future.result(RESULT_TIMEOUT) for future in futures]
    assert [result.value for result in results] == [2, 4, 6, 8]
    assert model.batches == [[1, 2, 3, 4]]
    assert {result.batch_size for result in results} == {4}


def test_batches_never_exceed_max_batch_size(
    make_batcher: BatcherFactory, model: FakeModel
) -> None:
    batcher = make_batcher(max_batch_size=4)
    reservation = batcher.reserve(10)
    futures = [reservation.submit(value) for value in range(10)]
    assert [future.result(RESULT_TIMEOUT).value for future in futures] == [
        2 * value for value in range(10)
    ]
    assert all(len(batch) <= 4 for batch in model.batches)
    assert sorted(value for batch in model.batches for value in batch) == list(range(10))


def test_waits_at_most_max_wait_for_a_batch_mate_still_decoding(
    make_batcher: BatcherFactory, model: FakeModel
) -> None:
    batcher = make_batcher(max_wait_s=0.1)
    reservation = batcher.reserve(2)  # the second image never arrives
    started = time.perf_counter()
    result = reservation.submit(5).result(RESULT_TIMEOUT)
    elapsed = time.perf_counter() - started
    assert result.value == 10
    assert result.batch_size == 1
    assert 0.09 <= elapsed < 2.0
    assert result.queue_seconds >= 0.09
    reservation.release()


def test_releasing_a_failed_slot_stops_the_wait(
    make_batcher: BatcherFactory, model: FakeModel
) -> None:
    batcher = make_batcher(max_wait_s=3.0)
    reservation = batcher.reserve(2)
    future = reservation.submit(5)
    time.sleep(0.05)
    started = time.perf_counter()
    reservation.release(1)  # e.g. the other image failed to decode
    assert future.result(RESULT_TIMEOUT).value == 10
    assert time.perf_counter() - started < 1.5


def test_queue_bound_refuses_at_once_and_recovers(make_batcher: BatcherFactory) -> None:
    batcher = make_batcher(max_queue=3)
    held = batcher.reserve(3)
    assert batcher.pending == 3
    with pytest.raises(QueueFullError, match="limit is 3"):
        batcher.reserve(1)
    held.release(2)
    extra = batcher.reserve(2)
    assert batcher.pending == 3
    held.release()
    extra.release()
    assert batcher.pending == 0


def test_a_failing_item_does_not_fail_its_batch_mates(
    make_batcher: BatcherFactory, model: FakeModel
) -> None:
    batcher = make_batcher(max_wait_s=2.0)
    reservation = batcher.reserve(3)
    futures = [reservation.submit(value) for value in (1, -1, 3)]
    assert futures[0].result(RESULT_TIMEOUT).value == 2
    assert futures[2].result(RESULT_TIMEOUT).value == 6
    with pytest.raises(ValueError, match="negative"):
        futures[1].result(RESULT_TIMEOUT)
    assert model.batches[0] == [1, -1, 3]  # tried as one batch first
    assert sorted(map(tuple, model.batches[1:])) == [(-1,), (1,), (3,)]


def test_wrong_output_count_fails_only_the_affected_run() -> None:
    calls: list[int] = []

    def broken(items: Sequence[int]) -> list[int]:
        calls.append(len(items))
        return [0] if len(items) > 1 else [item + 1 for item in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        broken, max_batch_size=4, max_wait_s=1.0, max_queue=8
    )
    try:
        reservation = batcher.reserve(2)
        futures = [reservation.submit(value) for value in (1, 2)]
        assert [future.result(RESULT_TIMEOUT).value for future in futures] == [2, 3]
        assert calls == [2, 1, 1]
    finally:
        batcher.close()


def test_cancelled_items_are_not_run(make_batcher: BatcherFactory, model: FakeModel) -> None:
    batcher = make_batcher(max_wait_s=0.0)
    model.gate = threading.Event()
    first_reservation = batcher.reserve(1)
    first = first_reservation.submit(1)  # the worker blocks on the gate with this one
    time.sleep(0.05)
    second = batcher.reserve(1).submit(2)
    assert second.cancel()  # the client went away while it was queued
    model.gate.set()
    assert first.result(RESULT_TIMEOUT).value == 2
    with pytest.raises(CancelledError):
        second.result(RESULT_TIMEOUT)
    third = batcher.reserve(1).submit(3)
    assert third.result(RESULT_TIMEOUT).value == 6
    assert [2] not in model.batches


def test_worker_is_one_thread_and_not_the_caller(
    make_batcher: BatcherFactory, model: FakeModel
) -> None:
    batcher = make_batcher(max_wait_s=0.0)
    for value in range(5):
        with batcher.reserve(1) as reservation:
            reservation.submit(value).result(RESULT_TIMEOUT)
    assert len(model.threads) == 1
    assert threading.current_thread().name not in model.threads


def test_observer_sees_batch_sizes_and_queue_waits(model: FakeModel) -> None:
    observer = RecordingObserver()
    batcher: MicroBatcher[int, int] = MicroBatcher(
        model, max_batch_size=8, max_wait_s=1.0, max_queue=8, observer=observer
    )
    try:
        reservation = batcher.reserve(3)
        futures = [reservation.submit(value) for value in (1, 2, 3)]
        for future in futures:
            future.result(RESULT_TIMEOUT)
    finally:
        batcher.close()
    assert observer.sizes == [3]
    assert len(observer.waits) == 3
    assert all(wait >= 0 for wait in observer.waits)


def test_close_finishes_queued_work_then_refuses(
    make_batcher: BatcherFactory, model: FakeModel
) -> None:
    batcher = make_batcher(max_wait_s=0.0)
    model.gate = threading.Event()
    reservation = batcher.reserve(3)
    futures = [reservation.submit(value) for value in (1, 2, 3)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    model.gate.set()
    closer.join(RESULT_TIMEOUT)
    assert [future.result(RESULT_TIMEOUT).value for future in futures] == [2, 4, 6]
    with pytest.raises(BatcherClosedError):
        batcher.reserve(1)


def test_submit_after_close_fails_the_item(make_batcher: BatcherFactory) -> None:
    batcher = make_batcher()
    reservation = batcher.reserve(1)
    batcher.close()
    with pytest.raises(BatcherClosedError):
        reservation.submit(1).result(RESULT_TIMEOUT)


def test_a_reservation_cannot_submit_more_than_it_holds(make_batcher: BatcherFactory) -> None:
    batcher = make_batcher()
    reservation = batcher.reserve(1)
    reservation.submit(1).result(RESULT_TIMEOUT)
    with pytest.raises(RuntimeError, match="exhausted"):
        reservation.submit(2)


def test_many_threads_get_their_own_results(make_batcher: BatcherFactory, model: FakeModel) -> None:
    batcher = make_batcher(max_batch_size=8, max_wait_s=0.005)

    def request(value: int) -> Completed[int]:
        with batcher.reserve(1) as reservation:
            time.sleep((value % 7) / 2000)  # decoding takes a while
            return reservation.submit(value).result(RESULT_TIMEOUT)

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(request, range(300)))
    assert [result.value for result in results] == [2 * value for value in range(300)]
    assert max(len(batch) for batch in model.batches) > 1  # concurrency did coalesce
    assert batcher.pending == 0


def test_several_workers_run_batches_side_by_side() -> None:
    running = 0
    most_at_once = 0
    lock = threading.Lock()

    def slow(items: Sequence[int]) -> list[int]:
        nonlocal running, most_at_once
        with lock:
            running += 1
            most_at_once = max(most_at_once, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(
        slow, max_batch_size=1, max_wait_s=0.0, max_queue=16, workers=2
    )
    try:
        reservation = batcher.reserve(6)
        futures = [reservation.submit(value) for value in range(6)]
        assert [future.result(RESULT_TIMEOUT).value for future in futures] == list(range(6))
    finally:
        batcher.close()
    assert most_at_once == 2


def test_validates_its_configuration(model: FakeModel) -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(model, max_batch_size=0, max_wait_s=0.0, max_queue=1)
    with pytest.raises(ValueError, match="workers"):
        MicroBatcher(model, max_batch_size=1, max_wait_s=0.0, max_queue=1, workers=0)


# --- batching off -----------------------------------------------------------------------------


def test_direct_executor_runs_in_the_calling_thread(model: FakeModel) -> None:
    observer = RecordingObserver()
    executor: DirectExecutor[int, int] = DirectExecutor(model, max_queue=2, observer=observer)
    reservation = executor.reserve(2)
    assert executor.pending == 2
    result = reservation.submit(4).result(0)  # already done when submit returns
    assert result.value == 8
    assert result.batch_size == 1
    assert model.threads == {threading.current_thread().name}
    assert executor.pending == 1
    with pytest.raises(QueueFullError):
        executor.reserve(2)
    reservation.release()
    assert executor.pending == 0
    assert observer.sizes == [1]


def test_direct_executor_reports_failures_per_item(model: FakeModel) -> None:
    executor: DirectExecutor[int, int] = DirectExecutor(model, max_queue=4)
    reservation = executor.reserve(2)
    with pytest.raises(ValueError, match="negative"):
        reservation.submit(-1).result(0)
    assert reservation.submit(1).result(0).value == 2
    executor.close()
    with pytest.raises(BatcherClosedError):
        executor.reserve(1)
