"""FastAPI dependencies, as ``Annotated`` aliases so routes read like their signatures."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.metrics import ServiceMetrics
from app.pipeline import InferencePipeline
from app.service import ServiceState

# ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in its threadpool, a thread
# hop per request for what is a dictionary lookup.


async def get_service(request: Request) -> ServiceState:
    service: ServiceState = request.app.state.service
    return service


async def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


async def get_ready_pipeline(request: Request) -> InferencePipeline:
    """The inference pipeline; 503 ``not_ready`` (with the reason) until the model is verified."""
    service: ServiceState = request.app.state.service
    return service.require_pipeline()


ServiceDep = Annotated[ServiceState, Depends(get_service)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
PipelineDep = Annotated[InferencePipeline, Depends(get_ready_pipeline)]
