"""Application factory: ``uvicorn app.main:create_app --factory``.

A factory (not a module-level app) so that importing this module has no side effects, and tests
and benchmarks can build apps with their own settings in one process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from PIL import Image

from app import __doc__ as package_doc
from app.api_ops import router as ops_router
from app.api_predict import router as predict_router
from app.errors import install_error_handlers
from app.logging_config import configure_logging
from app.metrics import ServiceMetrics
from app.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from app.service import ServiceState
from app.settings import Settings

API_VERSION = "1.0.0"

DESCRIPTION = """
Upload a part photo, get a verdict (**normal** or **defect**) with its calibrated probability,
the threshold and operating point that decided it, the model that said so, timings, and, on
request, a heatmap overlay with the box of the hottest region.

**Errors** always have the body `{"error": {"code", "message", "request_id", "details"}}`;
branch on `code`. Send `X-Request-ID` to correlate logs; it is echoed on every response.

**Operations**: `/health` (liveness), `/ready` (model verified), `/model` (card + providers),
`/metrics` (Prometheus).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. The model loads in the background once the lifespan starts."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    # decode_image enforces our own pixel limit; keep Pillow's bomb guard from firing first.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, settings.max_image_pixels)
    metrics = ServiceMetrics()
    service = ServiceState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="Defect inspection API",
        version=API_VERSION,
        summary=(package_doc or "").strip().splitlines()[0],
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = service
    install_error_handlers(app)
    app.include_router(predict_router)
    app.include_router(ops_router)
    # Added last = outermost: the request context wraps the body limit, so a 413 is logged.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
