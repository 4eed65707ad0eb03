"""Service configuration, read once from ``DEFECT_*`` environment variables.

Every setting has a working default so ``defect-serve`` runs the shipped model with no
configuration; operators override only what their deployment needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Provider = Literal["auto", "cpu", "cuda"]

DEFAULT_MODEL_NAME = "ballscrew-pitting"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def default_model_dir() -> Path:
    """The shipped model: ``models/ballscrew-pitting`` next to the ``app`` package (a source
    checkout), else under the working directory (an installed package run from the repo)."""
    candidates = [
        _PACKAGE_ROOT / "models" / DEFAULT_MODEL_NAME,
        Path.cwd() / "models" / DEFAULT_MODEL_NAME,
    ]
    for candidate in candidates:
        if (candidate / "model_card.json").is_file():
            return candidate
    return candidates[0]


class Settings(BaseSettings):
    """All knobs of the service. Field ``x`` is set by the environment variable ``DEFECT_X``."""

    model_config = SettingsConfigDict(
        env_prefix="DEFECT_",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        protected_namespaces=(),
    )

    # Model and runtime
    model_dir: Path = Field(
        default_factory=default_model_dir,
        description="Folder with model_card.json and the ONNX file it names.",
    )
    provider: Provider = Field(
        default="auto",
        description="auto = CUDA when onnxruntime offers it, else CPU; cpu; cuda (required).",
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        description="onnxruntime threads inside one model run; 0 = auto (CPUs / workers on a "
        "CPU, all CPUs with CUDA).",
    )
    inference_workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Model runs in parallel; 0 = auto (one per CPU on a CPU, 1 with CUDA).",
    )
    ort_spinning: bool = Field(
        default=False,
        description="Let idle onnxruntime threads spin (steals CPU from image decoding).",
    )
    decode_threads: int = Field(
        default=0,
        ge=0,
        description="Images decoded in parallel; 0 = CPUs available to the process.",
    )
    warmup_runs: int = Field(
        default=2, ge=0, le=100, description="Warm-up runs per batch shape at load."
    )
    golden_tolerance: float | None = Field(
        default=None,
        gt=0,
        description="Override the card's golden-sample tolerance (e.g. for GPUs).",
    )

    # Micro-batching
    batching: bool = Field(
        default=True, description="Coalesce concurrent images into one model run."
    )
    max_batch_size: int = Field(
        default=8, ge=1, le=256, description="Most images in one model run."
    )
    batch_autotune: bool = Field(
        default=True,
        description="At start-up, time the model at batch sizes up to max_batch_size and cap "
        "batches at the smallest size within 10% of the best images/s.",
    )
    max_batch_wait_ms: float = Field(
        default=5.0, ge=0, le=1000, description="Longest wait for batch-mates still being decoded."
    )
    max_queue: int = Field(
        default=128,
        ge=1,
        description="Images admitted and not yet running; beyond it: 503 + Retry-After.",
    )
    retry_after_s: int = Field(
        default=1, ge=1, description="Retry-After seconds sent with 503 queue_full."
    )

    # Request limits
    max_body_bytes: int = Field(
        default=20 * 1024 * 1024,
        ge=1024,
        description="Largest request body (413 beyond, while reading).",
    )
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="Largest decoded image in pixels (422 beyond)."
    )
    max_batch_files: int = Field(
        default=32, ge=1, description="Most files in one /predict/batch request."
    )
    heatmap_max_side: int = Field(
        default=1024,
        ge=32,
        le=8192,
        description="Longest side of the returned heatmap overlay PNG.",
    )

    # Process
    host: str = Field(default="127.0.0.1", description="Bind address for defect-serve.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port for defect-serve.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Level of the JSON logs."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> Self:
        if self.max_batch_files > self.max_queue:
            raise ValueError(
                f"max_batch_files ({self.max_batch_files}) must not exceed max_queue "
                f"({self.max_queue}): such a batch request could never be admitted"
            )
        return self
