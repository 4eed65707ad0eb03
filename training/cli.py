"""Command line: ``python -m training train|evaluate|export`` (console script ``defect-train``).

Kept import-light: TensorFlow is imported only once a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Train a defect classifier from a folder of part photos and export it for the service.

The data folder needs one sub-folder per class (default: normal/ and defect/) with JPEG, PNG,
BMP, TIFF or WebP images of any size and colour mode. An optional manifest.csv (column 'file' =
path relative to the folder) can name a group per image (--group-column), e.g. the part or spot
photographed: images of one group are never split between training and evaluation.

  train     cross-validate (optional), fit the final model, calibrate, export ONNX + card
  evaluate  grouped k-fold cross-validation only: an honest report, no model written
  export    re-export ONNX + card from a checkpoint written by 'train'
"""

EXAMPLES = """\
examples:
  python -m training train --data ../shared/data/ballscrew-pitting --out models/ballscrew-pitting \\
      --group-column location --breakdown capture --cv-folds 5
  python -m training train --data ~/photos/bracket --out models/bracket --color-mode grayscale \\
      --width 256 --height 256 --group-regex '^(part\\d+)_'
  python -m training evaluate --data ~/photos/bracket --out runs/bracket-cv --cv-folds 5
"""


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, required=True, help="folder with one sub-folder per class")
    g.add_argument(
        "--normal-dir", default="normal", help="sub-folder of good parts (default: normal)"
    )
    g.add_argument(
        "--defect-dir", default="defect", help="sub-folder of defective parts (default: defect)"
    )
    g.add_argument(
        "--manifest",
        type=Path,
        help="CSV with a 'file' column (default: DATA/manifest.csv if present)",
    )
    g.add_argument(
        "--group-column", help="manifest column naming the group of each image (e.g. location)"
    )
    g.add_argument("--group-regex", help="regex over file names whose first group is the group id")
    g.add_argument(
        "--breakdown",
        nargs="*",
        default=[],
        metavar="COLUMN",
        help="manifest columns to report metrics for separately (e.g. capture)",
    )
    g.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.05,
        help="fail if more than this fraction of files is unreadable (default: 0.05)",
    )
    g.add_argument(
        "--limit-per-class",
        type=int,
        default=0,
        help="use only the first N images of each class (smoke tests)",
    )
    m = p.add_argument_group("model input")
    m.add_argument(
        "--width",
        type=int,
        default=384,
        help="input width in pixels, multiple of 16 (default: 384)",
    )
    m.add_argument(
        "--height",
        type=int,
        default=160,
        help="input height in pixels, multiple of 16 (default: 160)",
    )
    m.add_argument("--color-mode", choices=["rgb", "grayscale"], default="rgb")
    t = p.add_argument_group("training")
    t.add_argument(
        "--epochs", type=int, default=40, help="maximum epochs (early stopping on validation loss)"
    )
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--learning-rate", type=float, default=2e-3)
    t.add_argument("--patience", type=int, default=8, help="early-stopping patience in epochs")
    t.add_argument("--filters", default="8,16,32,64,96", help="filters of the 5 conv blocks")
    t.add_argument(
        "--no-augment", action="store_true", help="disable flips/shifts/brightness/contrast"
    )
    t.add_argument(
        "--val-fraction", type=float, default=0.2, help="share of groups held out for validation"
    )
    t.add_argument(
        "--min-recall", type=float, default=0.99, help="recall of the 'high_recall' operating point"
    )
    t.add_argument(
        "--balance-by",
        metavar="COLUMN",
        help="manifest column (e.g. capture) within whose values the classes are weighted "
        "equally, so that a set-up that is mostly defect cannot become a shortcut",
    )
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--threads", type=int, default=0, help="TensorFlow threads (default: all available)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="fit, calibrate and export a model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_args(train)
    train.add_argument("--out", type=Path, required=True, help="output folder, e.g. models/NAME")
    train.add_argument("--name", help="model name (default: the output folder's name)")
    train.add_argument(
        "--cv-folds", type=int, default=0, help="also run grouped k-fold CV first (0 = skip)"
    )
    train.add_argument("--source", default="", help="where the data comes from (for the card)")
    train.add_argument("--licence", default="", help="licence of the training data (for the card)")
    evaluate = sub.add_parser(
        "evaluate",
        help="grouped k-fold cross-validation report only",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_args(evaluate)
    evaluate.add_argument(
        "--out", type=Path, required=True, help="folder for report.json and plots"
    )
    evaluate.add_argument("--cv-folds", type=int, default=5)
    export = sub.add_parser("export", help="re-export ONNX + card from a 'train' output folder")
    export.add_argument("--model-dir", type=Path, required=True, help="a folder written by 'train'")
    export.add_argument(
        "--cv-report",
        type=Path,
        help="report.json of an 'evaluate' run (inside the model folder) to add to the card",
    )
    return parser


def _configure(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if getattr(args, "threads", 0):
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure(args)
    from training import commands
    from training.calibration import CalibrationError
    from training.data import DatasetError
    from training.export import ExportError
    from training.splits import SplitError

    handlers: dict[str, Any] = {
        "train": commands.train,
        "evaluate": commands.evaluate,
        "export": commands.export,
    }
    try:
        summary = handlers[args.command](args)
    except (DatasetError, SplitError, CalibrationError, ExportError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
