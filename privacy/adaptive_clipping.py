"""Adaptive clipping to a target quantile of update norms (Andrew et al. 2021).

Andrew, Thakkar, McMahan, Ramaswamy (2021), "Differentially Private Learning
with Adaptive Clipping", https://arxiv.org/abs/1905.03871, Algorithm 1 with the
geometric update: each round every contributing client reports the bit
``norm <= C`` (its update was *not* clipped); the server releases the noised
fraction of such bits

    b~ = (sum_i (bit_i - 1/2) + N(0, sigma_b^2)) / m + 1/2,   clamped to [0, 1],

with ``m`` the expected number of clients, and moves the clipping norm with

    C <- C * exp(-eta_C * (b~ - gamma)),

so ``C`` shrinks while more than a fraction ``gamma`` of updates is unclipped
and grows while fewer are: ``C`` converges to the ``gamma``-quantile of update
norms, from above or below.

The bits are centred (``bit - 1/2``) so that one client changes the sum by at
most 1/2, i.e. the count query is a Gaussian mechanism with noise multiplier
``2 * sigma_b``. To keep the total noise multiplier ``z`` of a round the same as
without adaptation, the update sum gets the smaller multiplier (paper, Sec. 3.2)

    z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).

This is exactly tensorflow-privacy's ``QuantileAdaptiveClipSumQuery`` /
``QuantileEstimatorQuery`` (geometric update, ``expected_num_records = m``),
which ``tests/test_adaptive_clipping.py`` checks numerically. Flower 1.42's
``DifferentialPrivacyServerSideAdaptiveClipping`` instead plugs the *clipped*
fraction into this update, which drives ``C`` the wrong way, and scales its
noise by the norm *after* the update; neither is done here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Andrew et al.'s recommended defaults.
DEFAULT_TARGET_UNCLIPPED_QUANTILE = 0.5
DEFAULT_CLIPPING_LEARNING_RATE = 0.2
COUNT_STDDEV_DIVISOR = 20.0


def default_count_stddev(expected_clients: float) -> float:
    """Andrew et al.'s default noise on the unclipped count: ``m / 20``."""
    return expected_clients / COUNT_STDDEV_DIVISOR


def split_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The update-sum noise multiplier ``z_Delta`` that keeps the round's total at ``z``.

    Parameters
    ----------
    noise_multiplier : float
        The round's total noise multiplier ``z`` (what the accountant sees).
    count_stddev : float
        ``sigma_b``, the stddev of the noise on the unclipped count.

    Returns
    -------
    float
        ``(z^-2 - (2 sigma_b)^-2)^(-1/2)``; 0 when ``z`` is 0 (no privacy).

    Raises
    ------
    ValueError
        If ``z >= 2 sigma_b``: the count alone would then need more privacy
        than the whole round has, and no ``z_Delta`` exists. Increase
        ``sigma_b`` (or the number of clients per round) or lower ``z``.
    """
    if noise_multiplier < 0 or count_stddev < 0:
        raise ValueError("noise multiplier and count stddev must be non-negative")
    if noise_multiplier == 0:
        return 0.0
    if noise_multiplier >= 2 * count_stddev:
        raise ValueError(
            f"adaptive clipping needs noise-multiplier < 2 * count stddev, got "
            f"z={noise_multiplier} and sigma_b={count_stddev} (sigma_b defaults to "
            "expected clients per round / 20); sample more clients, raise the count "
            "stddev or lower the noise multiplier"
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


def noised_unclipped_fraction(
    unclipped_bits: Sequence[bool] | np.ndarray,
    expected_clients: float,
    count_stddev: float,
    rng: np.random.Generator,
) -> float:
    """DP estimate of the fraction of updates with ``norm <= C``.

    ``(sum(bit - 1/2) + N(0, sigma_b^2)) / m + 1/2`` clamped to ``[0, 1]``, as
    tensorflow-privacy's ``QuantileEstimatorQuery``. A client that was sampled
    but contributed nothing (failed or rejected) adds 0 to the centred sum,
    i.e. counts as half unclipped; with Poisson sampling ``m`` is the expected
    count, so the estimate is unbiased only on average, as in the paper.
    """
    if expected_clients <= 0:
        raise ValueError(f"expected clients must be positive, got {expected_clients}")
    centred = float(np.sum(np.asarray(unclipped_bits, dtype=np.float64) - 0.5))
    noise = float(rng.normal(0.0, count_stddev)) if count_stddev > 0 else 0.0
    return min(1.0, max(0.0, (centred + noise) / expected_clients + 0.5))


def geometric_update(
    clipping_norm: float,
    unclipped_fraction: float,
    target_unclipped_quantile: float,
    learning_rate: float,
) -> float:
    """``C * exp(-eta_C * (b - gamma))`` (Andrew et al. 2021, Algorithm 1)."""
    return clipping_norm * math.exp(
        -learning_rate * (unclipped_fraction - target_unclipped_quantile)
    )


@dataclass
class QuantileClipEstimator:
    """The clipping norm's state across rounds.

    Parameters
    ----------
    clipping_norm : float
        The norm the next round clips with (initially the configured one).
    target_unclipped_quantile : float (default: 0.5)
        ``gamma``: the fraction of updates meant to be left unclipped.
    learning_rate : float (default: 0.2)
        ``eta_C`` of the geometric update.
    count_stddev : float | None (default: None)
        ``sigma_b``; ``None`` means ``m / 20`` with ``m`` the round's expected
        number of clients.
    """

    clipping_norm: float
    target_unclipped_quantile: float = DEFAULT_TARGET_UNCLIPPED_QUANTILE
    learning_rate: float = DEFAULT_CLIPPING_LEARNING_RATE
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        """Check the settings."""
        if not self.clipping_norm > 0:
            raise ValueError(f"clipping norm must be positive, got {self.clipping_norm}")
        if not 0.0 <= self.target_unclipped_quantile <= 1.0:
            raise ValueError("target unclipped quantile must be in [0, 1]")
        if self.learning_rate < 0:
            raise ValueError("clipping learning rate must be non-negative")
        if self.count_stddev is not None and self.count_stddev < 0:
            raise ValueError("count stddev must be non-negative")

    def count_stddev_for(self, expected_clients: float, noise_multiplier: float) -> float:
        """``sigma_b`` for a round with ``m`` expected clients (0 when there is no noise)."""
        if self.count_stddev is not None:
            return self.count_stddev
        if noise_multiplier == 0:
            return 0.0
        return default_count_stddev(expected_clients)

    def update(
        self,
        unclipped_bits: Sequence[bool] | np.ndarray,
        expected_clients: float,
        count_stddev: float,
        rng: np.random.Generator,
    ) -> float:
        """Release the noised unclipped fraction and move the norm; return the fraction."""
        fraction = noised_unclipped_fraction(unclipped_bits, expected_clients, count_stddev, rng)
        self.clipping_norm = geometric_update(
            self.clipping_norm, fraction, self.target_unclipped_quantile, self.learning_rate
        )
        return fraction
