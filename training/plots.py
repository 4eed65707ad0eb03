"""PNG plots next to the model: ROC, precision-recall, confusion matrix, reliability diagram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from training.metrics import reliability_curve


def write_plots(
    labels: np.ndarray, scores: np.ndarray, threshold: float, out_dir: Path, title: str
) -> dict[str, str]:
    """Write the four plots; returns ``{kind: path}`` relative to the model folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels).astype(int)
    files: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    fpr, tpr, _ = roc_curve(labels, scores)
    ax.plot(fpr, tpr, lw=2)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC — {title}")
    files["roc"] = _save(fig, out_dir / "roc.png")

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    precision, recall, _ = precision_recall_curve(labels, scores)
    ax.plot(recall, precision, lw=2)
    ax.axhline(labels.mean(), ls="--", c="grey", lw=1)
    ax.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02), title=f"Precision-recall — {title}")
    files["pr"] = _save(fig, out_dir / "pr.png")

    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    predicted = scores >= threshold
    matrix = np.array(
        [
            [np.sum(~predicted & (labels == 0)), np.sum(predicted & (labels == 0))],
            [np.sum(~predicted & (labels == 1)), np.sum(predicted & (labels == 1))],
        ]
    )
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            fontsize=14,
            color="white" if value > matrix.max() / 2 else "black",
        )
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["normal", "defect"],
        yticklabels=["normal", "defect"],
        xlabel="predicted",
        ylabel="true",
        title=f"Confusion @ {threshold:.3f}",
    )
    files["confusion"] = _save(fig, out_dir / "confusion.png")

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    curve: dict[str, Any] = reliability_curve(labels, scores)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.plot(curve["mean_predicted"], curve["fraction_defect"], marker="o", lw=2)
    ax.set(
        xlabel="predicted defect probability",
        ylabel="observed defect fraction",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"Reliability — {title}",
    )
    files["reliability"] = _save(fig, out_dir / "reliability.png")
    root = out_dir.parent.parent  # plots live in <model dir>/plots/<set>/
    return {k: (out_dir / v).relative_to(root).as_posix() for k, v in files.items()}


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name
