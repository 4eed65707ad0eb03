"""Evaluation metrics for a binary defect detector (pure NumPy + scikit-learn)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def _safe_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None


def _safe_ap(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(average_precision_score(labels, scores)) if labels.any() else None


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """ROC-AUC, PR-AUC, and thresholded metrics with the confusion matrix (rows = truth)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    predicted = scores >= threshold
    tp = int(np.sum(predicted & labels))
    fp = int(np.sum(predicted & ~labels))
    fn = int(np.sum(~predicted & labels))
    tn = int(np.sum(~predicted & ~labels))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall
        else None
    )
    return {
        "n": len(labels),
        "n_defect": int(labels.sum()),
        "roc_auc": _safe_auc(labels, scores),
        "pr_auc": _safe_ap(labels, scores),
        "threshold": float(threshold),
        "accuracy": float((tp + tn) / len(labels)) if len(labels) else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "confusion_matrix": {"labels": ["normal", "defect"], "matrix": [[tn, fp], [fn, tp]]},
        "brier": float(np.mean((scores - labels) ** 2)) if len(labels) else None,
        "ece": expected_calibration_error(labels, scores),
    }


def expected_calibration_error(
    labels: np.ndarray, scores: np.ndarray, bins: int = 10
) -> float | None:
    """Mean |accuracy - confidence| over equal-width probability bins, weighted by bin size."""
    if len(labels) == 0:
        return None
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += mask.mean() * abs(float(labels[mask].mean()) - float(scores[mask].mean()))
    return float(total)


def reliability_curve(
    labels: np.ndarray, scores: np.ndarray, bins: int = 10
) -> dict[str, list[float]]:
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    mean_score, frac_pos, counts = [], [], []
    for b in range(bins):
        mask = index == b
        if mask.any():
            mean_score.append(float(scores[mask].mean()))
            frac_pos.append(float(np.asarray(labels)[mask].mean()))
            counts.append(float(mask.sum()))
    return {"mean_predicted": mean_score, "fraction_defect": frac_pos, "count": counts}


def breakdown(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    columns: Mapping[str, Sequence[str]],
    names: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Metrics per value of each requested manifest column (e.g. ``capture``)."""
    result: dict[str, dict[str, Any]] = {}
    for name in names:
        if name not in columns:
            raise KeyError(f"breakdown column '{name}' is not in the manifest ({sorted(columns)})")
        values = np.asarray(columns[name])
        result[name] = {
            str(v): binary_metrics(labels[values == v], scores[values == v], threshold)
            for v in sorted(np.unique(values))
        }
    return result
