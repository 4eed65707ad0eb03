"""A lean closed-loop HTTP/1.1 load generator over raw keep-alive connections.

On a 2-core machine the client competes with the server for CPU, so it must cost as little as
possible: every request is encoded once up front and replayed byte for byte, each of the
``concurrency`` workers owns one keep-alive connection (asyncio streams on uvloop when present),
and a response is parsed only as far as its status line and Content-Length. No HTTP library,
no per-request allocation beyond the response bytes. Its CPU time is measured and reported so
the reader can judge what it took from the server.

Bounded by design: a level stops after ``total`` requests or ``max_seconds``, whichever comes
first, and requests still in flight after a grace period are cancelled and counted as errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

GRACE_SECONDS = 30.0  # after the time cap, how long in-flight requests may still finish


class ProtocolError(RuntimeError):
    """The response could not be framed (no Content-Length, bad status line)."""


NETWORK_ERRORS = (
    OSError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    ProtocolError,
    ValueError,
)


class Connection:
    """One keep-alive HTTP/1.1 connection that replays pre-encoded requests."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one encoded request and return (status, body); reconnects when needed."""
        if self._writer is None:
            await self.open()
        assert self._reader is not None
        assert self._writer is not None
        self._writer.write(raw)
        head = await self._reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 ") or len(head) < 12:
            raise ProtocolError(f"bad status line: {head[:40]!r}")
        status = int(head[9:12])
        lowered = head.lower()
        start = lowered.find(b"\r\ncontent-length:")
        if start < 0:
            raise ProtocolError("response without Content-Length")
        end = lowered.index(b"\r\n", start + 2)
        length = int(lowered[start + 17 : end])
        body = await self._reader.readexactly(length) if length else b""
        if b"\r\nconnection: close" in lowered:
            self.close()
        return status, body


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/mean/max in milliseconds (None when there is nothing to summarise)."""
    if not seconds:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "mean": round(float(values.mean()), 3),
        "max": round(float(values.max()), 3),
    }


@dataclass
class LevelResult:
    """What one closed-loop level measured."""

    concurrency: int
    requested: int
    completed: int = 0
    ok: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    throughput: float = 0.0  # successful responses per second
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    client_cpu_s: float = 0.0
    stopped_by: str = "count"  # "count" or "time"
    health: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.completed - self.ok

    def as_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requested": self.requested,
            "completed": self.completed,
            "ok": self.ok,
            "errors": self.errors,
            "statuses": self.statuses,
            "wall_s": round(self.wall_s, 3),
            "throughput": round(self.throughput, 2),
            "latency_ms": self.latency_ms,
            "client_cpu_s": round(self.client_cpu_s, 3),
            "client_cpu_ms_per_request": round(1000 * self.client_cpu_s / self.completed, 3)
            if self.completed
            else None,
            "stopped_by": self.stopped_by,
            "health": self.health,
            **self.extra,
        }


async def _health_sampler(
    host: str, port: int, raw: bytes, interval: float, stop: asyncio.Event
) -> dict[str, Any]:
    """GET /health every ``interval`` s on its own connection while the load runs."""
    connection = Connection(host, port)
    latencies: list[float] = []
    failures = 0
    try:
        await connection.open()
        while not stop.is_set():
            started = time.perf_counter()
            try:
                status, _ = await connection.request(raw)
            except NETWORK_ERRORS:
                connection.close()
                status = 0
            if status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    finally:
        connection.close()
    return {"samples": len(latencies), "failures": failures, **percentiles_ms(latencies)}


async def run_level(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    concurrency: int,
    total: int,
    max_seconds: float,
    warmup: int = 0,
    health_request: bytes | None = None,
    health_interval: float = 0.02,
    snapshot: Callable[[], Awaitable[dict[str, float]]] | None = None,
) -> LevelResult:
    """Closed loop: ``concurrency`` workers, each sends its next request when the last returns.

    Requests cycle through ``requests`` in order (a global counter), so every level sees the
    same image mix. ``warmup`` requests run first on the same connections and are not counted.
    ``snapshot`` (e.g. the server's CPU time and batch counters) is taken right before and right
    after the measured requests; both land in ``extra["snapshot_before"/"snapshot_after"]``.
    """
    connections = [Connection(host, port) for _ in range(concurrency)]
    await asyncio.gather(*(connection.open() for connection in connections))
    result = LevelResult(concurrency=concurrency, requested=total)
    try:
        if warmup:
            await _drive(
                connections, requests, warmup, time.perf_counter() + max_seconds, [], Counter()
            )
        stop = asyncio.Event()
        sampler = (
            asyncio.create_task(_health_sampler(host, port, health_request, health_interval, stop))
            if health_request is not None
            else None
        )
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        if snapshot is not None:
            result.extra["snapshot_before"] = await snapshot()
        cpu_before = time.process_time()
        started = time.perf_counter()
        stopped_by = await _drive(
            connections, requests, total, started + max_seconds, latencies, statuses
        )
        wall = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - cpu_before
        if snapshot is not None:
            result.extra["snapshot_after"] = await snapshot()
        stop.set()
        if sampler is not None:
            result.health = await sampler
    finally:
        for connection in connections:
            connection.close()
    result.completed = sum(statuses.values())
    result.ok = statuses.get("200", 0)
    result.statuses = dict(sorted(statuses.items()))
    result.wall_s = wall
    result.throughput = result.ok / wall if wall > 0 else 0.0
    result.latency_ms = percentiles_ms(latencies)
    result.stopped_by = stopped_by
    return result


async def _drive(
    connections: Sequence[Connection],
    requests: Sequence[bytes],
    total: int,
    deadline: float,
    latencies: list[float],
    statuses: Counter[str],
) -> str:
    counter = itertools.count()
    timed_out = False
    perf_counter = time.perf_counter
    count = len(requests)

    async def worker(connection: Connection) -> None:
        nonlocal timed_out
        while True:
            index = next(counter)
            if index >= total:
                return
            if perf_counter() > deadline:
                timed_out = True
                return
            started = perf_counter()
            try:
                status, _ = await connection.request(requests[index % count])
                key = str(status)
            except NETWORK_ERRORS as exc:
                connection.close()
                key = f"error:{type(exc).__name__}"
            latencies.append(perf_counter() - started)
            statuses[key] += 1

    tasks = [asyncio.create_task(worker(connection)) for connection in connections]
    budget = max(0.0, deadline - perf_counter()) + GRACE_SECONDS
    _, pending = await asyncio.wait(tasks, timeout=budget)
    for task in pending:
        task.cancel()
        statuses["error:timeout"] += 1
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return "time" if timed_out or pending else "count"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (cheaper per request), else the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run(coroutine_factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one client coroutine to completion on a fresh (uv)loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coroutine_factory())


async def fetch(host: str, port: int, raw: bytes) -> tuple[int, bytes]:
    """One request on a fresh connection (for /metrics, /model and parity checks)."""
    connection = Connection(host, port)
    try:
        return await connection.request(raw)
    finally:
        connection.close()
