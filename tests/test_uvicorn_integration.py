"""Integration: a real ``defect-serve`` (uvicorn) process on a free loopback port.

Bounded by construction: a fixed number of requests, timeouts on every call, and the server is
stopped (SIGTERM, then SIGKILL) when the module ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, FixtureImage

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.anyio]

MAX_BODY_BYTES = 512 * 1024
START_TIMEOUT_S = 60.0


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                lines.append(json.loads(raw))
        return lines


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(base_url=server.base_url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                pytest.fail(f"server exited early:\n{server.log_path.read_text()[-3000:]}")
            try:
                if client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    pytest.fail(f"server not ready in {START_TIMEOUT_S} s:\n{server.log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(shipped_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_loopback_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "DEFECT_MODEL_DIR": str(shipped_model_dir),
        "DEFECT_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "DEFECT_BATCH_AUTOTUNE": "false",  # so that concurrent requests are coalesced
        "DEFECT_LOG_LEVEL": "INFO",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_until_ready(server)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30, limits=limits) as client:
        yield client


def upload(image: FixtureImage) -> dict[str, Any]:
    return {"file": (image.path.name, image.data, "image/jpeg")}


async def test_operational_endpoints(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = (await client.get("/ready")).json()
    assert ready["status"] == "ready"
    model = (await client.get("/model")).json()
    assert model["providers"] == ["CPUExecutionProvider"]
    assert "defect_model_ready 1.0" in (await client.get("/metrics")).text
    assert (await client.get("/docs")).status_code == 200


async def test_predictions_over_http(client: httpx.AsyncClient, images: list[FixtureImage]) -> None:
    for image in images:
        response = await client.post(
            "/predict", files=upload(image), headers={"X-Request-ID": f"it-{image.path.stem}"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["label"] == image.label
        assert response.headers["X-Request-ID"] == f"it-{image.path.stem}"
    files = [("files", (i.path.name, i.data, "image/jpeg")) for i in images]
    batch = (await client.post("/predict/batch", files=files)).json()
    assert [item["prediction"]["label"] for item in batch["results"]] == [i.label for i in images]


async def test_concurrent_requests(client: httpx.AsyncClient, images: list[FixtureImage]) -> None:
    semaphore = asyncio.Semaphore(32)

    async def one(index: int) -> tuple[FixtureImage, httpx.Response]:
        image = images[index % len(images)]
        async with semaphore:
            return image, await client.post("/predict", files=upload(image))

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(96))), timeout=120)
    statuses = [response.status_code for _, response in results]
    assert statuses == [200] * len(results)
    for image, response in results:
        assert response.json()["label"] == image.label
    assert max(response.json()["timing"]["batch_size"] for _, response in results) > 1


async def test_health_stays_fast_under_predict_load(
    client: httpx.AsyncClient, images: list[FixtureImage]
) -> None:
    concurrency, total = 24, 240
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(total):
        queue.put_nowait(index)
    predict_latencies: list[float] = []
    statuses: list[int] = []

    async def load_worker() -> None:
        while True:
            try:
                index = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            started = time.perf_counter()
            response = await client.post("/predict", files=upload(images[index % len(images)]))
            predict_latencies.append(time.perf_counter() - started)
            statuses.append(response.status_code)

    workers = [asyncio.create_task(load_worker()) for _ in range(concurrency)]
    await asyncio.sleep(0.3)  # let the load build up
    health_latencies = []
    while not queue.empty():
        started = time.perf_counter()
        health = await client.get("/health")
        health_latencies.append(time.perf_counter() - started)
        assert health.status_code == 200
        await asyncio.sleep(0.02)
    await asyncio.wait_for(asyncio.gather(*workers), timeout=120)
    assert statuses == [200] * total
    assert len(health_latencies) >= 5, "the load finished before /health was probed"
    # /health waits for no model run or decode: it stays far below a loaded /predict.
    assert statistics.median(health_latencies) < statistics.median(predict_latencies) / 4
    assert max(health_latencies) < 1.0, max(health_latencies)


async def test_body_limit_over_real_http(client: httpx.AsyncClient) -> None:
    too_big = {"file": ("big.jpg", b"\xff\xd8\xff" + b"\0" * (MAX_BODY_BYTES + 1), "image/jpeg")}
    response = await client.post("/predict", files=too_big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        for _ in range(2 * MAX_BODY_BYTES // 65536):
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    streamed = await client.post(
        "/predict", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert streamed.status_code == 413
    assert streamed.json()["error"]["code"] == "payload_too_large"
    assert (await client.get("/health")).status_code == 200  # the server shrugged it off


async def test_bad_inputs_over_real_http(
    client: httpx.AsyncClient, images: list[FixtureImage]
) -> None:
    cases = {
        415: b"definitely not an image",
        400: images[0].data[:5000],
    }
    for status, data in cases.items():
        response = await client.post("/predict", files={"file": ("x.jpg", data, "image/jpeg")})
        assert response.status_code == status
    missing = await client.post("/predict", files={"wrong": ("x.jpg", b"x", "image/jpeg")})
    assert missing.status_code == 422


async def test_json_access_log_lines(server: Server, client: httpx.AsyncClient) -> None:
    await client.get("/health", headers={"X-Request-ID": "log-check-42"})
    for _ in range(50):
        lines = [line for line in server.log_lines() if line.get("request_id") == "log-check-42"]
        if lines:
            break
        await asyncio.sleep(0.05)
    (line,) = lines
    assert line["route"] == "/health"
    assert line["status"] == 200
    assert line["logger"] == "defect.access"
    assert line["latency_ms"] >= 0
    assert any(entry.get("msg") == "model ready" for entry in server.log_lines())


def test_graceful_shutdown(shipped_model_dir: Path, tmp_path: Path) -> None:
    port = free_loopback_port()
    log_path = tmp_path / "server.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DEFECT_MODEL_DIR": str(shipped_model_dir),
        "DEFECT_PORT": str(port),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli"], cwd=REPO, env=env, stdout=log, stderr=log
        )
    try:
        wait_until_ready(Server(f"http://127.0.0.1:{port}", process, log_path))
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert process.wait(timeout=15) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
