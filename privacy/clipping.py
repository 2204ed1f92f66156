"""Model-update arithmetic for DP-FedAvg: global L2 norm, flat clipping, Gaussian noise.

Pure numpy functions over ``dict[str, np.ndarray]`` (one entry per model
variable), shared by the server strategy (:mod:`strategies.dp_fedavg`) and by
clients that clip or noise their own update (:mod:`privacy.local_dp`). No
TensorFlow.

The clipping is the "flat" clipping of McMahan et al. (2018), "Learning
Differentially Private Recurrent Language Models", https://arxiv.org/abs/1710.06963:
the update is treated as one vector (all arrays concatenated) and scaled by
``min(1, C / ||update||_2)``. Unlike Flower's ``clip_inputs_inplace`` it is
defined for every finite update: a zero update has factor 1 (no division by
zero), and non-finite updates are rejected before they are clipped (Flower lets
a NaN update through unclipped and turns an Inf update into NaN).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]

#: Relative slack allowed when the server checks that a client clipped its own
#: update: a norm up to ``C * (1 + NORM_TOLERANCE)`` is accepted (float32 rounding).
NORM_TOLERANCE = 1e-6


class InvalidUpdate(ValueError):
    """A model update that must not enter a DP aggregate; the message is the reason."""


def check_update(update: Arrays, reference: Arrays, *, check_finite: bool = True) -> None:
    """Check that ``update`` has exactly ``reference``'s keys and shapes, all finite.

    Parameters
    ----------
    update : mapping str -> np.ndarray
        A client's update (or model), one array per variable.
    reference : mapping str -> np.ndarray
        The global arrays the update must match.
    check_finite : bool (default: True)
        Also check every value for NaN/Inf (one pass over the data). A caller
        that measures the update's norm anyway can pass ``False`` and reject a
        non-finite norm instead (:func:`strategies.aggregation.update_norms`).

    Raises
    ------
    InvalidUpdate
        With the first reason the update fails (keys, shape, NaN/Inf).
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise InvalidUpdate(f"array keys differ: missing {missing}, unexpected {extra}")
    for key, ref in reference.items():
        value = np.asarray(update[key])
        if value.shape != np.shape(ref):
            raise InvalidUpdate(
                f"array '{key}' has shape {list(value.shape)}, expected {list(np.shape(ref))}"
            )
        if check_finite and not np.isfinite(value).all():
            raise InvalidUpdate(f"array '{key}' holds NaN or Inf")


def model_update(new_arrays: Arrays, old_arrays: Arrays) -> dict[str, np.ndarray]:
    """``new - old`` key by key, in float64 (no float32 overflow or cancellation)."""
    return {
        key: np.subtract(new_arrays[key], old, dtype=np.float64) for key, old in old_arrays.items()
    }


def l2_norm(arrays: Arrays) -> float:
    """Global L2 norm of all arrays taken as one flat vector.

    The sum of squares is accumulated in float64; if it overflows (finite
    float64 entries above ~1e154), it is recomputed on arrays scaled by their
    largest magnitude, so every finite input has a finite, exact-to-rounding
    norm. Returns ``nan``/``inf`` for non-finite input (check it first).
    """
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for value in arrays.values():
            flat = np.asarray(value, dtype=np.float64).ravel()
            total += float(np.dot(flat, flat))
    if math.isfinite(total):
        return math.sqrt(total)
    scale = max((float(np.max(np.abs(v))) for v in arrays.values() if np.size(v)), default=0.0)
    if not math.isfinite(scale):
        return scale  # inf, or nan if any entry is nan
    total = 0.0
    for value in arrays.values():
        flat = np.asarray(value, dtype=np.float64).ravel() / scale
        total += float(np.dot(flat, flat))
    return scale * math.sqrt(total)


def clip_factor(norm: float, clipping_norm: float) -> float:
    """``min(1, C / norm)``, with factor 1 for a zero norm.

    Raises
    ------
    ValueError
        If ``norm`` is negative or not finite, or ``clipping_norm`` is not positive.
    """
    if not clipping_norm > 0 or not math.isfinite(clipping_norm):
        raise ValueError(f"clipping norm must be positive and finite, got {clipping_norm}")
    if not math.isfinite(norm) or norm < 0:
        raise ValueError(f"cannot clip an update of norm {norm}")
    if norm <= clipping_norm:
        return 1.0
    return clipping_norm / norm


def clip_update(update: Arrays, clipping_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``update`` to L2 norm at most ``clipping_norm`` (flat clipping).

    Parameters
    ----------
    update : mapping str -> np.ndarray
        A finite model update.
    clipping_norm : float
        The bound ``C`` on the global L2 norm.

    Returns
    -------
    tuple
        ``(clipped, norm)``: the clipped update in float64 and the norm the
        update had before clipping (``norm <= C`` means it was not clipped).
    """
    norm = l2_norm(update)
    factor = clip_factor(norm, clipping_norm)
    clipped = {key: np.multiply(value, factor, dtype=np.float64) for key, value in update.items()}
    return clipped, norm


def sum_arrays(arrays: Iterable[Arrays], template: Arrays) -> dict[str, np.ndarray]:
    """Key-by-key float64 sum of ``arrays``; zeros shaped like ``template`` if none."""
    total = {key: np.zeros(np.shape(value), dtype=np.float64) for key, value in template.items()}
    for item in arrays:
        for key in total:
            total[key] += item[key]
    return total


def add_gaussian_noise(
    arrays: Arrays, stddev: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``arrays`` plus i.i.d. ``N(0, stddev^2)`` noise on every entry, in float64.

    The noise is drawn from ``rng`` in key order, so a seeded generator gives
    reproducible runs. numpy's PCG64 is not a cryptographically secure
    generator and floating-point Gaussian sampling has known side channels;
    a production deployment should draw the noise from a CSPRNG (e.g. a
    generator seeded from ``secrets``) or use a discrete Gaussian.
    """
    if stddev < 0 or not math.isfinite(stddev):
        raise ValueError(f"noise stddev must be non-negative and finite, got {stddev}")
    noised: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        base = np.asarray(value, dtype=np.float64)
        if stddev == 0.0:
            noised[key] = base.copy()
        else:
            noised[key] = base + rng.normal(0.0, stddev, size=base.shape)
    return noised


def clip_to_reference(
    local_arrays: Arrays, reference: Arrays, clipping_norm: float, max_iter: int = 8
) -> dict[str, np.ndarray]:
    """A client's arrays with their update clipped, as the server will measure it.

    What a client sends under ``clipping-side = client``: ``reference +
    clip(local - reference)`` in the reference's dtypes. Adding the clipped
    update back in float32 rounds it, which can push the norm the server
    measures (``sent - reference``) slightly above ``C``; the update is then
    shrunk a little more, so the result always passes the server's check
    ``norm <= C * (1 + NORM_TOLERANCE)`` (in fact ``<= C``).

    Raises
    ------
    InvalidUpdate
        If the arrays do not match or hold NaN/Inf, or rounding cannot be
        brought under ``C`` (a clipping norm far below the float resolution of
        the weights).
    """
    check_update(local_arrays, reference)
    update = model_update(local_arrays, reference)
    norm = l2_norm(update)
    target = clipping_norm
    for _ in range(max_iter):
        factor = clip_factor(norm, target)
        sent = {
            key: (np.asarray(ref, dtype=np.float64) + update[key] * factor).astype(
                np.asarray(ref).dtype
            )
            for key, ref in reference.items()
        }
        sent_norm = l2_norm(model_update(sent, reference))
        if sent_norm <= clipping_norm:
            return sent
        target -= 2.0 * (sent_norm - clipping_norm)
        if target <= 0:
            break
    raise InvalidUpdate(f"cannot clip to {clipping_norm:g} at the arrays' float resolution")
