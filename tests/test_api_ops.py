"""/health, /ready, /model, /metrics, /docs, request ids and the JSON access log."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AppClient, AppClientFactory, FixtureImage

from app.logging_config import JsonFormatter
from app.schemas import HealthResponse, ModelResponse, ReadyResponse

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def client(app_client: AppClientFactory) -> AsyncIterator[AppClient]:
    async with app_client() as client:
        yield client


@pytest.fixture
def access_log() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    logger = logging.getLogger("defect.access")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def metric_value(text: str, metric: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(metric + "{") and not line.startswith(metric + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {metric} {labels}")


async def test_health(client: AppClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert HealthResponse.model_validate(response.json()).status == "ok"


async def test_ready_names_the_verified_model(client: AppClient, shipped_model_dir: Path) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    body = ReadyResponse.model_validate(response.json())
    card = json.loads((shipped_model_dir / "model_card.json").read_text())
    digest = hashlib.sha256((shipped_model_dir / card["onnx"]["file"]).read_bytes()).hexdigest()
    assert body.model.sha256 == digest == card["onnx"]["sha256"]
    assert body.providers[0] == "CPUExecutionProvider"


async def test_model_shows_the_card_providers_and_checks(
    client: AppClient, shipped_model_dir: Path
) -> None:
    response = await client.get("/model")
    assert response.status_code == 200
    body = response.json()
    ModelResponse.model_validate(body)
    assert body["card"] == json.loads((shipped_model_dir / "model_card.json").read_text())
    assert body["status"] == "ready"
    assert body["reason"] is None
    assert body["provider_setting"] == "auto"
    assert body["providers"] == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in body["available_providers"]
    assert body["checks"]["golden_samples"]["ok"] is True
    assert body["checks"]["sha256"]["sha256"] == body["card"]["onnx"]["sha256"]
    assert body["batching"]["enabled"] is True


async def test_metrics_count_requests_predictions_and_batches(
    client: AppClient, images: list[FixtureImage]
) -> None:
    before = (await client.get("/metrics")).text
    for image in images:
        await client.post("/predict", files={"file": ("x.jpg", image.data, "image/jpeg")})
    await client.post("/predict", files={"file": ("x.jpg", b"nope", "image/jpeg")})
    await client.get("/no/such/route")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text

    def delta(metric: str, **labels: str) -> float:
        try:
            old = metric_value(before, metric, **labels)
        except AssertionError:
            old = 0.0
        return metric_value(text, metric, **labels) - old

    assert delta("defect_http_requests_total", route="/predict", status="200") == len(images)
    assert delta("defect_http_requests_total", route="/predict", status="415") == 1
    assert delta("defect_http_requests_total", route="unmatched", status="404") == 1
    assert delta("defect_http_request_duration_seconds_count", route="/predict") == len(images) + 1
    labels = {image.label for image in images}
    assert sum(delta("defect_predictions_total", label=label) for label in labels) == len(images)
    assert delta("defect_image_errors_total", code="unsupported_media_type") == 1
    assert delta("defect_inference_batch_size_count") >= 1
    assert delta("defect_inference_queue_wait_seconds_count") == len(images)
    assert delta("defect_inference_duration_seconds_count") >= 1
    card = client.app.state.service.pipeline.card
    assert (
        metric_value(
            text,
            "defect_model_info",
            name=card.name,
            version=card.version,
            provider="CPUExecutionProvider",
        )
        == 1.0
    )
    assert metric_value(text, "defect_model_ready") == 1.0
    assert metric_value(text, "defect_inference_pending_images") == 0.0


async def test_openapi_declares_every_error_and_examples(client: AppClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    spec = (await client.get("/openapi.json")).json()
    for path in ("/predict", "/predict/batch"):
        operation = spec["paths"][path]["post"]
        responses = operation["responses"]
        assert {"200", "400", "413", "415", "422", "503", "500"} <= set(responses)
        for status in ("400", "413", "415", "422", "503"):
            content = responses[status]["content"]["application/json"]
            assert content["schema"]["$ref"].endswith("/ErrorResponse")
            assert content["example"]["error"]["code"]
        parameters = {param["name"] for param in operation["parameters"]}
        assert parameters == {"threshold", "operating_point", "heatmap"}
        body = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
        field = "file" if path == "/predict" else "files"
        assert body["required"] == [field]
        assert field in body["properties"]
    assert "503" in spec["paths"]["/ready"]["get"]["responses"]
    schemas = spec["components"]["schemas"]
    assert schemas["PredictionResponse"]["examples"]
    assert schemas["BatchResponse"]["examples"]


async def test_request_id_is_honoured_and_echoed(client: AppClient) -> None:
    response = await client.get("/health", headers={"X-Request-ID": "line-7:cam-2.0042"})
    assert response.headers["X-Request-ID"] == "line-7:cam-2.0042"
    minted = await client.get("/health")
    assert re.fullmatch(r"[0-9a-f]{32}", minted.headers["X-Request-ID"])


@pytest.mark.parametrize("unsafe", ["has space", "x" * 200, 'quote"s', "ünïcode"])
async def test_unsafe_request_ids_are_replaced(client: AppClient, unsafe: str) -> None:
    response = await client.get("/health", headers={b"X-Request-ID": unsafe.encode("utf-8")})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


async def test_one_json_access_line_per_request(
    client: AppClient, images: list[FixtureImage], access_log: list[logging.LogRecord]
) -> None:
    await client.post(
        "/predict",
        files={"file": ("x.jpg", images[0].data, "image/jpeg")},
        headers={"X-Request-ID": "req-log-1"},
    )
    await client.post(
        "/predict", files={"file": ("x.jpg", b"bad", "image/jpeg")}, headers={"X-Request-ID": "r2"}
    )
    lines: list[dict[str, Any]] = [json.loads(JsonFormatter().format(r)) for r in access_log]
    assert len(lines) == 2
    ok, bad = lines
    assert ok["request_id"] == "req-log-1"
    assert ok["route"] == "/predict"
    assert ok["method"] == "POST"
    assert ok["status"] == 200
    assert ok["label"] == images[0].label
    assert ok["latency_ms"] > 0
    assert ok["level"] == "info"
    assert bad["status"] == 415
    assert bad["error"] == "unsupported_media_type"


async def test_batch_access_line_summarises_labels(
    client: AppClient, images: list[FixtureImage], access_log: list[logging.LogRecord]
) -> None:
    files = [("files", (i.path.name, i.data, "image/jpeg")) for i in images]
    await client.post("/predict/batch", files=files)
    (line,) = [json.loads(JsonFormatter().format(r)) for r in access_log]
    assert line["route"] == "/predict/batch"
    assert line["items"] == len(images)
    assert line["failed"] == 0
    assert sum(line["labels"].values()) == len(images)
