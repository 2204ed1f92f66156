"""Local training and evaluation on a model that is built once per process.

Building, compiling and tracing a Keras model costs far more than a few local
epochs on a client's data; rebuilding it on every call is what makes the
usual Flower + Keras pattern slow. One compiled model per (architecture,
process) is kept here and only its weights change between calls. Plain SGD
without momentum has no optimiser state, so no state leaks from one client to
the next when they share a worker process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .models import build_model
from .weights import get_weights

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from data.dataset import LabeledData


@dataclass(frozen=True)
class ModelSpec:
    """What identifies a model's architecture; the cache key."""

    kind: str
    input_shape: tuple[int, ...]
    num_classes: int
    seed: int = 0
    architecture: str = "default"


_MODELS: dict[ModelSpec, keras.Model] = {}
_INITIAL_WEIGHTS: dict[ModelSpec, dict[str, np.ndarray]] = {}


def initial_weights(spec: ModelSpec) -> dict[str, np.ndarray]:
    """The seeded initial weights of ``spec``'s model (the same in every process)."""
    get_model(spec)
    return _INITIAL_WEIGHTS[spec]


def build_compiled(spec: ModelSpec) -> keras.Model:
    """A new model for ``spec``, compiled with plain SGD and sparse cross-entropy (not cached)."""
    import keras

    model = build_model(
        spec.kind, spec.input_shape, spec.num_classes, seed=spec.seed,
        architecture=spec.architecture,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def get_model(spec: ModelSpec) -> keras.Model:
    """Return this process's compiled model for ``spec``, building it once."""
    model = _MODELS.get(spec)
    if model is None:
        model = build_compiled(spec)
        _MODELS[spec] = model
        _INITIAL_WEIGHTS[spec] = get_weights(model)
    return model


def train_locally(
    model: keras.Model,
    data: LabeledData,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
) -> float:
    """Run ``epochs`` of minibatch SGD on ``data``; return the last epoch's mean loss."""
    model.optimizer.learning_rate.assign(learning_rate)
    history = model.fit(
        data.x,
        data.y,
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=0,
    )
    return float(history.history["loss"][-1])


#: Evaluation chunk size: the whole set goes through the model in chunks of this many rows.
EVAL_BATCH_SIZE = 256

# Losses the one-pass evaluation reproduces (what ``get_model`` compiles with).
_ONE_PASS_LOSSES = ("sparse_categorical_crossentropy",)


def _evaluation_step(model: keras.Model):  # type: ignore[no-untyped-def]
    """The model's cached evaluation function: ``(x, y) -> (sum of losses, correct count)``.

    One ``tf.function`` per model, traced once for any number of rows (the
    batch dimension is ``None``) and kept on the model itself, so it lives
    and dies with it. Only the weights change between calls; the function
    reads the model's variables, so it always sees the current ones.
    """
    step = getattr(model, "_fedprivacy_evaluation_step", None)
    if step is not None:
        return step
    import keras
    import tensorflow as tf

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, *model.input_shape[1:]], tf.float32),
            tf.TensorSpec([None], tf.int64),
        ],
        autograph=False,
    )
    def step(x, y):  # type: ignore[no-untyped-def]
        probabilities = model(x, training=False)
        losses = keras.losses.sparse_categorical_crossentropy(y, probabilities)
        correct = tf.equal(tf.argmax(probabilities, axis=-1), y)
        return (
            tf.reduce_sum(tf.cast(losses, tf.float64)),
            tf.reduce_sum(tf.cast(correct, tf.int64)),
        )

    # Not a Keras attribute: bypass Keras' tracking of layers and variables.
    object.__setattr__(model, "_fedprivacy_evaluation_step", step)
    return step


def evaluate(
    model: keras.Model, data: LabeledData, *, batch_size: int = EVAL_BATCH_SIZE
) -> tuple[float, float]:
    """Return ``(loss, accuracy)`` of ``model`` on ``data`` (NaN when empty).

    The same figures as ``model.evaluate`` (the mean sparse categorical
    cross-entropy over all rows and the share of rows whose arg-max is the
    label) from one compiled pass per chunk of ``batch_size`` rows, without
    ``model.evaluate``'s per-call set-up (data adapter, iterator, callbacks,
    progress logging), which costs more than the pass itself on a client's
    few hundred validation rows. A model compiled with any other loss is
    evaluated by ``model.evaluate``.
    """
    if len(data) == 0:
        return math.nan, math.nan
    if getattr(model, "loss", None) not in _ONE_PASS_LOSSES or model.losses:
        loss, accuracy = model.evaluate(
            data.x, data.y, batch_size=batch_size, verbose=0
        )
        return float(loss), float(accuracy)
    step = _evaluation_step(model)
    x = np.asarray(data.x, dtype=np.float32)
    y = np.asarray(data.y, dtype=np.int64).reshape(-1)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        chunk_loss, chunk_correct = step(
            x[start : start + batch_size], y[start : start + batch_size]
        )
        loss_sum += float(chunk_loss)
        correct += int(chunk_correct)
    return loss_sum / len(y), correct / len(y)
