"""Model card and golden samples: everything the service needs to feed the model correctly."""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.preprocessing import InputSpec, preprocess_bytes

SCHEMA_VERSION = 1
GOLDEN_TOLERANCE = 1e-4


TRAINING_PACKAGES = (
    "tensorflow-cpu",
    "tensorflow",
    "keras",
    "tf2onnx",
    "onnx",
    "onnxruntime",
    "pillow",
    "numpy",
)


def package_versions(names: Sequence[str] = TRAINING_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names``; packages that are not installed are left out."""
    versions: dict[str, str] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def input_sha256(array: np.ndarray) -> str:
    """Hash of the preprocessed float32 tensor: tells a preprocessing drift from a model drift."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def copy_golden_images(
    sources: list[Path], labels: list[str], out_dir: Path, spec: InputSpec
) -> list[tuple[str, Path, np.ndarray]]:
    """Copy source files byte-for-byte (same decoder path as production) into ``golden/``."""
    golden_dir = out_dir / "golden"
    if golden_dir.exists():
        shutil.rmtree(golden_dir)
    golden_dir.mkdir(parents=True)
    copied = []
    for i, (source, label) in enumerate(zip(sources, labels, strict=True)):
        target = golden_dir / f"{i}_{label}{source.suffix.lower()}"
        shutil.copyfile(source, target)
        copied.append((label, target, preprocess_bytes(target.read_bytes(), spec)))
    return copied


def golden_entries(
    copied: list[tuple[str, Path, np.ndarray]], outputs: dict[str, np.ndarray], out_dir: Path
) -> list[dict[str, Any]]:
    entries = []
    for i, (label, path, array) in enumerate(copied):
        entries.append(
            {
                "file": path.relative_to(out_dir).as_posix(),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "input_sha256": input_sha256(array),
                "label": label,
                "probabilities": [float(p) for p in outputs["probabilities"][i]],
                "heatmap_max": float(outputs["heatmap"][i].max()),
                "tolerance": GOLDEN_TOLERANCE,
            }
        )
    return entries


def build_card(
    *,
    name: str,
    description: str,
    class_names: list[str],
    spec: InputSpec,
    heatmap_shape: tuple[int, int],
    temperature: float,
    operating_points: dict[str, dict[str, Any]],
    default_operating_point: str,
    metrics: dict[str, Any],
    training_data: dict[str, Any],
    golden_samples: list[dict[str, Any]],
    opset: int,
) -> dict[str, Any]:
    now = datetime.now(UTC).replace(microsecond=0)
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": now.strftime("%Y%m%dT%H%M%SZ"),
        "created_at": now.isoformat().replace("+00:00", "Z"),
        "description": description,
        "class_names": class_names,
        "defect_class": class_names[1],
        "input": {
            "name": "image",
            "layout": "NHWC",
            "dtype": "float32",
            "shape": [None, spec.height, spec.width, spec.channels],
            "height": spec.height,
            "width": spec.width,
            "channels": spec.channels,
            "color_mode": spec.color_mode,
            "value_range": [0, 255],
        },
        "preprocessing": {
            "library": "Pillow",
            "implementation": "app/preprocessing.py (shared by training and serving)",
            "exif_transpose": True,
            "alpha": "composite_white",
            "high_bit_depth": "scale_to_8bit",
            "resize": {
                "method": "bilinear",
                "keep_aspect_ratio": False,
                "padding": "none",
                "crop": "none",
            },
            "normalization": "inside the graph: x / 127.5 - 1",
        },
        "outputs": {
            "probabilities": {
                "name": "probabilities",
                "shape": [None, len(class_names)],
                "calibrated": True,
                "meaning": "softmax(logits / temperature) over class_names",
            },
            "heatmap": {
                "name": "heatmap",
                "shape": [None, *heatmap_shape],
                "stride": spec.height // heatmap_shape[0],
                "meaning": "per-cell calibrated defect probability "
                "sigmoid((local_defect_logit - local_normal_logit) / temperature)",
            },
        },
        "calibration": {
            "method": "temperature",
            "temperature": temperature,
            "applied_in_graph": True,
            "fitted_on": "validation groups (never the test folds)",
        },
        "operating_points": operating_points,
        "default_operating_point": default_operating_point,
        "metrics": metrics,
        "training_data": training_data,
        "versions": package_versions(),
        "golden_samples": golden_samples,
    }
