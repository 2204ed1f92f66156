"""Simulated faulty clients, to evaluate robust aggregation (simulation only).

The first ``round(faulty-fraction * num-partitions)`` partitions misbehave in
the way ``faulty-kind`` names: a broken or hostile device sending a
sign-flipped, scaled or pure-noise update, a stale model (the initial one,
never trained), or a model trained on flipped labels (a data-poisoning
client). The ServerApp refuses these keys outside Flower's simulation engine:
they are an evaluation tool, never something a deployed node does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from data.dataset import LabeledData

FAULT_KINDS = ("sign-flip", "scale-10", "scale-100", "gaussian", "stale", "label-flip")

#: Stddev, per coordinate, of the ``gaussian`` fault's update (a device sending garbage).
GAUSSIAN_FAULT_STDDEV = 1.0


def is_faulty(partition_id: int, num_partitions: int, fraction: float) -> bool:
    """Whether this partition misbehaves: the first ``round(fraction * N)`` do."""
    return partition_id < int(round(fraction * num_partitions))


def flip_labels(data: LabeledData) -> LabeledData:
    """Labels ``y -> C - 1 - y``: a poisoned client's training set."""
    return replace(data, y=(data.num_classes - 1 - data.y).astype(data.y.dtype))


def faulty_update(
    kind: str,
    local: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    stale: Mapping[str, np.ndarray],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """What a faulty client sends instead of ``local`` (its honestly trained model).

    ``reference`` is the global model it received, ``stale`` the initial
    model. ``label-flip`` changes the training data, not the update: its
    ``local`` is sent as it is.
    """
    out: dict[str, np.ndarray] = {}
    for key, ref in reference.items():
        ref64 = np.asarray(ref, dtype=np.float64)
        update = np.asarray(local[key], dtype=np.float64) - ref64
        if kind == "sign-flip":
            value = ref64 - update
        elif kind in ("scale-10", "scale-100"):
            value = ref64 + float(kind.split("-")[1]) * update
        elif kind == "gaussian":
            value = ref64 + rng.normal(0.0, GAUSSIAN_FAULT_STDDEV, size=ref64.shape)
        elif kind == "stale":
            value = np.asarray(stale[key], dtype=np.float64)
        elif kind == "label-flip":
            value = np.asarray(local[key], dtype=np.float64)
        else:
            raise ValueError(f"faulty-kind must be one of {FAULT_KINDS}, got {kind!r}")
        out[key] = value.astype(np.asarray(ref).dtype)
    return out
