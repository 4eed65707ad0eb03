"""Response schemas: the documented contract of the API (shown at /docs).

Routes build plain dicts and serialise them once (validating large payloads through pydantic on
every request would cost more than the model run); the API tests validate real responses
against these models, so the documentation cannot drift from the behaviour.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

EXAMPLE_REQUEST_ID = "3f2c9a0e6b1d4c7e8a5f0b9d2e4c6a81"
EXAMPLE_MODEL: dict[str, Any] = {
    "name": "ballscrew-pitting",
    "version": "20261203T141500Z",
    "sha256": "9b0c1f6a4e1d2c3b4a5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5",
}
EXAMPLE_TIMING: dict[str, Any] = {
    "decode_ms": 1.9,
    "preprocess_ms": 0.7,
    "queue_ms": 0.1,
    "inference_ms": 4.2,
    "batch_size": 1,
}


class ModelRef(BaseModel):
    name: str
    version: str
    sha256: str = Field(description="sha256 of the ONNX file actually loaded.")


class ImageSize(BaseModel):
    width: int = Field(description="Width of the EXIF-oriented original, pixels.")
    height: int


class Timing(BaseModel):
    decode_ms: float = Field(description="Decoding the upload (incl. EXIF orientation).")
    preprocess_ms: float = Field(description="Colour conversion and resize to the model input.")
    queue_ms: float = Field(description="Wait between preprocessing and the model run.")
    inference_ms: float = Field(description="The onnxruntime run (shared by its batch).")
    batch_size: int = Field(description="Images in the model run that served this one.")


class RequestTiming(Timing):
    total_ms: float = Field(description="Server time from first byte to response.")


class BoundingBox(BaseModel):
    x: int = Field(description="Left edge, original-image pixels.")
    y: int = Field(description="Top edge, original-image pixels.")
    width: int
    height: int


class Point(BaseModel):
    x: int
    y: int


class Grid(BaseModel):
    rows: int
    cols: int


class HeatmapResult(BaseModel):
    bbox: BoundingBox | None = Field(
        description="Box of the hottest connected region of hot cells (defect probability >= "
        "threshold and logit in the upper half of the image's range); null unless the verdict "
        "is defect."
    )
    area_fraction: float = Field(description="Share of the image covered by hot cells (0-1).")
    peak_probability: float = Field(description="Highest per-cell defect probability.")
    peak: Point = Field(description="Centre of the hottest cell, original-image pixels.")
    grid: Grid = Field(description="Heatmap resolution (cells).")
    threshold: float = Field(description="Per-cell threshold used (the decision threshold).")
    overlay_png_base64: str = Field(description="PNG: heatmap blended over the oriented image.")
    overlay_width: int
    overlay_height: int


class ItemPrediction(BaseModel):
    label: str = Field(description="Predicted class name.")
    defect_probability: float = Field(description="Calibrated probability of the defect class.")
    probabilities: dict[str, float] = Field(description="Calibrated probability per class.")
    image: ImageSize
    timing: Timing
    heatmap: HeatmapResult | None = Field(description="Present when heatmap=true.")


class PredictionResponse(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "request_id": EXAMPLE_REQUEST_ID,
                    "label": "defect",
                    "defect_probability": 0.973,
                    "probabilities": {"normal": 0.027, "defect": 0.973},
                    "threshold": 0.41,
                    "operating_point": "balanced",
                    "model": EXAMPLE_MODEL,
                    "image": {"width": 565, "height": 230},
                    "timing": {**EXAMPLE_TIMING, "total_ms": 8.1},
                    "heatmap": None,
                }
            ]
        },
    )

    request_id: str
    label: str
    defect_probability: float
    probabilities: dict[str, float]
    threshold: float = Field(description="Decision threshold used: defect if p >= threshold.")
    operating_point: str | None = Field(
        description="Card operating point that set the threshold; null for an explicit one."
    )
    model: ModelRef
    image: ImageSize
    timing: RequestTiming
    heatmap: HeatmapResult | None


class ItemError(BaseModel):
    code: str = Field(examples=["corrupt_image"])
    message: str
    status: int = Field(description="The HTTP status this error would have on /predict.")


class BatchItem(BaseModel):
    index: int = Field(description="Position of the file in the request.")
    filename: str | None
    ok: bool
    prediction: ItemPrediction | None
    error: ItemError | None


class BatchTiming(BaseModel):
    total_ms: float


class BatchResponse(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "request_id": EXAMPLE_REQUEST_ID,
                    "threshold": 0.41,
                    "operating_point": "balanced",
                    "model": EXAMPLE_MODEL,
                    "count": 2,
                    "succeeded": 1,
                    "failed": 1,
                    "timing": {"total_ms": 14.2},
                    "results": [
                        {
                            "index": 0,
                            "filename": "part-0001.jpg",
                            "ok": True,
                            "prediction": {
                                "label": "normal",
                                "defect_probability": 0.012,
                                "probabilities": {"normal": 0.988, "defect": 0.012},
                                "image": {"width": 565, "height": 230},
                                "timing": {**EXAMPLE_TIMING, "batch_size": 2},
                                "heatmap": None,
                            },
                            "error": None,
                        },
                        {
                            "index": 1,
                            "filename": "notes.txt",
                            "ok": False,
                            "prediction": None,
                            "error": {
                                "code": "unsupported_media_type",
                                "message": "content is not a supported image",
                                "status": 415,
                            },
                        },
                    ],
                }
            ]
        },
    )

    request_id: str
    threshold: float
    operating_point: str | None
    model: ModelRef
    count: int
    succeeded: int
    failed: int
    timing: BatchTiming
    results: list[BatchItem]


class HealthResponse(BaseModel):
    status: str = Field(examples=["ok"])


class ReadyResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    status: str = Field(examples=["ready"])
    model: ModelRef
    providers: list[str] = Field(examples=[["CPUExecutionProvider"]])


class ModelResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    status: str = Field(description="loading, ready or failed.")
    reason: str | None = Field(description="Why the service is not ready, if it is not.")
    provider_setting: str
    providers: list[str] = Field(description="Execution providers actually in use.")
    available_providers: list[str]
    intra_op_threads: int | None = Field(description="onnxruntime threads per model run.")
    inference_workers: int | None = Field(description="Model runs in parallel.")
    decode_threads: int | None
    batching: dict[str, Any]
    checks: dict[str, Any] = Field(description="Start-up checks: sha256, graph I/O, golden...")
    card: dict[str, Any] = Field(description="model_card.json, verbatim.")
