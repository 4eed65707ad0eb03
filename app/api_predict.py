"""POST /predict and POST /predict/batch."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.dependencies import PipelineDep
from app.errors import PREDICT_ERROR_RESPONSES, ApiError, image_error_status
from app.multipart import Part, TooManyFilesError, read_files
from app.pipeline import InferencePipeline, PredictOptions, Reservation
from app.predict_params import OPENAPI_PARAMETERS, PredictQueryDep
from app.preprocessing import ImageError
from app.request_context import annotate, context_of, require_request_id
from app.schemas import BatchResponse, PredictionResponse

router = APIRouter(tags=["prediction"])

IMAGE_TYPES = "JPEG, PNG, BMP, TIFF, WebP or GIF, decided by content"


def _multipart_body(field_name: str, description: str, many: bool) -> dict[str, Any]:
    """OpenAPI request body for the lean multipart reader (FastAPI cannot infer it)."""
    binary: dict[str, Any] = {"type": "string", "format": "binary", "description": description}
    schema = {"type": "array", "items": binary} if many else binary
    return {
        "parameters": OPENAPI_PARAMETERS,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [field_name],
                        "properties": {field_name: schema},
                    }
                }
            },
        },
    }


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
    openapi_extra=_multipart_body("file", "The part photo (" + IMAGE_TYPES + ").", many=False),
)
async def predict(request: Request, pipeline: PipelineDep, query: PredictQueryDep) -> Response:
    options = pipeline.resolve_options(query.threshold, query.operating_point, query.heatmap)
    try:
        files = await read_files(request, "file", max_files=1)
    except TooManyFilesError as exc:
        raise ApiError(
            422,
            "validation_error",
            "send exactly one file in field 'file' (/predict/batch takes several)",
            details=exc.details,
        ) from exc
    reservation = pipeline.reserve(1)
    try:
        result = await pipeline.predict(files[0].data, reservation, options)
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
    upload: Part,
    reservation: Reservation,
    options: PredictOptions,
) -> dict[str, Any]:
    item: dict[str, Any] = {"index": index, "filename": upload.filename, "ok": False}
    try:
        item["prediction"] = await pipeline.predict(upload.data, reservation, options)
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
    openapi_extra=_multipart_body("files", "The part photos (" + IMAGE_TYPES + ").", many=True),
)
async def predict_batch(
    request: Request, pipeline: PipelineDep, query: PredictQueryDep
) -> Response:
    options = pipeline.resolve_options(query.threshold, query.operating_point, query.heatmap)
    limit = pipeline.settings.max_batch_files
    try:
        files = await read_files(request, "files", max_files=limit)
    except TooManyFilesError as exc:
        exc.message += " (DEFECT_MAX_BATCH_FILES)"
        raise
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
