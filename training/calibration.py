"""Temperature scaling and operating points, fitted on validation data only (pure NumPy/SciPy)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

log = logging.getLogger(__name__)
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 100.0


class CalibrationError(ValueError):
    """Validation data cannot support the requested calibration or threshold."""


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T > 0 minimising the validation NLL of ``softmax(logits / T)``."""
    if len(labels) == 0:
        raise CalibrationError("no validation data to fit the temperature on")
    logits = np.asarray(logits, dtype=np.float64)

    def nll(log_t: float) -> float:
        logp = log_softmax(logits / np.exp(log_t), axis=1)
        return float(-logp[np.arange(len(labels)), labels].mean())

    low, high = np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded")
    temperature = float(np.exp(result.x))
    if not MIN_TEMPERATURE * 1.01 < temperature < MAX_TEMPERATURE * 0.99:
        # At a bound the validation logits carried (almost) no ranking signal: the probabilities
        # become flat or saturated and mean little. Say so instead of shipping it silently.
        log.warning(
            "temperature %.3g hit its bound [%g, %g]: the validation logits barely separate the "
            "classes; calibration and thresholds from this split are unreliable",
            temperature,
            MIN_TEMPERATURE,
            MAX_TEMPERATURE,
        )
    return temperature


def calibrated_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    return np.asarray(softmax(np.asarray(logits, np.float64) / temperature, axis=1))


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    description: str
    precision: float
    recall: float
    f1: float

    def as_dict(self) -> dict[str, float | str]:
        return {
            "threshold": self.threshold,
            "description": self.description,
            "validation_precision": self.precision,
            "validation_recall": self.recall,
            "validation_f1": self.f1,
        }


def _rates(
    scores: np.ndarray, positive: np.ndarray, threshold: float
) -> tuple[float, float, float]:
    predicted = scores >= threshold
    tp = float(np.sum(predicted & positive))
    fp = float(np.sum(predicted & ~positive))
    fn = float(np.sum(~predicted & positive))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Midpoints between sorted distinct scores, so a threshold never sits on a sample."""
    unique = np.unique(scores)
    mids = (unique[:-1] + unique[1:]) / 2 if len(unique) > 1 else unique
    return np.concatenate([mids, unique[:1]])


def operating_points(
    defect_scores: np.ndarray, is_defect: np.ndarray, min_recall: float = 0.99
) -> dict[str, OperatingPoint]:
    """``default`` (0.5), ``balanced`` (max F1) and ``high_recall`` (recall >= min_recall)."""
    scores = np.asarray(defect_scores, dtype=np.float64)
    positive = np.asarray(is_defect, dtype=bool)
    if not positive.any():
        raise CalibrationError(
            "validation data has no defect examples: thresholds derived from it would be "
            "meaningless. Add defect images to more groups, or change the validation fraction."
        )
    if positive.all():
        raise CalibrationError("validation data has no normal examples: cannot set thresholds")
    candidates = _candidate_thresholds(scores)
    stats = [(t, *_rates(scores, positive, t)) for t in candidates]
    best = max(stats, key=lambda s: (s[3], s[0]))
    eligible = [s for s in stats if s[2] >= min_recall]
    high = max(eligible, key=lambda s: s[0])
    default = (0.5, *_rates(scores, positive, 0.5))
    return {
        "default": OperatingPoint(0.5, "probability >= 0.5", *default[1:]),
        "balanced": OperatingPoint(
            float(best[0]), "maximum F1 on the validation groups", *best[1:]
        ),
        "high_recall": OperatingPoint(
            float(high[0]),
            f"highest threshold with recall >= {min_recall:g} on the validation groups",
            *high[1:],
        ),
    }
