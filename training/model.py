"""The CNN: conv → ReLU → max-pool blocks, a per-cell dense head, global average pooling.

The dense layer is applied to every cell of the last feature map *before* the global average, so
its output is a class activation map; averaging it gives exactly the image's logits (the dense
layer is linear). One forward pass therefore yields both the verdict and where it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

from app.preprocessing import InputSpec

HEATMAP_STRIDE = 16


@dataclass(frozen=True)
class ModelSpec:
    """Architecture knobs; defaults suit wide images with small defects on 2 CPU cores."""

    filters: tuple[int, ...] = (16, 32, 48, 64, 96)
    # "group" (default), "batch" or "none". Batch norm behaves differently in training and
    # inference: with a few hundred steps of small, augmented batches its moving statistics never
    # settle, and validation AUC jumped between 0.35 and 0.99 from epoch to epoch here (and the
    # first baseline's probabilities all fell below 0.001). Group norm computes the same thing at
    # training and inference time, so what early stopping and calibration see is what ships.
    normalization: str = "group"
    groups: int = 4
    bn_momentum: float = 0.9
    dropout: float = 0.3
    weight_decay: float = 1e-4


def build_classifier(input_spec: InputSpec, spec: ModelSpec = ModelSpec()) -> keras.Model:
    """Training model: raw pixels in, 2 logits out (``local_logits`` layer is the CAM)."""
    if input_spec.height % HEATMAP_STRIDE or input_spec.width % HEATMAP_STRIDE:
        raise ValueError(f"input height and width must be multiples of {HEATMAP_STRIDE}")
    if len(spec.filters) != 5:
        raise ValueError("the heatmap stride of 16 needs exactly 5 conv blocks (4 poolings)")
    regularizer = keras.regularizers.L2(spec.weight_decay) if spec.weight_decay else None
    inputs = keras.Input(
        shape=(input_spec.height, input_spec.width, input_spec.channels), name="image"
    )
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(inputs)
    for block, filters in enumerate(spec.filters, start=1):
        x = layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=spec.normalization == "none",
            kernel_initializer="he_normal",
            kernel_regularizer=regularizer,
            name=f"block{block}_conv",
        )(x)
        if spec.normalization == "batch":
            x = layers.BatchNormalization(momentum=spec.bn_momentum, name=f"block{block}_bn")(x)
        elif spec.normalization == "group":
            x = layers.GroupNormalization(min(spec.groups, filters), name=f"block{block}_gn")(x)
        elif spec.normalization != "none":
            raise ValueError(f"unknown normalization {spec.normalization!r}")
        x = layers.ReLU(name=f"block{block}_relu")(x)
        if block < len(spec.filters):
            x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    x = layers.Dropout(spec.dropout, name="head_dropout")(x)
    local_logits = layers.Dense(2, kernel_regularizer=regularizer, name="local_logits")(x)
    logits = layers.GlobalAveragePooling2D(name="logits")(local_logits)
    return keras.Model(inputs, logits, name="defect_cnn")


def build_inference_model(classifier: keras.Model, temperature: float) -> keras.Model:
    """Export model: calibrated ``probabilities`` [N, 2] and a defect ``heatmap`` [N, h, w].

    The heatmap cell value is ``sigmoid((local_defect - local_normal) / T)``: the calibrated
    defect probability the model would give if the whole image looked like that cell.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    inputs = classifier.input
    logits = classifier.output
    local_logits = classifier.get_layer("local_logits").output
    scaled = layers.Rescaling(1.0 / temperature, name="temperature")(logits)
    probabilities = layers.Softmax(name="probabilities")(scaled)
    contrast = layers.Dense(1, use_bias=False, trainable=False, name="defect_minus_normal")
    difference = contrast(local_logits)
    contrast.set_weights(
        [keras.ops.convert_to_numpy(keras.ops.array([[-1.0], [1.0]])) / temperature]
    )
    heat = layers.Activation("sigmoid", name="heat")(difference)
    height, width = int(local_logits.shape[1]), int(local_logits.shape[2])
    heatmap = layers.Reshape((height, width), name="heatmap")(heat)
    return keras.Model(
        inputs, {"probabilities": probabilities, "heatmap": heatmap}, name="defect_cnn_inference"
    )
