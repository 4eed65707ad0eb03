"""The exported graph's heatmap and verdict come from one forward pass and agree exactly."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("keras")

from app.preprocessing import InputSpec
from training.model import ModelSpec, build_classifier, build_inference_model


@pytest.mark.parametrize("normalization", ["group", "batch", "none"])
def test_heatmap_mean_log_odds_equals_image_log_odds(normalization: str) -> None:
    spec = InputSpec(64, 32, "rgb")
    classifier = build_classifier(
        spec, ModelSpec(filters=(4, 4, 8, 8, 8), normalization=normalization)
    )
    temperature = 1.7
    model = build_inference_model(classifier, temperature)
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 64, 3)).astype(np.float32)
    out = model(images, training=False)
    probabilities = np.asarray(out["probabilities"], dtype=np.float64)
    heatmap = np.asarray(out["heatmap"], dtype=np.float64)
    assert probabilities.shape == (3, 2)
    assert heatmap.shape == (3, 2, 4)  # stride 16
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    cell_log_odds = np.log(heatmap / (1 - heatmap))
    image_log_odds = np.log(probabilities[:, 1] / probabilities[:, 0])
    np.testing.assert_allclose(cell_log_odds.mean(axis=(1, 2)), image_log_odds, atol=1e-4)
    logits = np.asarray(classifier(images, training=False), dtype=np.float64)
    np.testing.assert_allclose(
        (logits[:, 1] - logits[:, 0]) / temperature, image_log_odds, atol=1e-4
    )


def test_rejects_sizes_that_do_not_tile() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        build_classifier(InputSpec(70, 32))
