"""Prometheus metrics, one registry per app instance.

A per-app registry (not the global default) lets tests and benchmarks build several apps in one
process without "duplicated timeseries" errors, and keeps /metrics to what this service owns.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class ServiceMetrics:
    """All series the service exports; the batcher reports through :meth:`observe_batch`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "defect_http_requests",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "defect_http_request_duration_seconds",
            "HTTP request latency (first byte received to response sent).",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "defect_predictions",
            "Images classified, by predicted label.",
            ["label"],
            registry=self.registry,
        )
        self.item_errors = Counter(
            "defect_image_errors",
            "Images rejected, by error code (including items of batch requests).",
            ["code"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "defect_inference_batch_size",
            "Images per onnxruntime run.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "defect_inference_queue_wait_seconds",
            "Time an image waited between preprocessing and its model run.",
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "defect_inference_duration_seconds",
            "Duration of one onnxruntime run (a whole batch).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_full = Counter(
            "defect_queue_full_rejections",
            "Requests refused with 503 because the queue was full.",
            registry=self.registry,
        )
        self.model_info = Gauge(
            "defect_model_info",
            "The loaded model (value 1) with the execution provider actually in use.",
            ["name", "version", "sha256", "provider"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "defect_model_ready",
            "1 when the model is loaded, verified and serving, else 0.",
            registry=self.registry,
        )
        self.pending = Gauge(
            "defect_inference_pending_images",
            "Images admitted and not yet picked up for a model run.",
            registry=self.registry,
        )

    def observe_batch(self, size: int, queue_seconds: Sequence[float], run_seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(run_seconds)
        for wait in queue_seconds:
            self.queue_wait.observe(wait)
