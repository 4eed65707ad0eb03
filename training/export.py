"""ONNX export through tf2onnx with a parity gate against Keras on real images."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx

from training.onnx_rewrite import rewrite_group_norms

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("probabilities", "heatmap")
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The ONNX graph does not reproduce the Keras model; nothing may be shipped."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(inference_model: keras.Model, path: Path) -> None:
    """Convert with a dynamic batch axis and the contract's input/output names."""
    shape = (None, *inference_model.input_shape[1:])
    signature = (tf.TensorSpec(shape, tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=signature)  # type: ignore[untyped-decorator]
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = inference_model(image, training=False)
        return {name: tf.identity(outputs[name], name=name) for name in OUTPUT_NAMES}

    model_proto, _ = tf2onnx.convert.from_function(
        serve, input_signature=signature, opset=OPSET, output_path=None
    )
    names = [o.name for o in model_proto.graph.output]
    rename = {old: new for old, new in zip(names, _match_outputs(names), strict=True)}
    for node in model_proto.graph.node:
        node.output[:] = [rename.get(o, o) for o in node.output]
    for output in model_proto.graph.output:
        output.name = rename[output.name]
    rewritten, replaced = rewrite_group_norms(model_proto.SerializeToString())
    if replaced:
        log.info("rewrote %d group norms as InstanceNormalization", replaced)
        model_proto = onnx.load_from_string(rewritten)
    for value in [*model_proto.graph.input, *model_proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    onnx.checker.check_model(model_proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model_proto, str(path))


def _match_outputs(names: list[str]) -> list[str]:
    """Map tf2onnx's output names (``Identity:0`` style or ours) to the contract's names."""
    matched = []
    for name in names:
        candidates = [n for n in OUTPUT_NAMES if n in name]
        if len(candidates) != 1:
            raise ExportError(f"cannot map ONNX output {name!r} to {OUTPUT_NAMES}")
        matched.append(candidates[0])
    return matched


def embed_card(path: Path, card: dict[str, Any]) -> None:
    """Store the card in ``metadata_props`` so the ONNX file describes itself."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in {
        "model_card": json.dumps(card, sort_keys=True),
        "name": str(card.get("name", "")),
        "version": str(card.get("version", "")),
        "class_names": json.dumps(card.get("class_names", [])),
    }.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "defect-inspection training (tf2onnx)"
    model.doc_string = str(card.get("description", ""))
    onnx.save(model, str(path))


def onnx_outputs(path: Path, images: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts: dict[str, list[np.ndarray]] = {n: [] for n in OUTPUT_NAMES}
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size].astype(np.float32)
        for name, value in zip(
            OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch}), strict=True
        ):
            parts[name].append(np.asarray(value))
    return {n: np.concatenate(v) for n, v in parts.items()}


def keras_outputs(
    model: keras.Model, images: np.ndarray, batch_size: int = 32
) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {n: [] for n in OUTPUT_NAMES}
    for i in range(0, len(images), batch_size):
        outputs = model(images[i : i + batch_size].astype(np.float32), training=False)
        for name in OUTPUT_NAMES:
            parts[name].append(np.asarray(outputs[name]))
    return {n: np.concatenate(v) for n, v in parts.items()}


def parity_check(
    inference_model: keras.Model,
    path: Path,
    images: np.ndarray,
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, float]:
    """Max abs difference per output on real images; raises ``ExportError`` above tolerance."""
    expected = keras_outputs(inference_model, images)
    actual = onnx_outputs(path, images)
    diffs = {n: float(np.max(np.abs(expected[n] - actual[n]))) for n in OUTPUT_NAMES}
    log.info("parity on %d images: %s", len(images), diffs)
    worst = max(diffs.values())
    if not np.isfinite(worst) or worst > tolerance:
        raise ExportError(
            f"ONNX and Keras disagree on {len(images)} validation images: max abs diff {diffs} > "
            f"{tolerance}; the export is rejected"
        )
    return diffs
