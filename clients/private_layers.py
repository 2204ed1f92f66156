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
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import keras

PRESETS = ("none", "head", "batchnorm")
HEAD_LAYER = "head"


class PrivateWeightLeak(RuntimeError):
    """An outgoing array is not a shared variable as the server sent it; the message names it."""


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


class ArraySpec(NamedTuple):
    """What an outgoing array must be: the shape and dtype of the array the server sent."""

    shape: tuple[int, ...]
    dtype: np.dtype


def shared_spec(arrays: Mapping[str, np.ndarray]) -> dict[str, ArraySpec]:
    """The spec both sides share: names, shapes and dtypes of the received global arrays."""
    return {
        key: ArraySpec(tuple(np.shape(value)), np.asarray(value).dtype)
        for key, value in arrays.items()
    }


def guard_outgoing(
    arrays: Mapping[str, np.ndarray],
    shared_paths: frozenset[str],
    spec: Mapping[str, ArraySpec] | None = None,
) -> None:
    """Refuse to send anything but the shared variables, as the server sent them.

    The last check before a reply leaves the client, so that no bug upstream
    can ever leak a private weight. Names alone are not enough: a private
    head of a task with its own label space, or a private array put under a
    shared name, can carry another variable's key. With ``spec`` every
    outgoing array must also have the key set, shape and dtype of what the
    server sent.

    Parameters
    ----------
    arrays : Mapping[str, numpy.ndarray]
        What the reply would carry.
    shared_paths : frozenset of str
        The model's shared variable paths: no other key may leave.
    spec : Mapping[str, ArraySpec], optional
        :func:`shared_spec` of the received global arrays; None checks keys only.

    Raises
    ------
    PrivateWeightLeak
        Naming every offending key (and, with ``spec``, every missing key and
        every shape or dtype that differs from the server's).
    """
    leaked = sorted(set(arrays) - shared_paths)
    if leaked:
        raise PrivateWeightLeak(
            f"refusing to send {len(leaked)} array(s) that are not shared "
            f"variables: {', '.join(leaked)}"
        )
    if spec is None:
        return
    problems = [f"{key} was not sent by the server" for key in sorted(set(arrays) - set(spec))]
    problems += [f"{key} is missing" for key in sorted(set(spec) - set(arrays))]
    for key in sorted(set(arrays) & set(spec)):
        shape, dtype = tuple(np.shape(arrays[key])), np.asarray(arrays[key]).dtype
        expected = spec[key]
        if shape != tuple(expected.shape) or dtype != expected.dtype:
            problems.append(
                f"{key} is {dtype}{list(shape)} where the server sent "
                f"{expected.dtype}{list(expected.shape)}"
            )
    if problems:
        raise PrivateWeightLeak(
            "refusing to send arrays that do not match the shared spec: " + "; ".join(problems)
        )
