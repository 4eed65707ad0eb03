"""The end-to-end flows behind the CLI: cross-validate, fit the final model, export it."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from app.preprocessing import InputSpec
from training.calibration import calibrated_probabilities, fit_temperature, operating_points
from training.card import build_card, copy_golden_images, golden_entries
from training.data import Dataset
from training.export import OPSET, convert, embed_card, onnx_outputs, parity_check, sha256_file
from training.fit import FitConfig, fit_classifier, predict_logits
from training.metrics import binary_metrics, breakdown
from training.model import ModelSpec, build_inference_model
from training.plots import write_plots
from training.splits import assert_disjoint, grouped_holdout, grouped_kfold

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CARD_FILE = "model_card.json"
REPORT_FILE = "report.json"
CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class RunConfig:
    input_spec: InputSpec
    model_spec: ModelSpec = field(default_factory=ModelSpec)
    fit: FitConfig = field(default_factory=FitConfig)
    val_fraction: float = 0.2
    min_recall: float = 0.99
    breakdown_columns: tuple[str, ...] = ()
    default_operating_point: str = "balanced"
    balance_by: str | None = None


@dataclass
class SplitResult:
    """One trained model with its calibration, as used for a CV fold or the final model."""

    classifier: keras.Model
    temperature: float
    points: dict[str, Any]
    val_index: np.ndarray
    train_index: np.ndarray
    history: dict[str, list[float]]
    seconds: float

    def defect_scores(self, images: np.ndarray) -> np.ndarray:
        return calibrated_probabilities(predict_logits(self.classifier, images), self.temperature)[
            :, 1
        ]


def train_on(data: Dataset, index: np.ndarray, config: RunConfig) -> SplitResult:
    """Hold out validation groups from ``index``, fit, then calibrate on those groups only."""
    start = time.monotonic()
    inner_train, inner_val = grouped_holdout(
        data.labels[index], data.groups[index], config.val_fraction, config.fit.seed
    )
    train_index, val_index = index[inner_train], index[inner_val]
    assert_disjoint(data.groups, train_index, val_index)
    log.info(
        "training on %d images (%d groups), validating on %d images (groups %s)",
        len(train_index),
        len(np.unique(data.groups[train_index])),
        len(val_index),
        sorted(np.unique(data.groups[val_index]).tolist()),
    )
    classifier, history = fit_classifier(
        data.images[train_index],
        data.labels[train_index],
        data.images[val_index],
        data.labels[val_index],
        config.input_spec,
        config.model_spec,
        config.fit,
        train_strata=(
            np.asarray(data.columns[config.balance_by])[train_index] if config.balance_by else None
        ),
    )
    val_logits = predict_logits(classifier, data.images[val_index])
    temperature = fit_temperature(val_logits, data.labels[val_index])
    val_scores = calibrated_probabilities(val_logits, temperature)[:, 1]
    points = operating_points(val_scores, data.labels[val_index] == 1, config.min_recall)
    log.info(
        "temperature %.3f; operating points %s",
        temperature,
        {k: round(v.threshold, 4) for k, v in points.items()},
    )
    return SplitResult(
        classifier,
        temperature,
        {k: v.as_dict() for k, v in points.items()},
        val_index,
        train_index,
        history,
        time.monotonic() - start,
    )


def cross_validate(data: Dataset, folds: int, config: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Grouped k-fold CV: every score is from a model that never saw that image's group."""
    oof = np.full(len(data), np.nan)
    oof_threshold = np.full(len(data), np.nan)
    fold_reports: list[dict[str, Any]] = []
    point = config.default_operating_point
    for k, (train_index, test_index) in enumerate(
        grouped_kfold(data.labels, data.groups, folds, config.fit.seed)
    ):
        assert_disjoint(data.groups, train_index, test_index)
        log.info(
            "fold %d/%d: test groups %s",
            k + 1,
            folds,
            sorted(np.unique(data.groups[test_index]).tolist()),
        )
        result = train_on(data, train_index, config)
        scores = result.defect_scores(data.images[test_index])
        threshold = float(result.points[point]["threshold"])
        oof[test_index] = scores
        oof_threshold[test_index] = threshold
        fold_metrics = binary_metrics(data.labels[test_index], scores, threshold)
        log.info(
            "fold %d: ROC-AUC %s, F1@%s %s",
            k + 1,
            fold_metrics["roc_auc"],
            point,
            fold_metrics["f1"],
        )
        fold_reports.append(
            {
                "fold": k + 1,
                "test_groups": sorted(np.unique(data.groups[test_index]).tolist()),
                "validation_groups": sorted(np.unique(data.groups[result.val_index]).tolist()),
                "epochs": len(result.history["loss"]),
                "seconds": round(result.seconds, 1),
                "temperature": result.temperature,
                "operating_points": result.points,
                "test": fold_metrics,
            }
        )
        keras.backend.clear_session()
    aucs = [f["test"]["roc_auc"] for f in fold_reports if f["test"]["roc_auc"] is not None]
    # Each image judged at its own fold's threshold: exactly what deployment of that fold would do.
    pooled = binary_metrics(data.labels, oof, 0.5)
    decided = (oof >= oof_threshold).astype(np.float64)
    pooled_at_point = binary_metrics(data.labels, decided, 0.5)
    pooled_at_point.update(
        roc_auc=pooled["roc_auc"],
        pr_auc=pooled["pr_auc"],
        brier=None,
        ece=None,
        threshold=f"per-fold '{point}' threshold",
    )
    report: dict[str, Any] = {
        "folds": fold_reports,
        "mean_roc_auc": float(np.mean(aucs)) if aucs else None,
        "min_roc_auc": float(np.min(aucs)) if aucs else None,
        "pooled_out_of_fold": {
            "at_0.5": pooled,
            f"at_{point}": pooled_at_point,
        },
        "breakdown": breakdown(data.labels, oof, 0.5, data.columns, config.breakdown_columns),
        "plots": write_plots(
            data.labels, oof, 0.5, out_dir / "plots" / "cv", "grouped CV (pooled)"
        ),
    }
    (out_dir / "cv_predictions.csv").write_text(
        "file,group,label,defect_probability,threshold\n"
        + "".join(
            f"{f},{g},{data.class_names[y]},{s:.6f},{t:.6f}\n"
            for f, g, y, s, t in zip(
                data.files, data.groups, data.labels, oof, oof_threshold, strict=True
            )
        )
    )
    return report


def fit_final(
    data: Dataset, config: RunConfig, out_dir: Path
) -> tuple[SplitResult, dict[str, Any]]:
    """Fit the shipped model on all groups but the validation ones, and save a checkpoint."""
    result = train_on(data, np.arange(len(data)), config)
    val = result.val_index
    scores = result.defect_scores(data.images[val])
    threshold = float(result.points[config.default_operating_point]["threshold"])
    report = {
        "train_groups": sorted(np.unique(data.groups[result.train_index]).tolist()),
        "validation_groups": sorted(np.unique(data.groups[val]).tolist()),
        "epochs": len(result.history["loss"]),
        "seconds": round(result.seconds, 1),
        "history": result.history,
        "temperature": result.temperature,
        "operating_points": result.points,
        "validation": binary_metrics(data.labels[val], scores, threshold),
        "plots": write_plots(
            data.labels[val],
            scores,
            threshold,
            out_dir / "plots" / "validation",
            "final model, validation groups",
        ),
    }
    checkpoint = out_dir / CHECKPOINT_DIR
    checkpoint.mkdir(parents=True, exist_ok=True)
    result.classifier.save(checkpoint / "classifier.keras")
    return result, report


def dataset_summary(data: Dataset, source: str, licence: str | None) -> dict[str, Any]:
    return {
        "source": source,
        "licence": licence,
        "counts": data.counts(),
        "n_images": len(data),
        "n_groups": len(np.unique(data.groups)),
        "grouped_by": data.group_source,
        "skipped_unreadable": [asdict(s) for s in data.skipped],
    }


def export_model(
    *,
    name: str,
    description: str,
    classifier: keras.Model,
    temperature: float,
    points: dict[str, Any],
    data: Dataset,
    golden_index: np.ndarray,
    parity_index: np.ndarray,
    config: RunConfig,
    metrics: dict[str, Any],
    training_data: dict[str, Any],
    out_dir: Path,
    data_root: Path,
) -> dict[str, Any]:
    """ONNX export, parity gate on real validation images, golden samples, card (JSON + ONNX)."""
    inference = build_inference_model(classifier, temperature)
    path = out_dir / MODEL_FILE
    convert(inference, path)
    parity = parity_check(inference, path, data.images[parity_index].astype(np.float32))
    copied = copy_golden_images(
        [data_root / data.files[i] for i in golden_index],
        [data.class_names[data.labels[i]] for i in golden_index],
        out_dir,
        config.input_spec,
    )
    golden_outputs = onnx_outputs(path, np.stack([a for _, _, a in copied]))
    heatmap_shape = tuple(int(d) for d in golden_outputs["heatmap"].shape[1:])
    card = build_card(
        name=name,
        description=description,
        class_names=data.class_names,
        spec=config.input_spec,
        heatmap_shape=(heatmap_shape[0], heatmap_shape[1]),
        temperature=temperature,
        operating_points=points,
        default_operating_point=config.default_operating_point,
        metrics={**metrics, "parity_max_abs_diff": parity},
        training_data=training_data,
        golden_samples=golden_entries(copied, golden_outputs, out_dir),
        opset=OPSET,
    )
    embed_card(path, card)
    card["onnx"] = {
        "file": MODEL_FILE,
        "sha256": sha256_file(path),
        "opset": OPSET,
        "size_bytes": path.stat().st_size,
        "producer": "tf2onnx",
    }
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return card


def pick_golden(data: Dataset, index: np.ndarray, per_class: int = 2) -> np.ndarray:
    """A few validation images of each class, spread across groups, deterministic."""
    chosen: list[int] = []
    for label in (0, 1):
        candidates = [i for i in index if data.labels[i] == label]
        seen_groups: set[str] = set()
        for i in sorted(candidates, key=lambda i: data.files[i]):
            if data.groups[i] not in seen_groups:
                chosen.append(i)
                seen_groups.add(str(data.groups[i]))
            if len(seen_groups) == per_class:
                break
    return np.array(chosen, dtype=np.int64)
