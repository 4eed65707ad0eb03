"""Does an INT8 model pay? Static quantisation of the shipped ONNX file, timed and scored.

    .venv/bin/python -m bench.quantization [--model-dir DIR] [--calibration-images 128]

Issue 5 asks for an INT8 static (QDQ) variant only "if it pays": served only when it is faster
and its ROC-AUC drops by at most 0.005. This measures that before anything is built around it:

* calibration on images of the model's *training* locations (``report.json`` names them), so
  the validation locations stay unseen, through the serving preprocessing;
* variants made with ``onnxruntime.quantization.quantize_static``: QDQ on every operator, QDQ
  on convolutions only, and the older QOperator form (``QLinearConv``) on convolutions only;
  u8 activations, s8 per-channel weights, MinMax calibration;
* for each: one single-threaded run at batch 1 (p50 ms; the service's CPU plan), ROC-AUC on the
  validation locations, and the largest change in probabilities and heatmap against FP32.

Writes ``bench/results/quantization.json``. A script, not a test; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from sklearn.metrics import roc_auc_score

from app.model_card import read_card
from app.onnx_model import session_options
from app.preprocessing import preprocess_bytes
from bench.images import DEFAULT_DATA_DIR

REPO = Path(__file__).resolve().parents[1]
MAX_AUC_DROP = 0.005  # the bar for serving a quantised model

VARIANTS: dict[str, dict[str, Any]] = {
    "int8 QDQ, all operators": {"format": QuantFormat.QDQ, "op_types": None},
    "int8 QDQ, Conv only": {"format": QuantFormat.QDQ, "op_types": ["Conv"]},
    "int8 QOperator, Conv only": {"format": QuantFormat.QOperator, "op_types": ["Conv"]},
}


class _Batches(CalibrationDataReader):  # type: ignore[misc]  # untyped base
    """Feeds the calibration images in batches of 16."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self.input_name = input_name
        self.images = images
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            return None
        batch = self.images[self.position : self.position + 16]
        self.position += 16
        return {self.input_name: batch}


def load_split(
    model_dir: Path, data_dir: Path, group_column: str
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Manifest rows of the final model's training and validation groups."""
    final = json.loads((model_dir / "report.json").read_text())["final"]
    train_groups, val_groups = set(final["train_groups"]), set(final["validation_groups"])
    with (data_dir / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = [row for row in rows if row[group_column] in train_groups]
    val = [row for row in rows if row[group_column] in val_groups]
    return train, val


def evaluate(
    model_path: Path, images: np.ndarray, names: tuple[str, str, str], runs: int
) -> dict[str, Any]:
    """Outputs on every image (batches of 32) and the p50 of single-image runs."""
    input_name, probabilities_name, heatmap_name = names
    session = ort.InferenceSession(
        str(model_path), session_options(1, False), providers=["CPUExecutionProvider"]
    )
    outputs = [
        session.run([probabilities_name, heatmap_name], {input_name: images[i : i + 32]})
        for i in range(0, len(images), 32)
    ]
    for index in range(10):
        session.run(None, {input_name: images[index % len(images)][np.newaxis]})
    timings = []
    for index in range(runs):
        started = time.perf_counter()
        session.run(None, {input_name: images[index % len(images)][np.newaxis]})
        timings.append(time.perf_counter() - started)
    return {
        "probabilities": np.concatenate([output[0] for output in outputs]),
        "heatmap": np.concatenate([output[1] for output in outputs]),
        "ms_p50": statistics.median(timings) * 1000,
        "size_bytes": model_path.stat().st_size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "ballscrew-pitting")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--group-column", default="location")
    parser.add_argument("--calibration-images", type=int, default=128)
    parser.add_argument("--runs", type=int, default=300, help="timed single-image runs")
    parser.add_argument(
        "--json", type=Path, default=REPO / "bench" / "results" / "quantization.json"
    )
    args = parser.parse_args(argv)

    card, _ = read_card(args.model_dir)
    spec = card.input_spec
    names = (card.input.name, card.outputs.probabilities.name, card.outputs.heatmap.name)
    train, val = load_split(args.model_dir, args.data, args.group_column)
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(train), min(args.calibration_images, len(train)), replace=False)

    def tensors(rows: list[dict[str, str]]) -> np.ndarray:
        files = [(args.data / row["file"]).read_bytes() for row in rows]
        return np.stack([preprocess_bytes(data, spec) for data in files])

    calibration = tensors([train[i] for i in chosen])
    validation = tensors(val)
    truth = np.array([row["label"] == card.defect_class for row in val])
    defect = card.defect_index

    fp32_path = args.model_dir / card.onnx.file
    reference = evaluate(fp32_path, validation, names, args.runs)
    fp32_auc = float(roc_auc_score(truth, reference["probabilities"][:, defect]))
    rows: list[dict[str, Any]] = [
        {
            "variant": "fp32 (shipped)",
            "ms_p50": round(reference["ms_p50"], 3),
            "size_bytes": reference["size_bytes"],
            "roc_auc": round(fp32_auc, 4),
        }
    ]
    with tempfile.TemporaryDirectory(prefix="quantization-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        for name, variant in VARIANTS.items():
            path = Path(folder) / f"{len(rows)}.onnx"
            started = time.perf_counter()
            quantize_static(
                str(prepared),
                str(path),
                _Batches(names[0], calibration),
                quant_format=variant["format"],
                op_types_to_quantize=variant["op_types"],
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
            seconds = time.perf_counter() - started
            result = evaluate(path, validation, names, args.runs)
            auc = float(roc_auc_score(truth, result["probabilities"][:, defect]))
            faster = result["ms_p50"] < reference["ms_p50"]
            keeps_auc = auc >= fp32_auc - MAX_AUC_DROP
            rows.append(
                {
                    "variant": name,
                    "ms_p50": round(result["ms_p50"], 3),
                    "size_bytes": result["size_bytes"],
                    "roc_auc": round(auc, 4),
                    "auc_change": round(auc - fp32_auc, 4),
                    "max_abs_diff_probabilities": round(
                        float(np.abs(result["probabilities"] - reference["probabilities"]).max()), 4
                    ),
                    "max_abs_diff_heatmap": round(
                        float(np.abs(result["heatmap"] - reference["heatmap"]).max()), 4
                    ),
                    "quantize_s": round(seconds, 1),
                    "pays": faster and keeps_auc,
                }
            )
    print(
        f"validation: {len(val)} images ({int(truth.sum())} defect) of the locations the final "
        f"model never trained on; calibration: {len(calibration)} training images; "
        f"1 intra-op thread, batch 1"
    )
    for row in rows:
        extra = (
            ""
            if "auc_change" not in row
            else f"  AUC change {row['auc_change']:+.4f}  max |dp| "
            f"{row['max_abs_diff_probabilities']}  max |dheatmap| {row['max_abs_diff_heatmap']}"
            f"  pays: {'yes' if row['pays'] else 'no'}"
        )
        print(
            f"{row['variant']:>28}: {row['ms_p50']:6.3f} ms/run  "
            f"{row['size_bytes'] / 1024:6.0f} KiB  ROC-AUC {row['roc_auc']:.4f}{extra}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "model": {"name": card.name, "version": card.version},
                "validation_images": len(val),
                "calibration_images": len(calibration),
                "onnxruntime": ort.__version__,
                "variants": rows,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
