"""POST /predict and POST /predict/batch."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Annotated, Any

from fastapi import APIRouter, File, Query, Request, UploadFile
from starlette.responses import Response

from app.dependencies import PipelineDep
from app.errors import PREDICT_ERROR_RESPONSES, ApiError, image_error_status
from app.pipeline import InferencePipeline, PredictOptions, Reservation
from app.preprocessing import ImageError
from app.request_context import annotate, context_of, require_request_id
from app.schemas import BatchResponse, PredictionResponse

router = APIRouter(tags=["prediction"])

ThresholdQuery = Annotated[
    float | None,
    Query(
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Decision threshold on the defect probability (defect if p >= threshold). "
        "Mutually exclusive with operating_point.",
        examples=[0.5],
    ),
]
OperatingPointQuery = Annotated[
    str | None,
    Query(
        max_length=100,
        description="Named operating point from the model card (e.g. balanced, high_recall, "
        "default); GET /model lists them. Default: the card's default_operating_point.",
        examples=["high_recall"],
    ),
]
HeatmapQuery = Annotated[
    bool,
    Query(
        description="Add the defect heatmap: a PNG overlay (base64), the box of the hottest "
        "region in original-image pixels, and the defect area fraction."
    ),
]

IMAGE_TYPES = "JPEG, PNG, BMP, TIFF, WebP or GIF, decided by content"


def json_response(payload: dict[str, Any], status_code: int = 200) -> Response:
    """Serialise once with the C JSON encoder; no response-model re-validation."""
    return Response(
        json.dumps(payload, allow_nan=False).encode(),
        status_code=status_code,
        media_type="application/json",
    )


def _elapsed_ms(request: Request) -> float:
    context = context_of(request.scope)
    started = context.started if context is not None else time.perf_counter()
    return round((time.perf_counter() - started) * 1000.0, 3)


@router.post(
    "/predict",
    response_model=PredictionResponse,
    responses=PREDICT_ERROR_RESPONSES,
    summary="Classify one part photo",
    description="Upload one image as multipart/form-data field `file` (" + IMAGE_TYPES + "). "
    "The verdict uses the threshold of the chosen operating point (or an explicit threshold).",
)
async def predict(
    request: Request,
    file: Annotated[UploadFile, File(description="The part photo (" + IMAGE_TYPES + ").")],
    pipeline: PipelineDep,
    threshold: ThresholdQuery = None,
    operating_point: OperatingPointQuery = None,
    heatmap: HeatmapQuery = False,
) -> Response:
    options = pipeline.resolve_options(threshold, operating_point, heatmap)
    data = await file.read()
    reservation = pipeline.reserve(1)
    try:
        result = await pipeline.predict(data, reservation, options)
    except ImageError as exc:
        pipeline.metrics.item_errors.labels(exc.code).inc()
        annotate(request.scope, error=exc.code)
        raise
    finally:
        reservation.release()
    annotate(request.scope, label=result["label"])
    timing = result["timing"]
    timing["total_ms"] = _elapsed_ms(request)
    return json_response(
        {
            "request_id": require_request_id(request.scope),
            "label": result["label"],
            "defect_probability": result["defect_probability"],
            "probabilities": result["probabilities"],
            "threshold": options.threshold,
            "operating_point": options.operating_point,
            "model": pipeline.model_info,
            "image": result["image"],
            "timing": timing,
            "heatmap": result["heatmap"],
        }
    )


async def _batch_item(
    pipeline: InferencePipeline,
    index: int,
    upload: UploadFile,
    reservation: Reservation,
    options: PredictOptions,
) -> dict[str, Any]:
    item: dict[str, Any] = {"index": index, "filename": upload.filename, "ok": False}
    try:
        data = await upload.read()
        item["prediction"] = await pipeline.predict(data, reservation, options)
    except ImageError as exc:
        pipeline.metrics.item_errors.labels(exc.code).inc()
        item["prediction"] = None
        item["error"] = {"code": exc.code, "message": str(exc), "status": image_error_status(exc)}
        return item
    except ApiError as exc:
        item["prediction"] = None
        item["error"] = {"code": exc.code, "message": exc.message, "status": exc.status_code}
        return item
    item["ok"] = True
    item["error"] = None
    return item


@router.post(
    "/predict/batch",
    response_model=BatchResponse,
    responses=PREDICT_ERROR_RESPONSES,
    summary="Classify several part photos in one request",
    description="Upload images as repeated multipart/form-data field `files`. Each item gets "
    "its own result or its own error (with the status it would have on /predict); one bad "
    "file does not fail the others, and the response is 200 as long as the request itself is "
    "valid. At most DEFECT_MAX_BATCH_FILES files.",
)
async def predict_batch(
    request: Request,
    files: Annotated[list[UploadFile], File(description="The part photos.")],
    pipeline: PipelineDep,
    threshold: ThresholdQuery = None,
    operating_point: OperatingPointQuery = None,
    heatmap: HeatmapQuery = False,
) -> Response:
    options = pipeline.resolve_options(threshold, operating_point, heatmap)
    limit = pipeline.settings.max_batch_files
    if len(files) > limit:
        raise ApiError(
            422,
            "too_many_files",
            f"{len(files)} files sent, at most {limit} per request (DEFECT_MAX_BATCH_FILES)",
            details={"max_files": limit, "received": len(files)},
        )
    reservation = pipeline.reserve(len(files))
    try:
        items = await asyncio.gather(
            *(
                _batch_item(pipeline, index, upload, reservation, options)
                for index, upload in enumerate(files)
            )
        )
    finally:
        reservation.release()
    succeeded = sum(1 for item in items if item["ok"])
    labels = Counter(item["prediction"]["label"] for item in items if item["ok"])
    annotate(request.scope, items=len(items), failed=len(items) - succeeded, labels=dict(labels))
    return json_response(
        {
            "request_id": require_request_id(request.scope),
            "threshold": options.threshold,
            "operating_point": options.operating_point,
            "model": pipeline.model_info,
            "count": len(items),
            "succeeded": succeeded,
            "failed": len(items) - succeeded,
            "timing": {"total_ms": _elapsed_ms(request)},
            "results": items,
        }
    )
