"""Fit one model on a training split with early stopping on a grouped validation split."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from app.preprocessing import InputSpec
from training.model import ModelSpec, build_classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 2e-3
    patience: int = 8
    label_smoothing: float = 0.0
    seed: int = 42
    augment: bool = True
    ema: bool = True
    verbose: int = 1  # 1 = Keras progress bar


def set_seed(seed: int) -> None:
    """Same seed, same data order and initial weights (bit-exactness is not promised on CPU)."""
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    keras.utils.set_random_seed(seed)


def augmentation(seed: int) -> keras.Sequential:
    """Photometric and geometric jitter for the input pipeline, never in the exported graph."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal_and_vertical", seed=seed),
            keras.layers.RandomTranslation(0.05, 0.03, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomBrightness(0.15, value_range=(0.0, 255.0), seed=seed + 2),
            keras.layers.RandomContrast(0.2, value_range=(0.0, 255.0), seed=seed + 3),
        ],
        name="augmentation",
    )


def balanced_sample_weights(labels: np.ndarray, strata: np.ndarray | None = None) -> np.ndarray:
    """Per-image loss weights that balance the classes *within* each stratum.

    Without strata this is the usual balanced class weighting. With strata (e.g. the capture
    set-up), each stratum keeps its share of the total weight but its two classes weigh the same,
    so a stratum that is mostly defect (a framing, a camera, a shift) carries no label
    information a model could learn as a shortcut instead of the defect itself.
    """
    labels = np.asarray(labels)
    strata = np.zeros(len(labels), dtype=np.int64) if strata is None else np.asarray(strata)
    weights = np.zeros(len(labels), dtype=np.float64)
    for value in np.unique(strata):
        in_stratum = strata == value
        present = np.unique(labels[in_stratum])
        for label in present:
            cell = in_stratum & (labels == label)
            weights[cell] = in_stratum.sum() / (len(present) * cell.sum())
    weights *= len(labels) / weights.sum()
    return weights.astype(np.float32)


def _dataset(
    images: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    batch_size: int,
    shuffle: bool,
    seed: int,
    augmenter: keras.Sequential | None,
) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((images, labels, weights))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y, w: (tf.cast(x, tf.float32), y, w))
    if augmenter is not None:
        ds = ds.map(
            lambda x, y, w: (augmenter(x, training=True), y, w),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def fit_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    input_spec: InputSpec,
    model_spec: ModelSpec,
    config: FitConfig,
    train_strata: np.ndarray | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train from scratch; keep the weights of the epoch with the lowest validation loss."""
    set_seed(config.seed)
    model = build_classifier(input_spec, model_spec)
    steps = config.epochs * int(np.ceil(len(train_labels) / config.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=steps, alpha=0.05
    )
    # Exponential moving average of the weights: the validation loss of a small grouped split jumps
    # from epoch to epoch; averaging the weights smooths out that noise, and early stopping then
    # picks a model that is good, not one that was lucky on one epoch.
    optimizer = keras.optimizers.Adam(schedule, use_ema=config.ema, ema_momentum=0.98)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing
        ),
        metrics=[keras.metrics.AUC(name="auc", from_logits=False)],
    )
    augmenter = augmentation(config.seed) if config.augment else None

    def onehot(y: np.ndarray) -> np.ndarray:
        encoded: np.ndarray = np.eye(2, dtype=np.float32)[y]
        return encoded

    train_weights = balanced_sample_weights(train_labels, train_strata)
    train_ds = _dataset(
        train_images,
        onehot(train_labels),
        train_weights,
        config.batch_size,
        True,
        config.seed,
        augmenter,
    )
    val_ds = _dataset(
        val_images,
        onehot(val_labels),
        np.ones(len(val_labels), np.float32),
        config.batch_size,
        False,
        config.seed,
        None,
    )
    early = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=config.patience, restore_best_weights=True, verbose=0
    )
    callbacks: list[keras.callbacks.Callback] = [early]
    if config.ema:
        # Evaluate (and let early stopping judge) the averaged weights; keep them at the end.
        callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        callbacks=callbacks,
        verbose=config.verbose,
        shuffle=False,  # the tf.data pipeline shuffles; Keras would ignore (and warn about) True
    )
    return model, {k: [float(v) for v in vals] for k, vals in history.history.items()}


def predict_logits(model: keras.Model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits in inference mode (BN running statistics, no dropout), batched to bound memory."""
    out = [
        np.asarray(model(images[i : i + batch_size].astype(np.float32), training=False))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).astype(np.float64)
