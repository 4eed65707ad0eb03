"""The onnxruntime session and the one function that runs it.

Kept free of HTTP concerns: the batcher, the no-batching path, the start-up checks and the
benchmarks all call :meth:`OnnxModel.run_tensors`, so they measure and verify the same code.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from app.model_card import ModelCard

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True, slots=True)
class ModelOutput:
    """One image's outputs (views into the batch's arrays, so no copy is made)."""

    probabilities: np.ndarray  # float32 [num_classes]
    heatmap: np.ndarray  # float32 [h, w]


def requested_providers(setting: str, available: Sequence[str]) -> list[str]:
    """Providers to ask onnxruntime for. ``cuda`` asks even when absent, so the session reveals
    (through ``get_providers()``) that it silently fell back to CPU."""
    if setting == "cpu":
        return [CPU]
    if setting == "cuda" or CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def session_options(intra_op_threads: int, spinning: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the service reports providers itself, in JSON
    # Spinning threads burn the CPU that image decoding needs between model runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


class OnnxModel:
    """A loaded, checked model: the session plus the card that says how to feed it."""

    def __init__(
        self,
        session: ort.InferenceSession,
        card: ModelCard,
        raw_card: dict[str, Any],
        sha256: str,
        intra_op_threads: int,
        inference_workers: int,
        max_batch_size: int,
    ) -> None:
        self.session = session
        self.card = card
        self.raw_card = raw_card
        self.sha256 = sha256
        self.intra_op_threads = intra_op_threads
        self.inference_workers = inference_workers
        self.max_batch_size = max_batch_size  # lowered by the start-up batch-size autotune
        self.input_name = card.input.name
        self.output_names = [card.outputs.probabilities.name, card.outputs.heatmap.name]
        self._input_shape = (card.input.height, card.input.width, card.input.channels)
        # One reused input buffer per thread for multi-image batches: no multi-MB allocation
        # (and its page faults) per batch, and no lock between parallel workers.
        self._buffers = threading.local()

    def _batch_buffer(self, count: int) -> np.ndarray:
        buffer: np.ndarray | None = getattr(self._buffers, "array", None)
        if buffer is None or len(buffer) < count:
            buffer = np.empty((max(count, self.max_batch_size), *self._input_shape), np.float32)
            self._buffers.array = buffer
        return buffer[:count]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run a float32 ``[N, H, W, C]`` batch; returns (probabilities, heatmaps)."""
        probabilities, heatmaps = self.session.run(self.output_names, {self.input_name: batch})
        return probabilities, heatmaps

    def run_tensors(self, tensors: Sequence[np.ndarray]) -> list[ModelOutput]:
        """Run ``[H, W, C]`` tensors as one batch and split the outputs per image."""
        count = len(tensors)
        if count == 1:
            probabilities, heatmaps = self.run(tensors[0][np.newaxis])
        else:
            batch = self._batch_buffer(count)
            for index, tensor in enumerate(tensors):
                batch[index] = tensor
            probabilities, heatmaps = self.run(batch)
        if len(probabilities) != count or len(heatmaps) != count:
            raise RuntimeError(
                f"model returned {len(probabilities)} results for a batch of {count} images"
            )
        return [ModelOutput(probabilities[i], heatmaps[i]) for i in range(count)]
