"""End to end: a tiny real subset trains for one epoch, exports, passes the parity gate, and the
ONNX file, its embedded card and the golden samples agree (the contract the service relies on)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

import onnx
import onnxruntime as ort
from PIL import Image, ImageDraw

from app.preprocessing import InputSpec, preprocess_bytes
from training.cli import main

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ballscrew-pitting"

pytestmark = pytest.mark.slow


def _check_model_dir(out: Path, spec: InputSpec) -> dict[str, Any]:
    card: dict[str, Any] = json.loads((out / "model_card.json").read_text())
    model_path = out / card["onnx"]["file"]
    assert card["onnx"]["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert card["onnx"]["opset"] == 17
    assert model_path.stat().st_size < 5 * 1024 * 1024
    assert max(card["metrics"]["parity_max_abs_diff"].values()) <= 1e-4
    assert card["input"]["shape"] == [None, spec.height, spec.width, spec.channels]
    assert set(card["operating_points"]) >= {"default", "balanced", "high_recall"}
    assert card["calibration"]["temperature"] > 0
    assert {"tensorflow-cpu", "keras", "tf2onnx", "onnx"} <= set(card["versions"])

    proto = onnx.load(str(model_path))
    embedded = json.loads({p.key: p.value for p in proto.metadata_props}["model_card"])
    assert embedded["version"] == card["version"]
    assert "onnx" not in embedded  # a file cannot hold its own hash
    assert [i.name for i in proto.graph.input] == ["image"]
    # Group norms were rewritten into onnxruntime's fast InstanceNormalization form.
    assert "InstanceNormalization" in {node.op_type for node in proto.graph.node}
    assert sorted(o.name for o in proto.graph.output) == ["heatmap", "probabilities"]

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    assert card["golden_samples"]
    for sample in card["golden_samples"]:
        raw = (out / sample["file"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == sample["sha256"]
        batch = preprocess_bytes(raw, spec)[np.newaxis]
        probabilities, heatmap = session.run(["probabilities", "heatmap"], {"image": batch})
        np.testing.assert_allclose(
            probabilities[0], sample["probabilities"], atol=sample["tolerance"]
        )
        assert probabilities[0].sum() == pytest.approx(1.0, abs=1e-5)
        h, w = card["outputs"]["heatmap"]["shape"][1:]
        assert heatmap.shape == (1, h, w)
        assert 0.0 <= heatmap.min() <= heatmap.max() <= 1.0
    # Dynamic batch axis: a batch of 3 works and equals three single runs.
    batch = np.stack(
        [preprocess_bytes((out / s["file"]).read_bytes(), spec) for s in card["golden_samples"][:3]]
    )
    together = session.run(["probabilities"], {"image": batch})[0]
    for i in range(len(batch)):
        alone = session.run(["probabilities"], {"image": batch[i : i + 1]})[0][0]
        np.testing.assert_allclose(together[i], alone, atol=1e-5)
    return card


@pytest.mark.skipif(not DATA.is_dir(), reason=f"development data not found at {DATA}")
def test_train_export_on_real_subset(tmp_path: Path) -> None:
    out = tmp_path / "model"
    spec = InputSpec(192, 80, "rgb")
    code = main(
        [
            "train",
            "--data",
            str(DATA),
            "--out",
            str(out),
            "--group-column",
            "location",
            "--breakdown",
            "capture",
            "--balance-by",
            "capture",
            "--cv-folds",
            "2",
            "--epochs",
            "1",
            "--limit-per-class",
            "30",
            "--width",
            str(spec.width),
            "--height",
            str(spec.height),
            "--quiet",
            "--licence",
            "CC BY-SA 4.0",
        ]
    )
    assert code == 0
    card = _check_model_dir(out, spec)
    assert card["training_data"]["grouped_by"] == "manifest column 'location'"
    report = json.loads((out / "report.json").read_text())
    assert len(report["cross_validation"]["folds"]) == 2
    assert set(report["cross_validation"]["breakdown"]["capture"]) <= {"crop_1", "crop_2"}
    for plot in ("roc", "pr", "confusion", "reliability"):
        assert (out / report["final"]["plots"][plot]).is_file()
        assert (out / "plots" / "cv" / f"{plot}.png").is_file()
    for fold in report["cross_validation"]["folds"]:
        assert not set(fold["test_groups"]) & set(fold["validation_groups"])

    # A separate grouped CV run, merged into the card by a re-export from the checkpoint; the
    # re-exported graph gives the same predictions.
    cv_dir = out / "cv"
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(DATA),
                "--out",
                str(cv_dir),
                "--group-column",
                "location",
                "--cv-folds",
                "2",
                "--epochs",
                "1",
                "--limit-per-class",
                "30",
                "--quiet",
                "--width",
                str(spec.width),
                "--height",
                str(spec.height),
            ]
        )
        == 0
    )
    before = card["golden_samples"]
    assert (
        main(["export", "--model-dir", str(out), "--cv-report", str(cv_dir / "report.json")]) == 0
    )
    merged = _check_model_dir(out, spec)
    assert merged["metrics"]["cross_validation"]["report"] == "cv/report.json"
    for a, b in zip(before, merged["golden_samples"], strict=True):
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["onnx"]["sha256"] == merged["onnx"]["sha256"]
    assert (out / report["cross_validation"]["plots"]["roc"]).is_file()


def _synthetic_grayscale_product(root: Path, n: int = 24) -> None:
    """Another product: square grayscale photos, no manifest, parts named part<k>_<i>.png."""
    rng = np.random.default_rng(0)
    for label in ("good", "bad"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            base = rng.normal(128, 12, (120, 120)).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(base, mode="L")
            if label == "bad":
                x, y = rng.integers(10, 100, 2)
                ImageDraw.Draw(image).ellipse([x, y, x + 12, y + 12], fill=20)
            image.save(root / label / f"part{i % 6}_{i}.png")


def test_other_dataset_grayscale_without_manifest(tmp_path: Path) -> None:
    data = tmp_path / "bracket"
    _synthetic_grayscale_product(data)
    out = tmp_path / "bracket-model"
    spec = InputSpec(64, 64, "grayscale")
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--normal-dir",
            "good",
            "--defect-dir",
            "bad",
            "--group-regex",
            r"^(part\d+)_",
            "--color-mode",
            "grayscale",
            "--width",
            "64",
            "--height",
            "64",
            "--epochs",
            "1",
            "--val-fraction",
            "0.34",
            "--quiet",
        ]
    )
    assert code == 0
    card = _check_model_dir(out, spec)
    assert card["class_names"] == ["good", "bad"]
    assert card["training_data"]["n_groups"] == 6


def test_cli_reports_dataset_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "normal").mkdir()
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--quiet"])
    assert code == 2
    assert "class folder" in capsys.readouterr().err
