"""Which of a model's variables are shared with the federation and which stay private.

Personalised federated learning keeps part of each model on its owner's
machine: the classifier head in FedPer (Arivazhagan et al. 2019,
arXiv 1912.00818), the normalisation layers in FedBN (Li et al. 2021,
arXiv 2102.07623). The split is by Keras variable path, never by position,
so a reordering of layers cannot silently send the wrong array.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import keras

PRESETS = ("none", "head", "batchnorm")
HEAD_LAYER = "head"


class PrivateWeightLeak(RuntimeError):
    """An outgoing array is not a shared variable; the message names it."""


def _normalization_layers(model: keras.Model) -> list[keras.layers.Layer]:
    import keras

    kinds = (
        keras.layers.BatchNormalization,
        keras.layers.LayerNormalization,
        keras.layers.GroupNormalization,
    )
    return [layer for layer in model.layers if isinstance(layer, kinds)]


def private_variable_paths(model: keras.Model, private_layers: str) -> frozenset[str]:
    """Paths of the variables that ``private_layers`` keeps on the client.

    Parameters
    ----------
    model : keras.Model
        A built model.
    private_layers : str
        ``none`` (everything shared: FedAvg), ``head`` (the classifier head,
        the layer named ``head``, or the last layer with weights: FedPer),
        ``batchnorm`` (every normalisation layer: FedBN), or comma-separated
        shell patterns matched against layer names and variable paths
        (``conv-2,dense-*``, ``*/bias``).

    Raises
    ------
    ValueError
        If a pattern matches nothing, the model has no normalisation layer
        for ``batchnorm``, or nothing would be left to share.
    """
    spec = private_layers.strip()
    paths = [v.path for v in model.weights]
    if spec == "none":
        return frozenset()
    if spec == "head":
        names = {layer.name for layer in model.layers}
        layer = (
            model.get_layer(HEAD_LAYER)
            if HEAD_LAYER in names
            else [layer for layer in model.layers if layer.weights][-1]
        )
        private = {v.path for v in layer.weights}
    elif spec == "batchnorm":
        layers = _normalization_layers(model)
        if not layers:
            raise ValueError(
                f"private-layers='batchnorm' but model '{model.name}' has no "
                "normalisation layer; use 'head' or name layers with patterns"
            )
        private = {v.path for layer in layers for v in layer.weights}
    else:
        private = set()
        for pattern in (p.strip() for p in spec.split(",")):
            if not pattern:
                raise ValueError(f"private-layers={private_layers!r} has an empty pattern")
            matched = {
                v.path
                for layer in model.layers
                for v in layer.weights
                if fnmatch.fnmatchcase(layer.name, pattern)
                or fnmatch.fnmatchcase(v.path, pattern)
            }
            if not matched:
                layer_names = [layer.name for layer in model.layers if layer.weights]
                raise ValueError(
                    f"private-layers pattern {pattern!r} matches no layer or variable "
                    f"of model '{model.name}' (layers: {', '.join(layer_names)})"
                )
            private |= matched
    if private >= set(paths):
        raise ValueError(
            f"private-layers={private_layers!r} makes every variable private; "
            "nothing would be shared"
        )
    return frozenset(private)


def split_weights(
    weights: Mapping[str, np.ndarray], private_paths: frozenset[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(shared, private)`` parts of ``weights`` by variable path."""
    shared = {k: v for k, v in weights.items() if k not in private_paths}
    private = {k: v for k, v in weights.items() if k in private_paths}
    return shared, private


def guard_outgoing(
    arrays: Mapping[str, np.ndarray], shared_paths: frozenset[str]
) -> None:
    """Refuse to send any array whose key is not a shared variable.

    The last check before a reply leaves the client, so that no bug upstream
    can ever leak a private weight.

    Raises
    ------
    PrivateWeightLeak
        Naming every offending key.
    """
    leaked = sorted(set(arrays) - shared_paths)
    if leaked:
        raise PrivateWeightLeak(
            f"refusing to send {len(leaked)} array(s) that are not shared "
            f"variables: {', '.join(leaked)}"
        )
