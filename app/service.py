"""The service's lifecycle: loading -> ready | failed, and shutdown.

Loading runs in a worker thread started by the lifespan, so the process answers ``/health`` (and
``/ready`` with "loading") from its first second, and a model that fails to load leaves a live
process that says why instead of a crash loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

import anyio
import onnxruntime as ort

from app.errors import ApiError
from app.metrics import ServiceMetrics
from app.model_loader import LoadOutcome, load_model
from app.pipeline import InferencePipeline
from app.settings import Settings

logger = logging.getLogger("defect.service")

Status = Literal["loading", "ready", "failed"]


class ServiceState:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.status: Status = "loading"
        self.reason: str | None = "the model is loading"
        self.outcome: LoadOutcome | None = None
        self.pipeline: InferencePipeline | None = None
        self._task: asyncio.Task[None] | None = None
        metrics.ready.set(0)

    def start(self) -> None:
        """Begin loading in the background (called from the lifespan)."""
        self._task = asyncio.get_running_loop().create_task(self._load(), name="model-load")

    async def wait_loaded(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _load(self) -> None:
        logger.info("loading model", extra={"fields": {"model_dir": str(self.settings.model_dir)}})
        outcome = await anyio.to_thread.run_sync(load_model, self.settings)
        self.outcome = outcome
        if outcome.model is not None:  # also when a later check failed: shows the fallback
            model = outcome.model
            self.metrics.model_info.labels(
                model.card.name, model.card.version, model.sha256, model.providers[0]
            ).set(1)
        if outcome.failure is not None or outcome.model is None:
            self.status = "failed"
            self.reason = outcome.failure or "model loading failed"
            logger.error(
                "model not ready",
                extra={"fields": {"reason": self.reason, "seconds": round(outcome.seconds, 3)}},
            )
            return
        model = outcome.model
        pipeline = InferencePipeline(model, self.settings, self.metrics)
        self.pipeline = pipeline
        self.metrics.pending.set_function(lambda: pipeline.executor.pending)
        self.status = "ready"
        self.reason = None
        self.metrics.ready.set(1)
        logger.info(
            "model ready",
            extra={
                "fields": {
                    "model": model.card.name,
                    "version": model.card.version,
                    "providers": model.providers,
                    "intra_op_threads": model.intra_op_threads,
                    "inference_workers": model.inference_workers,
                    "max_batch_size": model.max_batch_size,
                    "decode_threads": pipeline.decode_threads,
                    "batching": self.settings.batching,
                    "seconds": round(outcome.seconds, 3),
                }
            },
        )

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            await asyncio.shield(self._task)  # the loading thread cannot be interrupted
        self.status = "failed"
        self.reason = "the service is shutting down"
        self.metrics.ready.set(0)
        if self.pipeline is not None:
            pipeline, self.pipeline = self.pipeline, None
            await anyio.to_thread.run_sync(pipeline.close)

    def require_pipeline(self) -> InferencePipeline:
        """The pipeline, or a 503 that says why there is none."""
        if self.status == "ready" and self.pipeline is not None:
            return self.pipeline
        headers = {"Retry-After": "5"} if self.status == "loading" else None
        raise ApiError(
            503,
            "not_ready",
            f"model not ready: {self.reason}",
            details={"status": self.status},
            headers=headers,
        )

    def describe(self) -> dict[str, Any]:
        """Everything /model reports (without the card)."""
        model = self.outcome.model if self.outcome is not None else None
        return {
            "status": self.status,
            "reason": self.reason,
            "provider_setting": self.settings.provider,
            "providers": model.providers if model is not None else [],
            "available_providers": list(ort.get_available_providers()),
            "intra_op_threads": model.intra_op_threads if model is not None else None,
            "decode_threads": self.pipeline.decode_threads if self.pipeline is not None else None,
            "inference_workers": model.inference_workers if model is not None else None,
            "batching": {
                "enabled": self.settings.batching,
                "max_batch_size": self.settings.max_batch_size,
                "effective_max_batch_size": model.max_batch_size if model is not None else None,
                "autotune": self.settings.batch_autotune,
                "max_batch_wait_ms": self.settings.max_batch_wait_ms,
                "max_queue": self.settings.max_queue,
            },
            "checks": self.outcome.checks if self.outcome is not None else {},
        }
