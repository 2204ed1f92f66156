"""A model's weights as a dict keyed by Keras variable path, and back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import keras


def get_weights(model: keras.Model) -> dict[str, np.ndarray]:
    """Return every weight of ``model`` keyed by its variable path."""
    return {v.path: np.asarray(v.numpy()) for v in model.weights}


def set_weights(model: keras.Model, weights: Mapping[str, np.ndarray]) -> None:
    """Assign ``weights`` to ``model`` by variable path.

    Raises
    ------
    KeyError
        If a path of ``weights`` is not a variable of the model.
    ValueError
        If an array's shape differs from its variable's.
    """
    variables = {v.path: v for v in model.weights}
    unknown = sorted(set(weights) - set(variables))
    if unknown:
        raise KeyError(f"weights for unknown variables: {unknown}")
    for path, value in weights.items():
        variable = variables[path]
        if tuple(variable.shape) != tuple(value.shape):
            raise ValueError(
                f"{path}: shape {tuple(value.shape)} does not match the "
                f"model's {tuple(variable.shape)}"
            )
        variable.assign(value)
