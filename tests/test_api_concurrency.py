"""Concurrency in-process: the event loop stays free, results never cross requests.

Decoding and the model are slowed down on purpose (sleeps that, like Pillow and onnxruntime,
release the GIL): if either ran on the event loop, /health would wait for it.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import numpy as np
import pytest
from conftest import AppClientFactory, FixtureImage

import app.inputs
from app.onnx_model import OnnxModel

pytestmark = pytest.mark.anyio

SLOW_MODEL_S = 0.25
SLOW_DECODE_S = 0.1


def slow_down(monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = OnnxModel.run
    real_prepare = app.inputs.prepare_image

    def slow_run(self: OnnxModel, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        time.sleep(SLOW_MODEL_S)
        return real_run(self, batch)

    def slow_prepare(*args: Any, **kwargs: Any) -> Any:
        time.sleep(SLOW_DECODE_S)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(OnnxModel, "run", slow_run)
    monkeypatch.setattr("app.pipeline.prepare_image", slow_prepare)


@pytest.mark.parametrize("batching", [True, False])
async def test_health_is_prompt_while_predict_is_saturated(
    app_client: AppClientFactory,
    images: list[FixtureImage],
    monkeypatch: pytest.MonkeyPatch,
    batching: bool,
) -> None:
    async with app_client(batching=batching, max_batch_size=2, decode_threads=2) as client:
        slow_down(monkeypatch)
        files = {"file": ("x.jpg", images[0].data, "image/jpeg")}
        predictions = [asyncio.create_task(client.post("/predict", files=files)) for _ in range(12)]
        await asyncio.sleep(0.05)
        latencies = []
        for _ in range(10):
            started = time.perf_counter()
            health = await client.get("/health")
            latencies.append(time.perf_counter() - started)
            assert health.status_code == 200
            await asyncio.sleep(0.02)
        still_running = sum(not task.done() for task in predictions)
        responses = await asyncio.gather(*predictions)
    assert still_running >= 6  # /health was measured while the model was saturated
    assert all(response.status_code == 200 for response in responses)
    # A single blocked model run or decode would take >= 100 ms.
    assert max(latencies) < 0.08, latencies


async def test_concurrent_requests_get_their_own_results(
    app_client: AppClientFactory, images: list[FixtureImage]
) -> None:
    async with app_client(max_batch_size=8, max_batch_wait_ms=20) as client:
        baseline = {}
        for image in images:
            body = (await client.post("/predict", files={"file": ("x", image.data, "i/j")})).json()
            baseline[image.path.name] = body["probabilities"]
        order = [image for image in images for _ in range(6)]
        random.Random(7).shuffle(order)

        async def send(image: FixtureImage) -> tuple[str, dict[str, Any]]:
            response = await client.post("/predict", files={"file": ("x", image.data, "i/j")})
            assert response.status_code == 200
            return image.path.name, response.json()

        results = await asyncio.gather(*(send(image) for image in order))
    batch_sizes = []
    for name, body in results:
        # Batch-mates share a run; mixing up results would differ by far more than this.
        assert body["probabilities"] == pytest.approx(baseline[name], abs=1e-5), name
        batch_sizes.append(body["timing"]["batch_size"])
    assert max(batch_sizes) > 1  # concurrent requests were coalesced


async def test_a_client_that_goes_away_does_not_leak_capacity(
    app_client: AppClientFactory, images: list[FixtureImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with app_client(max_queue=4, max_batch_files=4) as client:
        slow_down(monkeypatch)
        files = {"file": ("x.jpg", images[0].data, "image/jpeg")}
        abandoned = [asyncio.create_task(client.post("/predict", files=files)) for _ in range(4)]
        await asyncio.sleep(0.05)
        for task in abandoned:
            task.cancel()
        await asyncio.gather(*abandoned, return_exceptions=True)
        pipeline = client.app.state.service.pipeline
        for _ in range(100):  # the worker drains what was already queued
            if pipeline.executor.pending == 0:
                break
            await asyncio.sleep(0.05)
        assert pipeline.executor.pending == 0
        monkeypatch.undo()
        response = await client.post("/predict", files=files)
        assert response.status_code == 200


async def test_shutdown_while_an_image_decodes_is_503_not_500(
    app_client: AppClientFactory, images: list[FixtureImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with app_client(raise_app_exceptions=False) as client:
        pipeline = client.app.state.service.pipeline
        real_prepare = app.inputs.prepare_image

        def prepare_then_close(*args: Any, **kwargs: Any) -> Any:
            prepared = real_prepare(*args, **kwargs)
            pipeline.executor.close()  # the batcher stops before this image reaches it
            return prepared

        monkeypatch.setattr("app.pipeline.prepare_image", prepare_then_close)
        response = await client.post(
            "/predict", files={"file": ("x.jpg", images[0].data, "image/jpeg")}
        )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"


async def test_closing_the_pipeline_answers_every_accepted_image(
    app_client: AppClientFactory, images: list[FixtureImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown drains the decode queue into the batcher before the batcher stops."""
    async with app_client(decode_threads=1) as client:
        slow_down(monkeypatch)
        pipeline = client.app.state.service.pipeline
        files = {"file": ("x.jpg", images[0].data, "image/jpeg")}
        pending = [asyncio.create_task(client.post("/predict", files=files)) for _ in range(4)]
        for _ in range(200):  # all four admitted: one decoding, three queued behind it
            if pipeline.executor.pending == 4:
                break
            await asyncio.sleep(0.005)
        assert pipeline.executor.pending == 4
        await asyncio.to_thread(pipeline.close)
        responses = await asyncio.gather(*pending)
    assert [response.status_code for response in responses] == [200] * 4


async def test_a_request_admitted_as_the_pipeline_closes_is_503(
    app_client: AppClientFactory, images: list[FixtureImage]
) -> None:
    async with app_client(raise_app_exceptions=False) as client:
        pipeline = client.app.state.service.pipeline
        pipeline._workers.shutdown()  # the first step of closing; the batcher still admits
        response = await client.post(
            "/predict", files={"file": ("x.jpg", images[0].data, "image/jpeg")}
        )
        assert pipeline.executor.pending == 0  # its slot was given back
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"
