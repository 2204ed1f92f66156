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


_MODELS: dict[ModelSpec, keras.Model] = {}
_INITIAL_WEIGHTS: dict[ModelSpec, dict[str, np.ndarray]] = {}


def initial_weights(spec: ModelSpec) -> dict[str, np.ndarray]:
    """The seeded initial weights of ``spec``'s model (the same in every process)."""
    get_model(spec)
    return _INITIAL_WEIGHTS[spec]


def get_model(spec: ModelSpec) -> keras.Model:
    """Return this process's compiled model for ``spec``, building it once."""
    model = _MODELS.get(spec)
    if model is None:
        import keras

        model = build_model(
            spec.kind, spec.input_shape, spec.num_classes, seed=spec.seed
        )
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.01),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
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


def evaluate(
    model: keras.Model, data: LabeledData, *, batch_size: int = 256
) -> tuple[float, float]:
    """Return ``(loss, accuracy)`` of ``model`` on ``data`` (NaN when empty)."""
    if len(data) == 0:
        return math.nan, math.nan
    loss, accuracy = model.evaluate(
        data.x, data.y, batch_size=batch_size, verbose=0
    )
    return float(loss), float(accuracy)

