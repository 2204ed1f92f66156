"""A linear model in numpy and each node's synthetic data (no downloads)."""

from __future__ import annotations

import numpy as np

NUM_FEATURES = 5
_TRUE_W = np.linspace(-1.0, 1.0, NUM_FEATURES)


def initial_arrays() -> list[np.ndarray]:
    """The model: weights and bias, as Flower's quickstart sends them (a list)."""
    return [np.zeros(NUM_FEATURES, dtype=np.float32), np.zeros(1, dtype=np.float32)]


def load_data(partition_id: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """This node's examples of y = x . w* + 0.5 + noise."""
    rng = np.random.default_rng(partition_id)
    x = rng.normal(size=(size, NUM_FEATURES)).astype(np.float32)
    y = (x @ _TRUE_W + 0.5 + 0.1 * rng.normal(size=size)).astype(np.float32)
    return x, y


def loss(arrays: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error."""
    w, b = arrays
    return float(np.mean((x @ w + b[0] - y) ** 2))


def train(arrays: list[np.ndarray], x: np.ndarray, y: np.ndarray, steps: int, lr: float) -> list[np.ndarray]:
    """Full-batch gradient descent on the squared error."""
    w, b = (a.astype(np.float32, copy=True) for a in arrays)
    for _ in range(steps):
        err = x @ w + b[0] - y
        w -= lr * (2.0 / len(y)) * (x.T @ err).astype(np.float32)
        b -= lr * np.float32(2.0 * err.mean())
    return [w, b]
