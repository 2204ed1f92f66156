"""Local differential privacy for a client's model update (numpy only, no TensorFlow).

With local DP a client protects its own update before it leaves the device:
it clips the update to L2 norm ``C`` (:func:`privacy.clipping.clip_update`)
and adds Gaussian noise, so that whatever the server does, each round's
message is ``(epsilon, delta)``-DP for that client.

Sensitivity. The local randomiser's input is the client's whole update, any
vector of norm at most ``C``; two such inputs differ by up to ``2C``. So the
L2 sensitivity is ``2C`` (Flower's ``LocalDpMod`` leaves it to the user, and a
"sensitivity = clipping norm" setting is half of what is needed).

Calibration. The noise is the *analytic* Gaussian mechanism of Balle & Wang
(2018), "Improving the Gaussian Mechanism for Differential Privacy: Analytical
Calibration and Optimal Denoising", https://arxiv.org/abs/1805.06530: the
smallest ``sigma`` with

    Phi(D / (2 sigma) - eps sigma / D) - e^eps Phi(-D / (2 sigma) - eps sigma / D) <= delta,

which is exact for every ``eps > 0``. The classic bound
``sigma = D sqrt(2 ln(1.25 / delta)) / eps`` (Dwork & Roth 2014, Thm. A.1) is
only proven for ``eps < 1`` and is looser there; Flower's ``LocalDpMod`` uses it
for any epsilon. It is kept here (:func:`classic_gaussian_sigma`) for
comparison only.

The noise comes from a numpy ``Generator``; see
:func:`privacy.clipping.add_gaussian_noise` on using a CSPRNG in production.
"""

from __future__ import annotations

import math

import numpy as np

from .clipping import (
    Arrays,
    InvalidUpdate,
    add_gaussian_noise,
    check_update,
    clip_update,
    model_update,
)

#: L2 sensitivity of a client's clipped update, in units of the clipping norm.
LOCAL_SENSITIVITY_FACTOR = 2.0


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """Exact delta of the Gaussian mechanism at ``epsilon`` (Balle & Wang 2018, Thm. 8)."""
    if sigma <= 0:
        return 1.0
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    return max(0.0, _phi(a - b) - math.exp(epsilon) * _phi(-a - b))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest noise stddev making the Gaussian mechanism ``(epsilon, delta)``-DP.

    Uses dp-accounting's ``get_sigma_gaussian`` (the analytic calibration of
    Balle & Wang 2018) for sensitivity 1, scaled by ``sensitivity``.
    """
    if epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(f"need epsilon > 0 and 0 < delta < 1, got {epsilon}, {delta}")
    if sensitivity < 0:
        raise ValueError(f"sensitivity must be non-negative, got {sensitivity}")
    from dp_accounting import get_sigma_gaussian  # ~2 s import: only where it is used

    return float(sensitivity * get_sigma_gaussian(epsilon, delta))


def classic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """``sensitivity * sqrt(2 ln(1.25/delta)) / epsilon``, valid only for ``epsilon < 1``."""
    if not 0 < epsilon < 1:
        raise ValueError(
            f"the classic Gaussian bound holds only for 0 < epsilon < 1, got {epsilon}"
        )
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def local_dp_noise_stddev(clipping_norm: float, epsilon: float, delta: float) -> float:
    """Noise stddev a client adds to its clipped update: analytic sigma for sensitivity ``2C``."""
    return analytic_gaussian_sigma(epsilon, delta, LOCAL_SENSITIVITY_FACTOR * clipping_norm)


def privatize_update(
    update: Arrays,
    clipping_norm: float,
    epsilon: float,
    delta: float,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], float]:
    """Clip ``update`` to ``clipping_norm`` and add local-DP Gaussian noise.

    Returns
    -------
    tuple
        ``(noised_update, sigma)`` in float64; each call is an
        ``(epsilon, delta)``-DP release of the update.

    Raises
    ------
    InvalidUpdate
        If the update holds NaN or Inf (it cannot be clipped meaningfully).
    """
    check_update(update, update)
    clipped, _ = clip_update(update, clipping_norm)
    sigma = local_dp_noise_stddev(clipping_norm, epsilon, delta)
    return add_gaussian_noise(clipped, sigma, rng), sigma


def privatize_arrays(
    local_arrays: Arrays,
    global_arrays: Arrays,
    clipping_norm: float,
    epsilon: float,
    delta: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """What a local-DP client sends: ``global + privatize(local - global)``, in global dtypes.

    Parameters
    ----------
    local_arrays : mapping str -> np.ndarray
        The client's arrays after local training.
    global_arrays : mapping str -> np.ndarray
        The global arrays the server sent this round.
    clipping_norm, epsilon, delta : float
        ``C`` and the per-round local guarantee (the server's train config
        keys ``clipping-norm``, ``local-dp-epsilon``, ``local-dp-delta``).
    rng : np.random.Generator
        Source of the noise.
    """
    check_update(local_arrays, global_arrays)
    noised, _ = privatize_update(
        model_update(local_arrays, global_arrays), clipping_norm, epsilon, delta, rng
    )
    return {
        key: (np.asarray(ref, dtype=np.float64) + noised[key]).astype(np.asarray(ref).dtype)
        for key, ref in global_arrays.items()
    }


__all__ = [
    "InvalidUpdate",
    "LOCAL_SENSITIVITY_FACTOR",
    "analytic_gaussian_sigma",
    "classic_gaussian_sigma",
    "gaussian_delta",
    "local_dp_noise_stddev",
    "privatize_arrays",
    "privatize_update",
]
