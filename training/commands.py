"""The three CLI commands, wiring data loading, CV, final fit and export together."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import keras
import numpy as np

from app.preprocessing import InputSpec, preprocess_bytes
from training.data import Dataset, load_dataset
from training.fit import FitConfig
from training.model import ModelSpec
from training.pipeline import (
    CARD_FILE,
    CHECKPOINT_DIR,
    REPORT_FILE,
    RunConfig,
    cross_validate,
    dataset_summary,
    export_model,
    fit_final,
    pick_golden,
)

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
PARITY_IMAGES = 64


def _run_config(args: argparse.Namespace) -> RunConfig:
    spec = InputSpec(args.width, args.height, args.color_mode)
    filters = tuple(int(f) for f in str(args.filters).split(","))
    return RunConfig(
        input_spec=spec,
        model_spec=ModelSpec(filters=filters),
        fit=FitConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            patience=args.patience,
            seed=args.seed,
            augment=not args.no_augment,
            verbose=0 if args.quiet else (1 if sys.stdout.isatty() else 2),
        ),
        val_fraction=args.val_fraction,
        min_recall=args.min_recall,
        breakdown_columns=tuple(args.breakdown),
        balance_by=args.balance_by,
    )


def _load(args: argparse.Namespace, config: RunConfig) -> Dataset:
    data = load_dataset(
        args.data,
        config.input_spec,
        (args.normal_dir, args.defect_dir),
        manifest=args.manifest,
        group_column=args.group_column,
        group_regex=args.group_regex,
        max_bad_fraction=args.max_bad_fraction,
    )
    if args.limit_per_class:
        keep = np.concatenate(
            [np.flatnonzero(data.labels == c)[: args.limit_per_class] for c in (0, 1)]
        )
        data = data.subset(np.sort(keep))
    log.info(
        "dataset: %s, %d groups (%s), %d skipped",
        data.counts(),
        len(np.unique(data.groups)),
        data.group_source,
        len(data.skipped),
    )
    return data


def _config_dict(config: RunConfig) -> dict[str, Any]:
    return {
        "input": asdict(config.input_spec),
        "model": asdict(config.model_spec),
        "fit": asdict(config.fit),
        "val_fraction": config.val_fraction,
        "balance_by": config.balance_by,
        "min_recall": config.min_recall,
    }


def _headline(cv: dict[str, Any] | None, final: dict[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"final_validation": final["validation"]}
    if cv is not None:
        metrics["cross_validation"] = {
            "mean_roc_auc": cv["mean_roc_auc"],
            "min_roc_auc": cv["min_roc_auc"],
            "pooled_out_of_fold_roc_auc": cv["pooled_out_of_fold"]["at_0.5"]["roc_auc"],
            "pooled_out_of_fold_at_balanced": {
                k: cv["pooled_out_of_fold"]["at_balanced"].get(k)
                for k in ("precision", "recall", "f1", "accuracy", "confusion_matrix")
            },
            "folds": len(cv["folds"]),
        }
    return metrics


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    config = _run_config(args)
    data = _load(args, config)
    args.out.mkdir(parents=True, exist_ok=True)
    cv = cross_validate(data, args.cv_folds, config, args.out)
    report = {
        "dataset": dataset_summary(data, str(args.data), None),
        "config": _config_dict(config),
        "cross_validation": cv,
    }
    (args.out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return {
        "report": str(args.out / REPORT_FILE),
        "mean_roc_auc": cv["mean_roc_auc"],
        "min_roc_auc": cv["min_roc_auc"],
        "pooled_roc_auc": cv["pooled_out_of_fold"]["at_0.5"]["roc_auc"],
    }


def train(args: argparse.Namespace) -> dict[str, Any]:
    config = _run_config(args)
    data = _load(args, config)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cv = cross_validate(data, args.cv_folds, config, out) if args.cv_folds else None
    result, final = fit_final(data, config, out)
    name = args.name or out.resolve().name
    summary = dataset_summary(data, args.source or str(args.data), args.licence or None)
    val = result.val_index
    golden = pick_golden(data, val)
    parity = val[:PARITY_IMAGES]
    metrics = _headline(cv, final)
    state: dict[str, Any] = {
        "name": name,
        "description": "normal/defect classifier with defect heatmap trained on "
        + str(summary["source"]),
        "config": _config_dict(config),
        "class_names": data.class_names,
        "temperature": result.temperature,
        "operating_points": result.points,
        "metrics": metrics,
        "training_data": summary,
        "data_root": str(Path(args.data).resolve()),
        "golden_files": [data.files[i] for i in golden],
        "golden_labels": [int(data.labels[i]) for i in golden],
        "parity_files": [data.files[i] for i in parity],
    }
    (out / CHECKPOINT_DIR / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    card = export_model(
        name=name,
        description=state["description"],
        classifier=result.classifier,
        temperature=result.temperature,
        points=result.points,
        data=data,
        golden_index=golden,
        parity_index=parity,
        config=config,
        metrics=metrics,
        training_data=summary,
        out_dir=out,
        data_root=Path(args.data).resolve(),
    )
    report = {
        "dataset": summary,
        "config": _config_dict(config),
        "cross_validation": cv,
        "final": final,
        "export": {
            "onnx": card["onnx"],
            "parity_max_abs_diff": card["metrics"]["parity_max_abs_diff"],
        },
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return {
        "model": str(out / "model.onnx"),
        "card": str(out / CARD_FILE),
        **metrics["final_validation"],
        **({"cv": metrics["cross_validation"]} if cv else {}),
    }


def _merge_cv(out: Path, state: dict[str, Any], cv_report: Path) -> None:
    """Put an ``evaluate`` run's cross-validation figures into the state, card and report."""
    cv = json.loads(cv_report.read_text())["cross_validation"]
    prefix = cv_report.parent.resolve().relative_to(out.resolve()).as_posix() + "/"
    cv["plots"] = {k: prefix + v for k, v in cv["plots"].items()}
    state["metrics"] = _headline(cv, {"validation": state["metrics"]["final_validation"]})
    state["metrics"]["cross_validation"]["report"] = prefix + REPORT_FILE
    report_path = out / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["cross_validation"] = cv
    report_path.write_text(json.dumps(report, indent=2) + "\n")


def export(args: argparse.Namespace) -> dict[str, Any]:
    """Rebuild ONNX + card from ``checkpoint/`` (after a tf2onnx upgrade, or to add CV figures)."""
    out: Path = args.model_dir
    state = json.loads((out / CHECKPOINT_DIR / STATE_FILE).read_text())
    if args.cv_report is not None:
        _merge_cv(out, state, args.cv_report)
        (out / CHECKPOINT_DIR / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    cfg = state["config"]
    spec = InputSpec(**cfg["input"])
    config = RunConfig(
        input_spec=spec,
        model_spec=ModelSpec(**{**cfg["model"], "filters": tuple(cfg["model"]["filters"])}),
    )
    root = Path(state["data_root"])
    files = state["golden_files"] + state["parity_files"]
    labels = state["golden_labels"] + [0] * len(state["parity_files"])
    images = np.stack(
        [
            np.clip(np.rint(preprocess_bytes((root / f).read_bytes(), spec)), 0, 255).astype(
                np.uint8
            )
            for f in files
        ]
    )
    data = Dataset(
        images=images,
        labels=np.array(labels),
        files=files,
        groups=np.array(files),
        class_names=state["class_names"],
    )
    classifier = keras.saving.load_model(out / CHECKPOINT_DIR / "classifier.keras")
    n_golden = len(state["golden_files"])
    card = export_model(
        name=state["name"],
        description=state["description"],
        classifier=classifier,
        temperature=state["temperature"],
        points=state["operating_points"],
        data=data,
        golden_index=np.arange(n_golden),
        parity_index=np.arange(n_golden, len(files)),
        config=config,
        metrics=state["metrics"],
        training_data=state["training_data"],
        out_dir=out,
        data_root=root,
    )
    report_path = out / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["export"] = {
        "onnx": card["onnx"],
        "parity_max_abs_diff": card["metrics"]["parity_max_abs_diff"],
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return {"model": str(out / "model.onnx"), "sha256": card["onnx"]["sha256"]}
