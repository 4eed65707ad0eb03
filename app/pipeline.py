"""The request path from uploaded bytes to a verdict, shared by /predict and /predict/batch.

Per image: admission (a batcher slot, or 503) -> one queue put to a decode thread, which
decodes, preprocesses and hands the tensor to the batcher (no extra copy) -> the model run's
completion wakes the event loop once, resolving the request's asyncio future -> build a plain
dict (serialised once, by the route). The event loop never decodes, resizes, runs the model or
encodes a PNG, and never holds a thread while it waits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from app.batcher import (
    BatcherClosedError,
    BatcherReservation,
    Completed,
    DirectExecutor,
    DirectReservation,
    MicroBatcher,
    QueueFullError,
)
from app.cpu_budget import available_cpus
from app.errors import ApiError
from app.heatmap import render_overlay, summarize_heatmap
from app.inputs import PreparedImage, prepare_image
from app.metrics import ServiceMetrics
from app.onnx_model import ModelOutput, OnnxModel
from app.preprocessing import enable_block_cache
from app.settings import Settings
from app.worker_pool import PoolClosedError, WorkerPool

T = TypeVar("T")

Reservation = (
    BatcherReservation[np.ndarray, ModelOutput] | DirectReservation[np.ndarray, ModelOutput]
)


@dataclass(frozen=True, slots=True)
class PredictOptions:
    threshold: float
    operating_point: str | None  # None when the caller gave an explicit threshold
    heatmap: bool


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class InferencePipeline:
    """Owns the executor (micro-batcher or direct runs) for one loaded model."""

    def __init__(self, model: OnnxModel, settings: Settings, metrics: ServiceMetrics) -> None:
        self.model = model
        self.card = model.card
        self.settings = settings
        self.metrics = metrics
        self._spec = model.card.input_spec
        self._defect_index = model.card.defect_index
        self._class_names = list(model.card.class_names)
        self.decode_threads = settings.decode_threads or available_cpus()
        # A dedicated pool (not the shared anyio/Starlette one): its size *is* the decode
        # concurrency, and a job costs the event loop one queue put.
        self._workers = WorkerPool(self.decode_threads, name="decode")
        # An image in flight holds about three buffers (decoded, converted, resized).
        enable_block_cache(4 * self.decode_threads)
        self.executor: (
            MicroBatcher[np.ndarray, ModelOutput] | DirectExecutor[np.ndarray, ModelOutput]
        )
        if settings.batching:
            self.executor = MicroBatcher(
                model.run_tensors,
                max_batch_size=model.max_batch_size,  # after the start-up autotune
                max_wait_s=settings.max_batch_wait_ms / 1000.0,
                max_queue=settings.max_queue,
                observer=metrics,
                workers=model.inference_workers,
            )
        else:
            self.executor = DirectExecutor(
                model.run_tensors, max_queue=settings.max_queue, observer=metrics
            )
        self.model_info = {
            "name": model.card.name,
            "version": model.card.version,
            "sha256": model.sha256,
        }

    def close(self) -> None:
        """Drain the decode queue into the batcher first, then let the batcher finish what it
        holds: images already accepted are answered, not dropped."""
        self._workers.shutdown()
        self.executor.close()

    def resolve_options(
        self, threshold: float | None, operating_point: str | None, heatmap: bool
    ) -> PredictOptions:
        """Pick the decision threshold: explicit value, named operating point, or the card's
        default operating point."""
        if threshold is not None and operating_point is not None:
            raise ApiError(
                422,
                "conflicting_parameters",
                "give either threshold or operating_point, not both",
            )
        if threshold is not None:
            if not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
                raise ApiError(422, "validation_error", "threshold must be within [0, 1]")
            return PredictOptions(threshold=threshold, operating_point=None, heatmap=heatmap)
        name = operating_point or self.card.default_operating_point
        point = self.card.operating_points.get(name)
        if point is None:
            raise ApiError(
                422,
                "unknown_operating_point",
                f"unknown operating_point {name!r}; this model has "
                f"{sorted(self.card.operating_points)}",
                details={"operating_points": sorted(self.card.operating_points)},
            )
        return PredictOptions(threshold=point.threshold, operating_point=name, heatmap=heatmap)

    def reserve(self, count: int) -> Reservation:
        """Admit ``count`` images or refuse at once with 503 + Retry-After."""
        try:
            reservation = self.executor.reserve(count)
        except QueueFullError as exc:
            self.metrics.queue_full.inc()
            raise ApiError(
                503,
                "queue_full",
                f"the inference queue is full ({exc}); retry after {self.settings.retry_after_s} s",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from exc
        except BatcherClosedError as exc:
            raise ApiError(503, "not_ready", str(exc)) from exc
        return reservation

    def _decode_and_submit(
        self,
        data: bytes,
        reservation: Reservation,
        keep_image: bool,
        loop: asyncio.AbstractEventLoop,
        waiter: asyncio.Future[tuple[PreparedImage, Completed[ModelOutput]]],
    ) -> None:
        """Worker thread: decode, preprocess, queue the tensor for the model, and have the
        model's completion wake the event loop once (no second hop back to the loop)."""
        if waiter.cancelled():  # the request is gone; its slot was released by the route
            return
        try:
            prepared = prepare_image(
                data, self._spec, max_pixels=self.settings.max_image_pixels, keep_image=keep_image
            )
            future = reservation.submit(prepared.tensor)
        except BaseException as exc:
            reservation.release(1)  # the batcher stops waiting for this image at once
            _call_soon(loop, _settle_error, waiter, exc)
            return
        future.add_done_callback(partial(_wake_loop, loop, waiter, prepared))

    async def _in_pool(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` on a worker thread; one loop wake-up for the result."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        self._workers.submit(_call_and_report, loop, waiter, function, args)
        return await waiter

    async def predict(
        self, data: bytes, reservation: Reservation, options: PredictOptions
    ) -> dict[str, Any]:
        """One image's result; raises ``ImageError`` for bad input (its slot is given back)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[PreparedImage, Completed[ModelOutput]]] = loop.create_future()
        try:
            self._workers.submit(
                self._decode_and_submit, data, reservation, options.heatmap, loop, waiter
            )
            prepared, completed = await waiter
        except (BatcherClosedError, PoolClosedError) as exc:  # shutting down meanwhile
            reservation.release(1)
            raise ApiError(503, "not_ready", "the service is shutting down") from exc
        result = self._result(prepared, completed, options.threshold)
        if options.heatmap:
            result["heatmap"] = await self._in_pool(
                self._heatmap,
                prepared,
                completed.value.heatmap,
                options.threshold,
                result["label"] == self.card.defect_class,
            )
        return result

    def _result(
        self, prepared: PreparedImage, completed: Completed[ModelOutput], threshold: float
    ) -> dict[str, Any]:
        probabilities = completed.value.probabilities.tolist()
        defect_probability = probabilities[self._defect_index]
        label = self.label_for(probabilities, threshold)
        self.metrics.predictions.labels(label).inc()
        return {
            "label": label,
            "defect_probability": defect_probability,
            "probabilities": dict(zip(self._class_names, probabilities, strict=True)),
            "image": {"width": prepared.width, "height": prepared.height},
            "timing": {
                "decode_ms": round(prepared.decode_ms, 3),
                "preprocess_ms": round(prepared.preprocess_ms, 3),
                "queue_ms": _ms(completed.queue_seconds),
                "inference_ms": _ms(completed.run_seconds),
                "batch_size": completed.batch_size,
            },
            "heatmap": None,
        }

    def label_for(self, probabilities: Sequence[float], threshold: float) -> str:
        """Defect when its probability reaches the threshold, else the likeliest other class."""
        if probabilities[self._defect_index] >= threshold:
            return self._class_names[self._defect_index]
        others = [i for i in range(len(probabilities)) if i != self._defect_index]
        return self._class_names[max(others, key=lambda i: probabilities[i])]

    def _heatmap(
        self, prepared: PreparedImage, heatmap: np.ndarray, threshold: float, is_defect: bool
    ) -> dict[str, Any]:
        """Worker thread: region statistics and the PNG overlay."""
        summary = summarize_heatmap(
            heatmap, threshold, prepared.width, prepared.height, is_defect=is_defect
        )
        assert prepared.image is not None
        png, width, height = render_overlay(
            prepared.image, heatmap, summary.box, self.settings.heatmap_max_side
        )
        box = summary.box
        return {
            "bbox": None
            if box is None
            else {"x": box.x, "y": box.y, "width": box.width, "height": box.height},
            "area_fraction": summary.area_fraction,
            "peak_probability": summary.peak,
            "peak": {"x": summary.peak_x, "y": summary.peak_y},
            "grid": {"rows": int(heatmap.shape[0]), "cols": int(heatmap.shape[1])},
            "threshold": threshold,
            "overlay_png_base64": base64.b64encode(png).decode("ascii"),
            "overlay_width": width,
            "overlay_height": height,
        }


# Loop-side helpers: called through ``call_soon_threadsafe`` from worker threads. A waiter that
# is already done (its request was cancelled) is left alone.


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """``call_soon_threadsafe`` that tolerates a loop already closed (shutdown)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def _settle_error(waiter: asyncio.Future[Any], exc: BaseException) -> None:
    if not waiter.done():
        waiter.set_exception(exc)


def _settle_result(waiter: asyncio.Future[Any], value: Any) -> None:
    if not waiter.done():
        waiter.set_result(value)


def _settle_completed(
    waiter: asyncio.Future[tuple[PreparedImage, Completed[ModelOutput]]],
    prepared: PreparedImage,
    future: Future[Completed[ModelOutput]],
) -> None:
    if waiter.done():
        return
    if future.cancelled():
        waiter.cancel()
        return
    exc = future.exception()
    if exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result((prepared, future.result()))


def _wake_loop(
    loop: asyncio.AbstractEventLoop,
    waiter: asyncio.Future[tuple[PreparedImage, Completed[ModelOutput]]],
    prepared: PreparedImage,
    future: Future[Completed[ModelOutput]],
) -> None:
    """Model thread (or the worker, without batching): hand the finished item to the loop."""
    _call_soon(loop, _settle_completed, waiter, prepared, future)


def _call_and_report(
    loop: asyncio.AbstractEventLoop,
    waiter: asyncio.Future[T],
    function: Callable[..., T],
    args: tuple[Any, ...],
) -> None:
    """Worker thread: run ``function`` and report its result or error to ``waiter``."""
    if waiter.cancelled():
        return
    try:
        value = function(*args)
    except BaseException as exc:
        _call_soon(loop, _settle_error, waiter, exc)
        return
    _call_soon(loop, _settle_result, waiter, value)
