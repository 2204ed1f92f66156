"""The distributed discrete Gaussian (DDG) mechanism: client-side math and its accounting.

After Kairouz, Liu, Steinke (2021), "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", ICML,
https://arxiv.org/abs/2102.06387 (KLS), with the discrete Gaussian sampler of
Canonne, Kamath, Steinke (2020), "The Discrete Gaussian for Differential
Privacy", NeurIPS, https://arxiv.org/abs/2004.00010 (CKS).

Each client clips its update to L2 norm ``C``, scales it by ``s`` (integer
units per unit of the update), rounds it to the integer grid with
*conditional* randomized rounding (retried until the rounded vector's norm is
at most a public bound, :func:`conditional_rounding_bound`), and adds its own
share of noise ``N_Z(0, sigma^2)^d`` (:func:`sample_discrete_gaussian`).
Secure aggregation reveals only the sum; the noise shares of the ``n`` honest
clients whose contributions are in it protect every client.

Accounting (:func:`ddg_rho`): KLS Prop. 14 (the Renyi bound behind their
Thm. 1) for the sum of ``n`` discrete Gaussians, turned into ``rho``-zCDP,
with ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k+1))`` measuring
how far the sum of ``n`` discrete Gaussians is from one discrete Gaussian of
variance ``n sigma^2``. A single discrete Gaussian is ``Delta_2^2 / (2
sigma^2)``-zCDP (CKS); adding independent noise is post-processing, so one
honest client's share alone gives that bound too, and :func:`ddg_rho` takes
the smallest valid bound. A round is then :func:`ddg_dp_event`, a
``ZCDpEvent``: RDP accounting only, and no amplification by sampling.

Sensitivities are those of the integer vector each client sends, in the
neighbouring relation of the caller (zero-out / add-remove: one client's
rounded vector, norm at most the rounding bound; replace-one: twice that).
Modular wrap-around in secure aggregation is post-processing of the sum: it
costs accuracy, not privacy.

Randomness always comes in as a ``np.random.Generator`` (in production
:func:`privacy.randomness.secure_generator`, fresh OS entropy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # dp-accounting costs ~2 s to import: loaded only where an event is built
    import dp_accounting

#: Largest local sigma :func:`sample_discrete_gaussian` accepts (float64 keeps
#: ``floor(sigma) + 1`` and the candidates exact far beyond this).
MAX_SIGMA = 2.0**40

#: Largest magnitude :func:`conditional_randomized_round` accepts: the rounded
#: integers are exact in float64 and fit in int64.
MAX_ROUNDING_MAGNITUDE = 2.0**52

#: Smallest local sigma KLS Prop. 14 (the ``tau`` bound for ``n >= 2``) covers.
MIN_SIGMA_FOR_SUM_BOUND = 0.5

_TAU_CHUNK = 1 << 20


# ------------------------------------------------------------------- sampling
def sample_discrete_gaussian(
    sigma: float, size: int | tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """Draw from the discrete Gaussian ``N_Z(0, sigma^2)``, vectorised.

    ``P[x] = exp(-x^2 / (2 sigma^2)) / sum_{y in Z} exp(-y^2 / (2 sigma^2))``
    for every integer ``x``. CKS Algorithm 3: a candidate ``Y`` from the
    discrete Laplace with ``P[Y = y] ∝ exp(-|y| / t)``, ``t = floor(sigma) + 1``
    (the difference of two i.i.d. geometric variables), kept with probability
    ``exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2))``. Candidates are drawn in
    batches until ``size`` values are kept (about 0.45 kept at ``sigma < 1``,
    0.76 for large ``sigma``).

    Unlike CKS's exact sampler this uses floating-point arithmetic (as
    TensorFlow Federated's sampler does): numpy's geometric draws and the
    acceptance test carry float64 rounding, so the output distribution matches
    the discrete Gaussian to about float64 precision, not exactly.

    Parameters
    ----------
    sigma : float
        Scale parameter (for ``sigma >= 1`` the variance is ``sigma^2`` to
        within ``1e-8`` relative; it is always slightly below ``sigma^2``).
        ``0`` gives zeros.
    size : int or tuple of int
        Output shape.
    rng : np.random.Generator
        Source of randomness.

    Returns
    -------
    np.ndarray
        int64 array of shape ``size``.

    Raises
    ------
    ValueError
        If ``sigma`` is negative, not finite, or above :data:`MAX_SIGMA`.
    """
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be finite and non-negative, got {sigma}")
    if sigma > MAX_SIGMA:
        raise ValueError(f"sigma must be at most {MAX_SIGMA:g}, got {sigma}")
    shape = (int(size),) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    count = math.prod(shape)
    if sigma == 0.0 or count == 0:
        return np.zeros(shape, dtype=np.int64)

    t = math.floor(sigma) + 1.0
    p = -math.expm1(-1.0 / t)  # geometric success probability: P[G = k] ∝ exp(-k / t)
    shift = sigma * sigma / t
    two_var = 2.0 * sigma * sigma
    out = np.empty(count, dtype=np.int64)
    filled = 0
    overdraw = 1.4  # candidates per wanted value; refined from the observed rate
    while filled < count:
        need = count - filled
        batch = int(need * overdraw) + 64
        candidates = rng.geometric(p, batch) - rng.geometric(p, batch)
        excess = np.abs(candidates).astype(np.float64) - shift
        keep = rng.random(batch) < np.exp(-(excess * excess) / two_var)
        kept = candidates[keep][:need]
        out[filled : filled + kept.size] = kept
        filled += kept.size
        rate = max(float(np.count_nonzero(keep)) / batch, 0.05)
        overdraw = 1.1 / rate
    return out.reshape(shape)


# ------------------------------------------------------------------- rounding
def conditional_rounding_bound(scaled_norm: float, dim: int, beta: float) -> float:
    """L2 norm bound for conditional randomized rounding of a vector of norm at most ``c``.

    KLS Thm. 1 (Eq. 2; their conditional randomized rounding proposition):
    for ``x in R^d`` with ``||x||_2 <= c``, unbiased randomized rounding gives
    an integer vector of norm above

        min( sqrt(c^2 + d/4 + sqrt(2 log(1/beta)) (c + sqrt(d)/2)), c + sqrt(d) )

    with probability at most ``beta``. The second term holds always (each
    coordinate moves by less than 1), so ``beta = 0`` gives ``c + sqrt(d)``.

    Parameters
    ----------
    scaled_norm : float
        ``c``, the norm bound of the real vector in integer units (``s * C``).
    dim : int
        ``d``, the number of coordinates.
    beta : float
        In ``[0, 1)``: the per-attempt probability of exceeding the bound, so
        :func:`conditional_randomized_round` needs ``1 / (1 - beta)`` attempts
        on average. KLS's experiments use ``exp(-1/2)``.

    Returns
    -------
    float
        The bound, in integer units.
    """
    c = float(scaled_norm)
    if not math.isfinite(c) or c < 0:
        raise ValueError(f"scaled norm must be finite and non-negative, got {scaled_norm}")
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim}")
    beta = float(beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    root_d = math.sqrt(int(dim))
    always = c + root_d
    if beta == 0.0:
        return always
    squared = c * c + 0.25 * dim + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + 0.5 * root_d)
    return min(always, math.sqrt(squared))


def conditional_randomized_round(
    x: np.ndarray, norm_bound: float, rng: np.random.Generator, max_tries: int = 1000
) -> np.ndarray:
    """Round ``x`` to integers at random (unbiased per coordinate) until ``||.||_2 <= norm_bound``.

    Each coordinate becomes ``floor(x_i) + Bernoulli(x_i - floor(x_i))``,
    whose mean is ``x_i``; the whole draw is repeated until the rounded
    vector's L2 norm is at most ``norm_bound`` (KLS's conditional randomized
    rounding). The conditioning adds a small bias, which vanishes as the
    bound grows. The norm bound of the result holds by construction (it is
    returned only when it holds), so privacy never rests on ``beta``; with
    ``norm_bound = conditional_rounding_bound(||x||, d, beta)`` each attempt
    fails with probability at most ``beta``.

    Parameters
    ----------
    x : np.ndarray
        Real vector (any shape; the norm is over all entries), in integer units.
    norm_bound : float
        Largest L2 norm the rounded vector may have.
    rng : np.random.Generator
        Source of randomness.
    max_tries : int (default: 1000)
        Attempts before giving up.

    Returns
    -------
    np.ndarray
        int64 array of the shape of ``x``, norm at most ``norm_bound``.

    Raises
    ------
    ValueError
        If ``x`` is not finite or too large, ``norm_bound`` is negative or
        not finite, or no rounding of ``x`` meets the bound at all.
    RuntimeError
        If ``max_tries`` attempts all exceed the bound.
    """
    values = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("x must be finite")
    if values.size and float(np.max(np.abs(values))) >= MAX_ROUNDING_MAGNITUDE:
        raise ValueError(f"x has entries of magnitude {MAX_ROUNDING_MAGNITUDE:g} or more")
    bound = float(norm_bound)
    if not math.isfinite(bound) or bound < 0:
        raise ValueError(f"norm bound must be finite and non-negative, got {norm_bound}")
    if int(max_tries) != max_tries or max_tries < 1:
        raise ValueError(f"max_tries must be a positive integer, got {max_tries}")

    floor = np.floor(values)
    frac = values - floor
    # Smallest norm any rounding can have: each fractional coordinate at its
    # integer neighbour nearer zero.
    nearest_zero = np.where(frac > 0, np.minimum(np.abs(floor), np.abs(floor + 1.0)), np.abs(floor))
    if math.sqrt(float(np.dot(nearest_zero.ravel(), nearest_zero.ravel()))) > bound:
        raise ValueError(f"no rounding of x has L2 norm at most {bound}")
    for _ in range(int(max_tries)):
        rounded = floor + (rng.random(values.shape) < frac)
        flat = rounded.ravel()
        if math.sqrt(float(np.dot(flat, flat))) <= bound:
            return rounded.astype(np.int64)
    raise RuntimeError(
        f"randomized rounding exceeded L2 norm {bound} in all {int(max_tries)} attempts"
    )


# ----------------------------------------------------------------- accounting
def l1_sensitivity_bound(l2: float, dim: int) -> float:
    """L1 norm bound of an integer vector in ``Z^dim`` with L2 norm at most ``l2``.

    ``min(l2^2, sqrt(dim) l2)``: ``||v||_1 <= sqrt(d) ||v||_2`` always, and for
    integers ``|v_i| <= v_i^2`` gives ``||v||_1 <= ||v||_2^2``.
    """
    l2 = float(l2)
    if not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be finite and non-negative, got {l2}")
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim}")
    return min(l2 * l2, math.sqrt(int(dim)) * l2)


def ddg_tau(local_sigma: float, num_clients: int) -> float:
    """KLS's ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k+1))`` (0 for one client)."""
    sigma = float(local_sigma)
    n = int(num_clients)
    if n != num_clients or n < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients}")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"local sigma must be finite and non-negative, got {local_sigma}")
    total = 0.0
    coefficient = -2.0 * math.pi**2 * sigma * sigma
    for start in range(1, n, _TAU_CHUNK):
        k = np.arange(start, min(n, start + _TAU_CHUNK), dtype=np.float64)
        total += float(np.sum(np.exp(coefficient * k / (k + 1.0))))
    return 10.0 * total


def ddg_rho(
    l2_sensitivity: float,
    l1_sensitivity: float,
    dim: int,
    local_sigma: float,
    num_clients: int,
) -> float:
    """``rho`` of ``rho``-zCDP for ``x + sum of n i.i.d. N_Z(0, sigma^2)^d`` noise shares.

    For integer-valued ``x`` whose L2 / L1 sensitivities are ``Delta_2`` /
    ``Delta_1``, with ``S^2 = n sigma^2`` and ``tau`` from :func:`ddg_tau`,
    KLS Prop. 14 (``sigma >= 1/2``) bounds the Renyi divergence of order
    ``alpha >= 1`` by the smallest of

    * ``alpha Delta_2^2 / (2 S^2) + tau d``,
    * ``(alpha / 2) (Delta_2^2 / S^2 + 2 Delta_1 tau / S + tau^2 d)``,
    * ``(alpha / 2) (Delta_2 / S + tau sqrt(d))^2``;

    since ``alpha a + b <= alpha (a + b)`` for ``alpha >= 1``, each gives a
    ``rho`` (the first and third are KLS Thm. 1's
    ``epsilon = min(sqrt(Delta_2^2 / S^2 + 2 tau d), Delta_2 / S + tau sqrt(d))``
    with ``rho = epsilon^2 / 2``). One honest share alone is a discrete
    Gaussian, ``Delta_2^2 / (2 sigma^2)``-zCDP (CKS), and the other shares are
    independent post-processing, so that bound holds for every ``n`` and
    ``sigma`` and is included. The result is the smallest of these; with one
    client it is exactly CKS's ``Delta_2^2 / (2 sigma^2)``, and it is never
    below the continuous Gaussian's ``Delta_2^2 / (2 n sigma^2)``.

    Parameters
    ----------
    l2_sensitivity, l1_sensitivity : float
        Sensitivities of the integer vector, in integer units, for the
        caller's neighbouring relation (:func:`l1_sensitivity_bound`).
    dim : int
        ``d``.
    local_sigma : float
        Each client's ``sigma``, integer units (0: no noise, ``rho = inf``).
    num_clients : int
        ``n``: the clients whose noise is guaranteed to be in the sum
        (honest survivors); more noise only helps.

    Returns
    -------
    float
        ``rho`` (``inf`` without noise, ``0`` when ``Delta_2 = 0``).
    """
    d2 = float(l2_sensitivity)
    d1 = float(l1_sensitivity)
    sigma = float(local_sigma)
    for name, value in (("l2", d2), ("l1", d1), ("local sigma", sigma)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and non-negative, got {value}")
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim}")
    tau = ddg_tau(sigma, num_clients)  # validates num_clients
    n = int(num_clients)
    d = int(dim)
    if d2 == 0.0:
        return 0.0
    if sigma == 0.0:
        return math.inf
    single_share = d2 * d2 / (2.0 * sigma * sigma)
    if n == 1 or sigma < MIN_SIGMA_FOR_SUM_BOUND:
        return single_share
    total = math.sqrt(n) * sigma
    ratio = d2 / total
    additive = 0.5 * ratio * ratio + tau * d
    with_l1 = 0.5 * (ratio * ratio + 2.0 * d1 * tau / total + tau * tau * d)
    squared = 0.5 * (ratio + tau * math.sqrt(d)) ** 2
    return min(single_share, additive, with_l1, squared)


def ddg_dp_event(rho: float) -> dp_accounting.DpEvent:
    """The dp-accounting event of one DDG release that is ``rho``-zCDP.

    ``dp_accounting.ZCDpEvent(rho)``: RDP ``alpha rho`` at every order, the
    same curve as ``GaussianDpEvent(1 / sqrt(2 rho))`` in ``RdpAccountant``
    (which gives ``alpha / (2 z^2)`` whatever the neighbouring relation, so
    ``rho`` must come from the sensitivity of the caller's relation).

    RDP accounting only. No amplification by sampling may be applied to this
    event: subsampled-Gaussian amplification (Poisson or without replacement)
    is specific to the continuous Gaussian. PLD accounting of it would be
    invalid as well, since only its zCDP bound is known. dp-accounting refuses
    both for a ``ZCDpEvent`` (``RdpAccountant`` does not support it inside
    sampled events; ``PLDAccountant`` not at all), which a ``GaussianDpEvent``
    with the same RDP would silently allow.

    Parameters
    ----------
    rho : float
        ``0`` gives ``NoOpDpEvent`` (nothing leaks), ``inf`` gives
        ``NonPrivateDpEvent``.

    Raises
    ------
    ValueError
        If ``rho`` is negative or NaN.
    """
    import dp_accounting  # ~2 s import: only where an event is built

    rho = float(rho)
    if math.isnan(rho) or rho < 0:
        raise ValueError(f"rho must be non-negative, got {rho}")
    if rho == 0.0:
        return dp_accounting.NoOpDpEvent()
    if math.isinf(rho):
        return dp_accounting.NonPrivateDpEvent()
    return dp_accounting.ZCDpEvent(rho)


def gaussian_equivalent_multiplier(rho: float) -> float:
    """``1 / sqrt(2 rho)``: the Gaussian noise multiplier with the same zCDP (for reports)."""
    rho = float(rho)
    if math.isnan(rho) or rho < 0:
        raise ValueError(f"rho must be non-negative, got {rho}")
    if rho == 0.0:
        return math.inf
    return 1.0 / math.sqrt(2.0 * rho)


# ----------------------------------------------------------------- round plan
@dataclass(frozen=True)
class DdgRoundPlan:
    """Public parameters of one DDG round (integer units unless said otherwise).

    Attributes
    ----------
    clip_norm, dim, scale, beta, noise_multiplier, min_clients
        The inputs of :func:`ddg_round_plan`.
    local_sigma : float
        Each client's discrete Gaussian ``sigma``: ``z s C / sqrt(n_min)``.
    rounding_bound : float
        L2 bound of each client's rounded vector
        (:func:`conditional_rounding_bound` of ``s C``).
    l1_bound : float
        L1 bound of each client's rounded vector.
    l2_sensitivity, l1_sensitivity : float
        Sensitivities in the plan's relation (the bounds, or twice them for
        replace-one).
    rho : float
        ``rho``-zCDP of the round (:func:`ddg_rho`).
    """

    clip_norm: float
    dim: int
    scale: float
    beta: float
    noise_multiplier: float
    min_clients: int
    replace_one: bool
    local_sigma: float
    rounding_bound: float
    l1_bound: float
    l2_sensitivity: float
    l1_sensitivity: float
    rho: float

    def dp_event(self) -> dp_accounting.DpEvent:
        """:func:`ddg_dp_event` of the round's ``rho`` (RDP only, no sampling amplification)."""
        return ddg_dp_event(self.rho)


def ddg_round_plan(
    clip_norm: float,
    dim: int,
    scale: float,
    beta: float,
    noise_multiplier: float,
    min_clients: int,
    *,
    replace_one: bool = False,
) -> DdgRoundPlan:
    """Local sigma, rounding bound and ``rho`` of a DDG round aiming at central multiplier ``z``.

    With ``x_int = round(s x)`` for updates of norm at most ``C``, each of
    the ``n_min`` guaranteed honest surviving clients adds ``N_Z(0,
    sigma^2)^d`` with ``sigma = z s C / sqrt(n_min)``, so their noise sums to
    stddev ``z s C`` in integer units (``z C`` after dividing by ``s``; the
    discrete variance is below ``sigma^2`` by under ``1e-8`` relative for
    ``sigma >= 1``). The privacy is that of the rounded vectors, whose norm
    bound exceeds ``s C`` (rounding adds up to ``sqrt(d)``), so ``rho`` is a
    little above the continuous Gaussian's ``1 / (2 z^2)`` even when ``tau``
    vanishes; it is what the round must be charged.

    Parameters
    ----------
    clip_norm : float
        ``C`` (L2), real units.
    dim : int
        ``d``.
    scale : float
        ``s``, integer units per real unit.
    beta : float
        Conditional rounding parameter in ``[0, 1)``.
    noise_multiplier : float
        ``z``: central noise stddev relative to ``C`` in the real domain.
    min_clients : int
        ``n_min``: honest clients whose noise is guaranteed to be in the sum.
    replace_one : bool (default: False)
        Sensitivity of replace-one DP (twice a client's bounds) instead of
        zero-out / add-remove (one client's bounds).
    """
    c = float(clip_norm)
    s = float(scale)
    z = float(noise_multiplier)
    for name, value in (("clip norm", c), ("scale", s)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be finite and positive, got {value}")
    if not math.isfinite(z) or z < 0:
        raise ValueError(f"noise multiplier must be finite and non-negative, got {z}")
    if int(min_clients) != min_clients or min_clients < 1:
        raise ValueError(f"min_clients must be a positive integer, got {min_clients}")
    n = int(min_clients)
    rounding_bound = conditional_rounding_bound(s * c, dim, beta)
    l1_bound = l1_sensitivity_bound(rounding_bound, dim)
    factor = 2.0 if replace_one else 1.0
    local_sigma = z * s * c / math.sqrt(n)
    l2_sensitivity = factor * rounding_bound
    l1_sensitivity = factor * l1_bound
    return DdgRoundPlan(
        clip_norm=c,
        dim=int(dim),
        scale=s,
        beta=float(beta),
        noise_multiplier=z,
        min_clients=n,
        replace_one=bool(replace_one),
        local_sigma=local_sigma,
        rounding_bound=rounding_bound,
        l1_bound=l1_bound,
        l2_sensitivity=l2_sensitivity,
        l1_sensitivity=l1_sensitivity,
        rho=ddg_rho(l2_sensitivity, l1_sensitivity, dim, local_sigma, n),
    )
