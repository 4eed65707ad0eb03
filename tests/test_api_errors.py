"""Every error status in the one error schema, and never a 500 for input."""

from __future__ import annotations

import asyncio
import random
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import AppClient, AppClientFactory, FixtureImage
from starlette.types import Message

from app.errors import ErrorResponse
from app.middleware import BodySizeLimitMiddleware

pytestmark = pytest.mark.anyio

INPUT_STATUSES = {200, 400, 413, 415, 422}


@pytest.fixture(scope="module")
async def client(app_client: AppClientFactory) -> AsyncIterator[AppClient]:
    async with app_client(max_body_bytes=256 * 1024, raise_app_exceptions=False) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    ErrorResponse.model_validate(body)
    error: dict[str, Any] = body["error"]
    assert error["code"] == code, error
    assert error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error


def bomb_png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(idat))
        + b"IDAT"
        + idat
        + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    )


@pytest.mark.parametrize(
    "data",
    [b"", b"plain text, no image", b"%PDF-1.7\n1 0 obj", b"\x00" * 4096, b"<svg/>"],
    ids=["empty", "text", "pdf", "zeros", "svg"],
)
async def test_not_an_image_is_415_even_with_an_image_content_type(
    client: AppClient, data: bytes
) -> None:
    response = await client.post("/predict", files={"file": ("x.jpg", data, "image/jpeg")})
    assert_error(response, 415, "unsupported_media_type")


async def test_truncated_image_is_400(client: AppClient, images: list[FixtureImage]) -> None:
    data = images[0].data[: len(images[0].data) // 2]
    response = await client.post("/predict", files={"file": ("x.jpg", data, "image/jpeg")})
    assert_error(response, 400, "corrupt_image")


async def test_image_signature_with_a_broken_header_is_400(client: AppClient) -> None:
    data = b"\x89PNG\r\n\x1a\n" + b"\xff" * 100
    response = await client.post("/predict", files={"file": ("x.png", data, "image/png")})
    assert_error(response, 400, "corrupt_image")


async def test_malformed_multipart_is_400(client: AppClient) -> None:
    response = await client.post(
        "/predict",
        content=b"--xyz\r\nthis is not a multipart body",
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize(("width", "height"), [(7000, 7000), (50000, 50000)])
async def test_decompression_bomb_is_422(client: AppClient, width: int, height: int) -> None:
    data = bomb_png(width, height)
    response = await client.post("/predict", files={"file": ("b.png", data, "image/png")})
    error = assert_error(response, 422, "image_too_large")
    assert "pixels" in error["message"] or "exceeds" in error["message"]


async def test_pixel_limit_is_a_setting(
    app_client: AppClientFactory, images: list[FixtureImage]
) -> None:
    async with app_client(max_image_pixels=100_000) as small:  # fixtures are 565x230 = 129,950
        response = await small.post(
            "/predict", files={"file": ("x.jpg", images[0].data, "image/jpeg")}
        )
    assert_error(response, 422, "image_too_large")


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"files": {"image": ("x.jpg", b"...", "image/jpeg")}},  # wrong field name
        {"data": {"file": "a plain text field, not a file"}},  # a field, not an upload
        {"json": {"file": "aGVsbG8="}},  # JSON instead of multipart
        {"content": b"\xff\xd8\xff raw bytes", "headers": {"Content-Type": "image/jpeg"}},
        {},  # no body at all
    ],
    ids=["wrong-field", "text-field", "json", "raw-body", "no-body"],
)
async def test_missing_file_is_422(client: AppClient, request_kwargs: dict[str, Any]) -> None:
    response = await client.post("/predict", **request_kwargs)
    error = assert_error(response, 422, "validation_error")
    assert any(detail["loc"][-1] == "file" for detail in error["details"])


async def test_body_over_the_limit_is_413_from_content_length(client: AppClient) -> None:
    data = b"\xff\xd8\xff" + b"\0" * (300 * 1024)
    response = await client.post("/predict", files={"file": ("big.jpg", data, "image/jpeg")})
    error = assert_error(response, 413, "payload_too_large")
    assert "262144" in error["message"]


async def test_streamed_body_over_the_limit_is_413(client: AppClient) -> None:
    boundary = "b0undary"

    async def body() -> AsyncIterator[bytes]:  # no Content-Length: chunked upload
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            'filename="big.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode()
        for _ in range(100):
            yield b"\0" * 8192
        yield f"\r\n--{boundary}--\r\n".encode()

    response = await client.post(
        "/predict",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")


async def test_body_limit_stops_reading_at_the_limit() -> None:
    """The middleware must not consume (buffer) a body past the limit."""
    chunks_read = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> Message:
        nonlocal chunks_read
        chunks_read += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}  # endless

    async def send(message: Message) -> None:
        sent.append(dict(message))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:  # an app that reads everything it is given
            await receive()

    middleware = BodySizeLimitMiddleware(app, max_body_bytes=10_000)
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
    await asyncio.wait_for(middleware(scope, receive, send), timeout=5)
    assert chunks_read == 11  # 11 * 1000 > 10000: stopped at the first chunk past the limit
    assert sent[0]["status"] == 413


async def test_body_limit_refuses_from_content_length_without_reading() -> None:
    reads = 0

    async def receive() -> Message:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not run")

    middleware = BodySizeLimitMiddleware(app, max_body_bytes=1000)
    headers = [(b"content-length", b"5000")]
    await middleware({"type": "http", "headers": headers}, receive, send)
    assert statuses == [413]
    assert reads == 0


async def test_queue_full_is_503_with_retry_after(
    app_client: AppClientFactory, images: list[FixtureImage]
) -> None:
    async with app_client(max_queue=2, max_batch_files=2, retry_after_s=3) as client:
        pipeline = client.app.state.service.pipeline
        held = pipeline.reserve(2)  # two images admitted and still decoding
        files = {"file": ("x.jpg", images[0].data, "image/jpeg")}
        try:
            response = await client.post("/predict", files=files)
            error = assert_error(response, 503, "queue_full")
            assert response.headers["Retry-After"] == "3"
            assert "retry after 3 s" in error["message"]
            batch = await client.post("/predict/batch", files=[("files", files["file"])])
            assert_error(batch, 503, "queue_full")
        finally:
            held.release()
        assert (await client.post("/predict", files=files)).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert "defect_queue_full_rejections_total 2.0" in metrics


async def test_not_ready_while_loading_is_503_with_retry_after(
    app_client: AppClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import app.model_loader

    release = threading.Event()
    real_load = app.model_loader.load_model

    def slow_load(settings: Any) -> Any:
        release.wait(10)
        return real_load(settings)

    monkeypatch.setattr("app.service.load_model", slow_load)
    from asgi_lifespan import LifespanManager
    from conftest import SHIPPED_MODEL_DIR

    from app.main import create_app
    from app.settings import Settings

    service_app = create_app(Settings(model_dir=SHIPPED_MODEL_DIR, warmup_runs=0))
    async with LifespanManager(service_app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/health")).status_code == 200  # alive while loading
            ready = await client.get("/ready")
            error = assert_error(ready, 503, "not_ready")
            assert "loading" in error["message"]
            assert ready.headers["Retry-After"] == "5"
            predict = await client.post("/predict", files={"file": ("x", b"x", "image/png")})
            assert_error(predict, 503, "not_ready")
            assert_error(await client.get("/model"), 503, "not_ready")
            release.set()
            await asyncio.wait_for(service_app.state.service.wait_loaded(), 30)
            assert (await client.get("/ready")).status_code == 200


async def test_unknown_path_and_wrong_method_use_the_schema(client: AppClient) -> None:
    assert_error(await client.get("/nope"), 404, "not_found")
    assert_error(await client.get("/predict"), 405, "method_not_allowed")


async def test_unexpected_server_errors_are_500_in_the_schema(
    client: AppClient, images: list[FixtureImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = client.app.state.service.pipeline

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(pipeline, "predict", broken)
    response = await client.post(
        "/predict",
        files={"file": ("x.jpg", images[0].data, "image/jpeg")},
        headers={"X-Request-ID": "bug-report-1"},
    )
    error = assert_error(response, 500, "internal_error")
    assert error["request_id"] == "bug-report-1"
    assert "a bug" not in error["message"]  # internals are logged, not leaked


async def test_fuzzed_uploads_never_cause_a_500(
    client: AppClient, images: list[FixtureImage]
) -> None:
    rng = random.Random(1234)
    seen: set[int] = set()
    for attempt in range(80):
        data = bytearray(images[attempt % len(images)].data)
        mutation = attempt % 4
        if mutation == 0:  # flip random bytes
            for _ in range(rng.randint(1, 40)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif mutation == 1:  # cut anywhere
            data = data[: rng.randrange(1, len(data))]
        elif mutation == 2:  # splice garbage into the middle
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 500))
        else:  # damage the header region
            for index in range(2, min(len(data), 2 + rng.randint(1, 200))):
                if rng.random() < 0.1:
                    data[index] = rng.randrange(256)
        response = await client.post(
            "/predict", files={"file": ("f.jpg", bytes(data), "image/jpeg")}
        )
        assert response.status_code in INPUT_STATUSES, (attempt, response.text)
        seen.add(response.status_code)
        if response.status_code != 200:
            ErrorResponse.model_validate(response.json())
    assert 400 in seen  # the fuzzing did reach the error paths


async def test_no_error_test_produced_a_500(client: AppClient) -> None:
    """Across this module's requests (one shared app) the server never answered 500 for input.

    The one deliberate 500 above comes from a patched pipeline, not from input.
    """
    metrics = (await client.get("/metrics")).text
    five_hundreds = [
        line
        for line in metrics.splitlines()
        if line.startswith("defect_http_requests_total") and 'status="500"' in line
    ]
    assert all(line.endswith(" 1.0") for line in five_hundreds), five_hundreds


# --- multipart edge cases (the service reads multipart itself, see app/multipart.py) ----------


def multipart_body(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> bytes:
    chunks = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        chunks.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


MULTIPART = {"Content-Type": "multipart/form-data; boundary=XyZ"}


async def test_two_files_on_predict_is_422(client: AppClient, images: list[FixtureImage]) -> None:
    body = multipart_body([("file", "a.jpg", images[0].data), ("file", "b.jpg", images[1].data)])
    response = await client.post("/predict", content=body, headers=MULTIPART)
    error = assert_error(response, 422, "validation_error")
    assert "exactly one file" in error["message"]


async def test_file_part_without_filename_is_accepted(
    client: AppClient, images: list[FixtureImage]
) -> None:
    body = multipart_body([("file", None, images[0].data)])  # like curl -F "file=<photo.jpg"
    response = await client.post("/predict", content=body, headers=MULTIPART)
    assert response.status_code == 200
    assert response.json()["label"] == images[0].label


async def test_other_form_fields_are_ignored(client: AppClient, images: list[FixtureImage]) -> None:
    body = multipart_body([("note", None, b"camera 3"), ("file", "a.jpg", images[0].data)])
    response = await client.post("/predict", content=body, headers=MULTIPART)
    assert response.status_code == 200


async def test_truncated_multipart_is_400(client: AppClient, images: list[FixtureImage]) -> None:
    body = multipart_body([("file", "a.jpg", images[0].data)])
    response = await client.post("/predict", content=body[:-40], headers=MULTIPART)
    error = assert_error(response, 400, "bad_request")
    assert "truncated" in error["message"]


async def test_multipart_without_boundary_is_400(client: AppClient) -> None:
    response = await client.post(
        "/predict", content=b"abc", headers={"Content-Type": "multipart/form-data"}
    )
    assert_error(response, 400, "bad_request")


async def test_part_without_a_name_is_400(client: AppClient) -> None:
    body = b'--XyZ\r\nContent-Disposition: form-data; filename="a.jpg"\r\n\r\nxx\r\n--XyZ--\r\n'
    response = await client.post("/predict", content=body, headers=MULTIPART)
    assert_error(response, 400, "bad_request")


async def test_oversized_part_headers_are_400(client: AppClient) -> None:
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"\r\nX-Padding: '
        + b"a" * 20_000
        + b"\r\n\r\nxx\r\n--XyZ--\r\n"
    )
    response = await client.post("/predict", content=body, headers=MULTIPART)
    assert_error(response, 400, "bad_request")


async def test_batch_stops_reading_parts_beyond_the_limit(
    app_client: AppClientFactory, images: list[FixtureImage]
) -> None:
    async with app_client(max_batch_files=2) as small:
        many_fields = multipart_body([("junk", None, b"x")] * 40)
        response = await small.post("/predict/batch", content=many_fields, headers=MULTIPART)
        error = assert_error(response, 422, "too_many_files")
        assert "DEFECT_MAX_BATCH_FILES" in error["message"]


async def test_non_ascii_filenames_are_echoed(
    client: AppClient, images: list[FixtureImage]
) -> None:
    body = multipart_body([("files", "prüfteil-ü.jpg", images[0].data)])
    response = await client.post("/predict/batch", content=body, headers=MULTIPART)
    assert response.json()["results"][0]["filename"] == "prüfteil-ü.jpg"
