"""POST /predict and /predict/batch in-process, with the shipped model and real photos."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import AppClient, AppClientFactory, FixtureImage
from PIL import Image

from app.preprocessing import InputSpec, preprocess_bytes
from app.schemas import BatchResponse, PredictionResponse

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def client(app_client: AppClientFactory) -> AsyncIterator[AppClient]:
    async with app_client() as client:
        assert (await client.get("/ready")).status_code == 200
        yield client


@pytest.fixture(scope="module")
def card(shipped_model_dir: Path) -> dict[str, Any]:
    card: dict[str, Any] = json.loads((shipped_model_dir / "model_card.json").read_text())
    return card


def file_part(data: bytes, name: str = "part.jpg", content_type: str = "image/jpeg") -> Any:
    return {"file": (name, data, content_type)}


def raw_model_probabilities(model_dir: Path, card: dict[str, Any], data: bytes) -> np.ndarray:
    """What onnxruntime alone says about an image, with no service in between."""
    spec = InputSpec(
        width=card["input"]["width"],
        height=card["input"]["height"],
        color_mode=card["input"]["color_mode"],
    )
    session = ort.InferenceSession(
        str(model_dir / card["onnx"]["file"]), providers=["CPUExecutionProvider"]
    )
    (probabilities,) = session.run(
        [card["outputs"]["probabilities"]["name"]],
        {card["input"]["name"]: preprocess_bytes(data, spec)[np.newaxis]},
    )
    return np.asarray(probabilities[0])


def png_bytes(image: Image.Image, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


# --- single image -----------------------------------------------------------------------------


async def test_fixtures_get_their_true_labels(
    client: AppClient, images: list[FixtureImage], card: dict[str, Any], shipped_model_dir: Path
) -> None:
    default = card["default_operating_point"]
    model_sha = hashlib.sha256((shipped_model_dir / card["onnx"]["file"]).read_bytes()).hexdigest()
    for image in images:
        response = await client.post("/predict", files=file_part(image.data, image.path.name))
        assert response.status_code == 200, response.text
        body = response.json()
        PredictionResponse.model_validate(body)  # the documented schema is the real one
        assert body["label"] == image.label, (image.path.name, body["defect_probability"])
        assert body["operating_point"] == default
        assert body["threshold"] == card["operating_points"][default]["threshold"]
        assert body["model"] == {
            "name": card["name"],
            "version": card["version"],
            "sha256": model_sha,
        }
        assert body["request_id"] == response.headers["X-Request-ID"]
        assert set(body["probabilities"]) == set(card["class_names"])
        assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert body["defect_probability"] == body["probabilities"][card["defect_class"]]
        assert body["image"] == {"width": 565, "height": 230}
        assert body["heatmap"] is None
        timing = body["timing"]
        assert timing["batch_size"] >= 1
        assert all(timing[key] >= 0 for key in ("decode_ms", "preprocess_ms", "inference_ms"))
        assert timing["total_ms"] >= timing["inference_ms"]


async def test_service_probabilities_equal_a_raw_onnxruntime_run(
    client: AppClient, images: list[FixtureImage], card: dict[str, Any], shipped_model_dir: Path
) -> None:
    for image in images:
        body = (await client.post("/predict", files=file_part(image.data))).json()
        raw = raw_model_probabilities(shipped_model_dir, card, image.data)
        served = [body["probabilities"][name] for name in card["class_names"]]
        np.testing.assert_allclose(served, raw, rtol=0, atol=1e-6)


async def test_explicit_threshold_decides_the_label(
    client: AppClient, images: list[FixtureImage]
) -> None:
    data = images[0].data
    probability = (await client.post("/predict", files=file_part(data))).json()[
        "defect_probability"
    ]
    below = await client.post(
        "/predict", files=file_part(data), params={"threshold": max(0.0, probability - 1e-4)}
    )
    above = await client.post(
        "/predict", files=file_part(data), params={"threshold": min(1.0, probability + 1e-4)}
    )
    assert below.json()["label"] == "defect"
    assert below.json()["operating_point"] is None
    assert below.json()["threshold"] == pytest.approx(max(0.0, probability - 1e-4))
    if probability + 1e-4 <= 1.0:
        assert above.json()["label"] == "normal"
    zero = await client.post("/predict", files=file_part(data), params={"threshold": 0})
    assert zero.json()["label"] == "defect"  # p >= 0 always


async def test_every_operating_point_of_the_card(
    client: AppClient, images: list[FixtureImage], card: dict[str, Any]
) -> None:
    data = images[0].data
    for name, point in card["operating_points"].items():
        response = await client.post(
            "/predict", files=file_part(data), params={"operating_point": name}
        )
        assert response.status_code == 200
        body = response.json()
        assert body["operating_point"] == name
        assert body["threshold"] == point["threshold"]
        expected = "defect" if body["defect_probability"] >= point["threshold"] else "normal"
        assert body["label"] == expected


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"operating_point": "no-such-point"}, "unknown_operating_point"),
        ({"threshold": 0.5, "operating_point": "default"}, "conflicting_parameters"),
        ({"threshold": 1.5}, "validation_error"),
        ({"threshold": -0.1}, "validation_error"),
        ({"threshold": "abc"}, "validation_error"),
        ({"threshold": "nan"}, "validation_error"),
        ({"threshold": "inf"}, "validation_error"),
        ({"heatmap": "perhaps"}, "validation_error"),
        ({"operating_point": ""}, "validation_error"),
        ({"operating_point": "x" * 101}, "validation_error"),
    ],
)
async def test_bad_parameters_are_422(
    client: AppClient, images: list[FixtureImage], params: dict[str, Any], code: str
) -> None:
    response = await client.post("/predict", files=file_part(images[0].data), params=params)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["X-Request-ID"]


async def test_validation_errors_name_every_bad_field(
    client: AppClient, images: list[FixtureImage]
) -> None:
    response = await client.post(
        "/predict", files=file_part(images[0].data), params={"threshold": "x", "heatmap": "?"}
    )
    error = response.json()["error"]
    assert [detail["loc"] for detail in error["details"]] == [
        ["query", "threshold"],
        ["query", "heatmap"],
    ]
    assert "query.threshold" in error["message"]
    assert "query.heatmap" in error["message"]


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("YES", True), ("on", True), ("0", False), ("off", False)]
)
async def test_heatmap_flag_spellings(
    client: AppClient, images: list[FixtureImage], value: str, expected: bool
) -> None:
    response = await client.post(
        "/predict", files=file_part(images[0].data), params={"heatmap": value}
    )
    assert response.status_code == 200
    assert (response.json()["heatmap"] is not None) is expected


async def test_unknown_operating_point_lists_the_valid_ones(
    client: AppClient, images: list[FixtureImage], card: dict[str, Any]
) -> None:
    response = await client.post(
        "/predict", files=file_part(images[0].data), params={"operating_point": "x"}
    )
    assert response.json()["error"]["details"]["operating_points"] == sorted(
        card["operating_points"]
    )


async def test_heatmap_overlay_box_and_area(client: AppClient, images: list[FixtureImage]) -> None:
    for image in images:
        response = await client.post(
            "/predict", files=file_part(image.data), params={"heatmap": "true"}
        )
        assert response.status_code == 200
        body = response.json()
        PredictionResponse.model_validate(body)
        heatmap = body["heatmap"]
        overlay = Image.open(io.BytesIO(base64.b64decode(heatmap["overlay_png_base64"])))
        assert overlay.format == "PNG"
        assert overlay.size == (heatmap["overlay_width"], heatmap["overlay_height"]) == (565, 230)
        assert heatmap["threshold"] == body["threshold"]
        assert 0 <= heatmap["peak"]["x"] < 565
        assert 0 <= heatmap["peak"]["y"] < 230
        box = heatmap["bbox"]
        if body["label"] == "defect":
            assert box is not None  # a defect verdict always has a hot region
            assert 0 <= box["x"] < box["x"] + box["width"] <= 565
            assert 0 <= box["y"] < box["y"] + box["height"] <= 230
            assert 0 < heatmap["area_fraction"] <= 1
            assert heatmap["peak_probability"] >= body["threshold"]
            assert box["x"] <= heatmap["peak"]["x"] < box["x"] + box["width"]
            assert box["y"] <= heatmap["peak"]["y"] < box["y"] + box["height"]
        else:
            assert box is None
            assert heatmap["area_fraction"] == 0


def on_cell_grid(start: int, length: int, size: int, cells: int) -> bool:
    """Whether [start, start + length) is a run of whole cells of a ``size``-pixel side."""
    starts = {math.floor(cell * size / cells) for cell in range(cells)}
    ends = {min(size, math.ceil((cell + 1) * size / cells)) for cell in range(cells)}
    return start in starts and start + length in ends


async def test_heatmap_box_is_in_original_pixels_of_a_larger_upload(
    client: AppClient, images: list[FixtureImage]
) -> None:
    defect = next(image for image in images if image.label == "defect")
    large = Image.open(io.BytesIO(defect.data)).resize((1130, 460), Image.Resampling.BICUBIC)
    response = await client.post(
        "/predict",
        files=file_part(png_bytes(large), "large.png", "image/png"),
        params={"heatmap": "true"},
    )
    body = response.json()
    assert body["label"] == "defect"
    assert body["image"] == {"width": 1130, "height": 460}
    heatmap = body["heatmap"]
    box = heatmap["bbox"]
    rows, cols = heatmap["grid"]["rows"], heatmap["grid"]["cols"]
    # aligned to the heatmap cells as laid over the 1130x460 original, not the model input
    assert on_cell_grid(box["x"], box["width"], 1130, cols)
    assert on_cell_grid(box["y"], box["height"], 460, rows)
    assert box["x"] + box["width"] <= 1130
    assert heatmap["overlay_width"] == 1024  # capped by DEFECT_HEATMAP_MAX_SIDE
    assert heatmap["overlay_height"] == round(460 * 1024 / 1130)


async def test_exif_rotated_upload_is_judged_upright(
    client: AppClient, images: list[FixtureImage]
) -> None:
    upright = Image.open(io.BytesIO(images[0].data)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated 90 CCW; viewers rotate it back
    rotated = png_bytes(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    plain = (await client.post("/predict", files=file_part(png_bytes(upright)))).json()
    turned = (await client.post("/predict", files=file_part(rotated))).json()
    assert turned["image"] == {"width": 565, "height": 230}
    assert turned["probabilities"] == plain["probabilities"]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
async def test_uploads_in_any_pixel_mode_are_classified(
    client: AppClient, images: list[FixtureImage], mode: str
) -> None:
    photo = Image.open(io.BytesIO(images[0].data)).convert("RGB")
    if mode == "I;16":
        grey = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
        converted = Image.frombytes("I;16", photo.size, grey.astype("<u2").tobytes())
    else:
        converted = photo.convert(mode)
    buffer = io.BytesIO()
    converted.save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
    response = await client.post("/predict", files=file_part(buffer.getvalue(), "x", "image/x"))
    assert response.status_code == 200, response.text
    assert response.json()["label"] in ("normal", "defect")


async def test_content_type_header_is_not_trusted(
    client: AppClient, images: list[FixtureImage]
) -> None:
    response = await client.post(
        "/predict", files=file_part(images[0].data, "notes.txt", "text/plain")
    )
    assert response.status_code == 200
    assert response.json()["label"] == images[0].label


# --- batch ------------------------------------------------------------------------------------


async def test_batch_gives_each_item_its_own_result_or_error(
    client: AppClient, images: list[FixtureImage]
) -> None:
    truncated = images[0].data[: len(images[0].data) // 3]
    files = [("files", (image.path.name, image.data, "image/jpeg")) for image in images]
    files.insert(1, ("files", ("notes.txt", b"not an image", "text/plain")))
    files.append(("files", ("cut.jpg", truncated, "image/jpeg")))
    response = await client.post("/predict/batch", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    BatchResponse.model_validate(body)
    assert body["count"] == len(images) + 2
    assert body["succeeded"] == len(images)
    assert body["failed"] == 2
    results = body["results"]
    assert [item["index"] for item in results] == list(range(len(files)))
    assert results[1]["ok"] is False
    assert results[1]["error"]["code"] == "unsupported_media_type"
    assert results[1]["error"]["status"] == 415
    assert results[-1]["error"]["code"] == "corrupt_image"
    assert results[-1]["error"]["status"] == 400
    good = [item for item in results if item["ok"]]
    for item, image in zip(good, images, strict=True):
        assert item["filename"] == image.path.name
        assert item["prediction"]["label"] == image.label
        single = (await client.post("/predict", files=file_part(image.data))).json()
        # Same image, run in a batch vs alone: equal up to float rounding of the batched kernels.
        assert item["prediction"]["probabilities"] == pytest.approx(
            single["probabilities"], abs=1e-5
        )


async def test_batch_items_share_model_runs(
    app_client: AppClientFactory, images: list[FixtureImage]
) -> None:
    async with app_client(max_batch_wait_ms=1000, max_batch_size=8) as client:
        files = [("files", (image.path.name, image.data, "image/jpeg")) for image in images]
        body = (await client.post("/predict/batch", files=files)).json()
    sizes = [item["prediction"]["timing"]["batch_size"] for item in body["results"]]
    assert sizes == [len(images)] * len(images)


async def test_batch_with_heatmaps_and_an_operating_point(
    client: AppClient, images: list[FixtureImage], card: dict[str, Any]
) -> None:
    files = [("files", (image.path.name, image.data, "image/jpeg")) for image in images[:2]]
    name = sorted(card["operating_points"])[0]
    response = await client.post(
        "/predict/batch", files=files, params={"heatmap": "true", "operating_point": name}
    )
    body = response.json()
    assert body["operating_point"] == name
    assert body["threshold"] == card["operating_points"][name]["threshold"]
    assert all(item["prediction"]["heatmap"]["overlay_png_base64"] for item in body["results"])


async def test_batch_over_the_file_limit_is_422(
    app_client: AppClientFactory, images: list[FixtureImage]
) -> None:
    async with app_client(max_batch_files=2) as client:
        files = [("files", ("a.jpg", images[0].data, "image/jpeg"))] * 3
        response = await client.post("/predict/batch", files=files)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "too_many_files"
    assert error["details"] == {"max_files": 2, "received": 3}


async def test_batch_needs_the_files_field(client: AppClient, images: list[FixtureImage]) -> None:
    response = await client.post("/predict/batch", files=file_part(images[0].data))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"
    assert "files" in response.json()["error"]["message"]


async def test_batching_off_serves_the_same_answers(
    app_client: AppClientFactory, images: list[FixtureImage], client: AppClient
) -> None:
    async with app_client(batching=False) as direct:
        for image in images:
            off = (await direct.post("/predict", files=file_part(image.data))).json()
            on = (await client.post("/predict", files=file_part(image.data))).json()
            assert off["probabilities"] == on["probabilities"]
            assert off["timing"]["batch_size"] == 1
        files = [("files", (image.path.name, image.data, "image/jpeg")) for image in images]
        batch = (await direct.post("/predict/batch", files=files)).json()
        assert batch["succeeded"] == len(images)
