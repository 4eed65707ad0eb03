"""The naive baseline: the trained Keras model behind a minimal FastAPI endpoint.

What the classic tutorial stack does: decode the upload with Pillow, call Keras once per
request, return JSON. No batching, no ONNX. It serves the *same* trained model as the service
(``checkpoint/classifier.keras`` wrapped with the card's temperature by
``training.model.build_inference_model``, so it computes the same probabilities and heatmap) and
preprocesses with the same ``app.preprocessing`` code, so the comparison is about the serving
stack and runtime, not about different work. Three ways to call Keras, one route each:

* ``/predict/call``      ``model(x, training=False)`` (eager),
* ``/predict/function``  a ``tf.function`` with a fixed input signature (traced once at start),
* ``/predict/predict``   ``model.predict(x)`` (the tutorial's favourite, with per-call overhead).

Routes are plain ``def`` (FastAPI's thread pool), the way FastAPI's docs say to run blocking
code. TensorFlow's intra-op threads are set to ``NAIVE_THREADS`` (the service's onnxruntime
thread count). Run: ``NAIVE_MODEL_DIR=models/ballscrew-pitting uvicorn
bench.naive_server:create_app --factory``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from fastapi import FastAPI, File, HTTPException, UploadFile

from app.preprocessing import ImageError, InputSpec, enable_block_cache, preprocess_bytes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO / "models" / "ballscrew-pitting"
CHECKPOINT = Path("checkpoint") / "classifier.keras"

Call = Literal["call", "function", "predict"]


def create_app() -> FastAPI:
    """Load TF + the Keras checkpoint once, warm every call style, serve."""
    model_dir = Path(os.environ.get("NAIVE_MODEL_DIR", str(DEFAULT_MODEL_DIR)))
    threads = int(os.environ.get("NAIVE_THREADS", "0"))

    import keras
    import tensorflow as tf

    from training.model import build_inference_model

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    card = json.loads((model_dir / "model_card.json").read_text())
    spec = InputSpec(
        width=card["input"]["width"],
        height=card["input"]["height"],
        color_mode=card["input"]["color_mode"],
    )
    enable_block_cache(8)  # the service's Pillow setting: the comparison is about serving
    class_names: list[str] = card["class_names"]
    defect_index = class_names.index(card["defect_class"])
    other_index = next(i for i in range(len(class_names)) if i != defect_index)
    threshold = float(card["operating_points"][card["default_operating_point"]]["threshold"])
    classifier = keras.saving.load_model(model_dir / CHECKPOINT, compile=False)
    model = build_inference_model(classifier, float(card["calibration"]["temperature"]))
    signature = [tf.TensorSpec([None, spec.height, spec.width, spec.channels], tf.float32)]
    function = tf.function(lambda x: model(x, training=False), input_signature=signature)

    def probabilities(call: Call, x: np.ndarray) -> np.ndarray:
        if call == "predict":
            outputs: Any = model.predict(x, verbose=0)
        elif call == "function":
            outputs = function(x)
        else:
            outputs = model(x, training=False)
        result: np.ndarray = np.asarray(outputs["probabilities"])[0]
        return result

    warm = np.zeros((1, spec.height, spec.width, spec.channels), np.float32)
    for call in ("call", "function", "predict"):
        for _ in range(2):
            probabilities(call, warm)  # type: ignore[arg-type]

    app = FastAPI(title="Naive Keras baseline")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready", "tensorflow": tf.__version__, "keras": keras.__version__}

    @app.post("/predict/{call}")
    def predict(call: Call, file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        try:
            x = preprocess_bytes(file.file.read(), spec)[np.newaxis]
        except ImageError as exc:
            raise HTTPException(400, str(exc)) from exc
        probs = probabilities(call, x)
        defect = float(probs[defect_index])
        return {
            "label": class_names[defect_index if defect >= threshold else other_index],
            "defect_probability": defect,
            "probabilities": dict(zip(class_names, probs.tolist(), strict=True)),
        }

    return app
