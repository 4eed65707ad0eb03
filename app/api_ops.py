"""Operational endpoints: liveness, readiness, model description, Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.dependencies import MetricsDep, ServiceDep
from app.errors import COMMON_ERROR_RESPONSES, ErrorResponse, error_body
from app.schemas import HealthResponse, ModelResponse, ReadyResponse

router = APIRouter(tags=["operations"])

_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorResponse,
        "description": "Not ready: loading, or a start-up check failed (the message says which).",
        "content": {
            "application/json": {
                "example": error_body(
                    "not_ready",
                    "model not ready: sha256 mismatch: model.onnx hashes to 1f..., the card "
                    "says 9b...",
                    "3f2c9a0e6b1d4c7e8a5f0b9d2e4c6a81",
                    {"status": "failed"},
                )
            }
        },
    },
    **COMMON_ERROR_RESPONSES,
}


@router.get(
    "/health",
    response_model=HealthResponse,
    summary="Liveness: the process is up",
    description="Always 200 while the event loop runs, even when the model failed to load "
    "(use /ready for that). Stays fast while /predict is saturated.",
)
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses=_NOT_READY,
    summary="Readiness: model loaded, warmed up and golden samples reproduced",
)
async def ready(service: ServiceDep) -> dict[str, Any]:
    pipeline = service.require_pipeline()
    return {
        "status": "ready",
        "model": pipeline.model_info,
        "providers": pipeline.model.providers,
    }


@router.get(
    "/model",
    response_model=ModelResponse,
    responses=_NOT_READY,
    summary="The model card and the execution providers actually in use",
    description="200 whenever a card could be read (also when a later check failed: status "
    "and reason say so); 503 while loading or when no card is readable.",
)
async def model(service: ServiceDep) -> dict[str, Any]:
    outcome = service.outcome
    if outcome is None or outcome.raw_card is None:
        service.require_pipeline()  # raises the 503 with the reason
    assert outcome is not None
    assert outcome.raw_card is not None
    return {**service.describe(), "card": outcome.raw_card}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Text exposition."}},
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
