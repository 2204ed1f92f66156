"""Weighted averaging of client arrays and metrics (McMahan et al. 2017, Algorithm 1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def normalized_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Return ``weights / sum(weights)`` as float64; all must be positive and finite."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError("need a non-empty 1-D sequence of weights")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be positive and finite, got {w.tolist()}")
    return w / w.sum()


def weighted_mean(
    arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float] | np.ndarray
) -> dict[str, np.ndarray]:
    """Weighted mean, key by key, of several clients' arrays.

    Parameters
    ----------
    arrays : sequence of mapping str -> np.ndarray
        One mapping per client, all with the same keys and shapes.
    weights : sequence of float
        Positive weight per client (e.g. its number of training examples);
        normalised here.

    Returns
    -------
    dict
        ``sum_k w_k x_k / sum_k w_k`` per key, in the first client's dtype.
        Accumulation is in float64 with in-place operations: one pass over
        each client's bytes and no per-client temporary.
    """
    w = normalized_weights(weights)
    if len(arrays) != len(w):
        raise ValueError(f"{len(arrays)} clients but {len(w)} weights")
    result: dict[str, np.ndarray] = {}
    for key, first in arrays[0].items():
        acc = np.multiply(first, w[0], dtype=np.float64)
        scratch = np.empty_like(acc)
        for client, wk in zip(arrays[1:], w[1:]):
            np.multiply(client[key], wk, out=scratch)
            acc += scratch
        result[key] = acc.astype(first.dtype, copy=False)
    return result


def weighted_metrics(
    metrics: Sequence[Mapping[str, float]], weights: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """Weighted mean of each scalar metric over the clients that report it."""
    w = np.asarray(weights, dtype=np.float64)
    keys = sorted({key for record in metrics for key in record})
    result: dict[str, float] = {}
    for key in keys:
        pairs = [
            (float(record[key]), wk)
            for record, wk in zip(metrics, w)
            if key in record and isinstance(record[key], (int, float))
        ]
        if pairs:
            values, ws = np.array(pairs).T
            result[key] = float(np.dot(values, ws) / ws.sum())
    return result
