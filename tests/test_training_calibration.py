"""Temperature scaling and operating points are fitted correctly and refuse bad validation data."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("scipy")

from training.calibration import (
    CalibrationError,
    calibrated_probabilities,
    fit_temperature,
    operating_points,
)
from training.metrics import binary_metrics, expected_calibration_error


def test_temperature_recovers_overconfidence() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    logits = np.stack([np.zeros_like(true_logit), true_logit * 3.0], axis=1)  # 3x overconfident
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(labels, calibrated_probabilities(logits, 1.0)[:, 1])
    after = expected_calibration_error(labels, calibrated_probabilities(logits, temperature)[:, 1])
    assert after is not None
    assert before is not None
    assert after < before / 2


def test_operating_points_meet_their_definitions() -> None:
    rng = np.random.default_rng(1)
    labels = np.array([0] * 200 + [1] * 100)
    scores = np.clip(np.concatenate([rng.beta(2, 6, 200), rng.beta(6, 2, 100)]), 0, 1)
    points = operating_points(scores, labels == 1, min_recall=0.99)
    assert set(points) == {"default", "balanced", "high_recall"}
    assert points["default"].threshold == 0.5
    high = points["high_recall"]
    assert binary_metrics(labels, scores, high.threshold)["recall"] >= 0.99
    # Highest such threshold: the next defect score above it would drop recall below 0.99.
    above = np.sort(scores[labels == 1])
    above = above[above > high.threshold]
    if len(above):
        assert binary_metrics(labels, scores, float(above[0]) + 1e-9)["recall"] < 0.99
    balanced_f1 = binary_metrics(labels, scores, points["balanced"].threshold)["f1"]
    for t in np.linspace(0.01, 0.99, 99):
        f1 = binary_metrics(labels, scores, float(t))["f1"] or 0.0
        assert f1 <= balanced_f1 + 1e-12


def test_refuses_thresholds_without_defects() -> None:
    with pytest.raises(CalibrationError, match="no defect examples"):
        operating_points(np.array([0.1, 0.2, 0.3]), np.array([False, False, False]))


def test_metrics_confusion_matrix_layout() -> None:
    m = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.9, 0.2, 0.8]), 0.5)
    assert m["confusion_matrix"]["matrix"] == [[1, 1], [1, 1]]
    assert m["roc_auc"] == pytest.approx(0.5)  # 2 of 4 defect-normal pairs ranked right


def test_balanced_sample_weights_remove_the_stratum_shortcut() -> None:
    pytest.importorskip("tensorflow")
    from training.fit import balanced_sample_weights

    # A framing that is 90 % defect next to one that is 20 % defect.
    strata = np.array(["wide"] * 100 + ["close"] * 400)
    labels = np.array([1] * 90 + [0] * 10 + [1] * 80 + [0] * 320)
    weights = balanced_sample_weights(labels, strata)
    assert weights.sum() == pytest.approx(len(labels), rel=1e-5)
    for stratum in ("wide", "close"):
        inside = strata == stratum
        defect = weights[inside & (labels == 1)].sum()
        normal = weights[inside & (labels == 0)].sum()
        assert defect == pytest.approx(normal, rel=1e-5)  # no label information in the stratum
    assert weights[strata == "wide"].sum() / weights.sum() == pytest.approx(0.2, rel=1e-5)
    # Without strata: plain balanced class weights.
    plain = balanced_sample_weights(labels)
    assert plain[labels == 1].sum() == pytest.approx(plain[labels == 0].sum(), rel=1e-5)


def test_temperature_at_its_bound_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    logits = np.stack([np.zeros(40), np.tile([5.0, -5.0], 20)], axis=1)
    labels = np.tile([0, 1], 20)  # logits rank the classes exactly the wrong way round
    with caplog.at_level("WARNING"):
        temperature = fit_temperature(logits, labels)
    assert temperature > 99
    assert "hit its bound" in caplog.text
