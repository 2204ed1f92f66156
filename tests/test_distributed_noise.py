"""The distributed discrete Gaussian: sampler, conditional rounding, rho, events, plan.

Statistical checks use fixed seeds and tolerances whose false-failure
probability is below 1e-6 each (chi-square at 1e-7, z-tests at 6 standard
errors); references (pmf, variance, continuous Gaussian epsilon) are computed
independently of the module.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import NeighboringRelation
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from scipy import stats

from privacy.distributed_noise import (
    MAX_SIGMA,
    conditional_randomized_round,
    conditional_rounding_bound,
    ddg_dp_event,
    ddg_rho,
    ddg_round_plan,
    ddg_tau,
    gaussian_equivalent_multiplier,
    l1_sensitivity_bound,
    sample_discrete_gaussian,
)

REPO = Path(__file__).resolve().parents[1]
DELTA = 1e-5
Z_TOL = 6.0  # standard errors: two-sided normal tail 2e-9
CHI2_FALSE_FAILURE = 1e-7


def discrete_gaussian_pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Support ``|x| <= 60 sigma`` and ``exp(-x^2 / 2 sigma^2)`` normalised over it."""
    half = math.ceil(60 * sigma)
    support = np.arange(-half, half + 1)
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2.0 * sigma * sigma))
    return support, weights / weights.sum()


# -------------------------------------------------------------------- sampler
@pytest.mark.parametrize(("sigma", "seed"), [(0.7, 11), (2.0, 12), (6.0, 13)])
def test_sampler_matches_the_discrete_gaussian_pmf(sigma: float, seed: int) -> None:
    draws = sample_discrete_gaussian(sigma, 200_000, np.random.default_rng(seed))
    support, pmf = discrete_gaussian_pmf(sigma)
    n = draws.size
    assert draws.dtype == np.int64
    assert np.all(np.abs(draws) <= support[-1])

    # Chi-square over the values expected at least 20 times, tails pooled.
    expected = n * pmf
    core = expected >= 20
    lo, hi = support[core][0], support[core][-1]
    counts = np.bincount(draws - support[0], minlength=support.size)
    observed = np.concatenate(
        [counts[core], [counts[support < lo].sum(), counts[support > hi].sum()]]
    )
    wanted = np.concatenate(
        [expected[core], [expected[support < lo].sum(), expected[support > hi].sum()]]
    )
    keep = wanted > 0
    chi2 = float(np.sum((observed[keep] - wanted[keep]) ** 2 / wanted[keep]))
    df = int(keep.sum()) - 1
    assert chi2 < stats.chi2.isf(CHI2_FALSE_FAILURE, df), (chi2, df)

    # Mean 0 and the exact discrete variance (below sigma^2 for small sigma).
    variance = float(np.sum(pmf * support**2.0))
    fourth = float(np.sum(pmf * support**4.0))
    assert abs(draws.mean()) < Z_TOL * math.sqrt(variance / n)
    sample_variance = float(np.mean(draws.astype(np.float64) ** 2))
    assert abs(sample_variance - variance) < Z_TOL * math.sqrt((fourth - variance**2) / n)


def test_sampler_is_accurate_at_large_sigma() -> None:
    # Speed (a vectorised sampler: ~0.1 s for these 2M draws) is not asserted here.
    sigma = 1e4
    draws = sample_discrete_gaussian(sigma, 2_000_000, np.random.default_rng(21))
    assert draws.dtype == np.int64 and draws.shape == (2_000_000,)
    assert abs(float(np.var(draws)) / sigma**2 - 1.0) < 0.01
    assert abs(float(draws.mean())) < Z_TOL * sigma / math.sqrt(draws.size)


def test_sampler_shapes_zero_sigma_and_bad_sigma() -> None:
    rng = np.random.default_rng(31)
    block = sample_discrete_gaussian(3.0, (4, 5), rng)
    assert block.shape == (4, 5) and block.dtype == np.int64
    assert np.any(block != 0)
    zeros = sample_discrete_gaussian(0.0, 1000, rng)
    assert zeros.dtype == np.int64 and zeros.shape == (1000,) and not np.any(zeros)
    assert sample_discrete_gaussian(2.0, 0, rng).shape == (0,)
    for bad in (-1.0, -1e-12, math.nan, math.inf, 2 * MAX_SIGMA):
        with pytest.raises(ValueError):
            sample_discrete_gaussian(bad, 10, rng)


# ------------------------------------------------------------------- rounding
def test_rounding_bound_is_kls_formula() -> None:
    c, d, beta = 37.5, 400, math.exp(-0.5)
    by_hand = math.sqrt(c**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2))
    assert conditional_rounding_bound(c, d, beta) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand < c + math.sqrt(d)
    assert conditional_rounding_bound(c, d, 0.0) == c + math.sqrt(d)
    # A tiny beta makes the concentration term worse than the sure bound.
    assert conditional_rounding_bound(1.0, 4, 1e-300) == 1.0 + 2.0
    assert conditional_rounding_bound(c, d, 0.9) < conditional_rounding_bound(c, d, 0.1)
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError):
            conditional_rounding_bound(c, d, bad)
    with pytest.raises(ValueError):
        conditional_rounding_bound(-1.0, d, 0.5)
    with pytest.raises(ValueError):
        conditional_rounding_bound(c, 0, 0.5)


def test_rounding_exceeds_the_kls_bound_with_probability_at_most_beta() -> None:
    rng = np.random.default_rng(41)
    d, c, beta, trials = 100, 20.0, 0.5, 20_000
    x = rng.normal(size=d)
    x *= c / np.linalg.norm(x)
    bound = conditional_rounding_bound(c, d, beta)
    floor = np.floor(x)
    rounded = floor + (rng.random((trials, d)) < (x - floor))
    exceed = float(np.mean(np.linalg.norm(rounded, axis=1) > bound))
    assert exceed <= beta + Z_TOL * math.sqrt(beta * (1 - beta) / trials)


def test_conditional_rounding_always_meets_the_bound() -> None:
    rng = np.random.default_rng(51)
    d = 50
    x = rng.normal(scale=3.0, size=d)
    floor, ceil = np.floor(x), np.ceil(x)
    # A bound that plain randomized rounding exceeds about half the time.
    plain = floor + (rng.random((4000, d)) < (x - floor))
    bound = float(np.median(np.linalg.norm(plain, axis=1)))
    for _ in range(2000):
        rounded = conditional_randomized_round(x, bound, rng)
        assert rounded.dtype == np.int64 and rounded.shape == x.shape
        assert np.linalg.norm(rounded) <= bound
        assert np.all((rounded == floor) | (rounded == ceil))


def test_conditional_rounding_is_unbiased_with_a_generous_bound() -> None:
    rng = np.random.default_rng(61)
    x = np.array([[0.25, -1.5, 3.9, -0.01], [7.0, 2.5, -2.75, 0.6]])
    bound = float(np.linalg.norm(x)) + math.sqrt(x.size)  # never binding
    trials = 20_000
    total = np.zeros_like(x)
    for _ in range(trials):
        total += conditional_randomized_round(x, bound, rng)
    frac = x - np.floor(x)
    stderr = np.sqrt(frac * (1 - frac) / trials)
    assert np.all(np.abs(total / trials - x) <= Z_TOL * stderr + 1e-12)


def test_conditional_rounding_refuses_what_it_cannot_meet() -> None:
    rng = np.random.default_rng(71)
    # Every rounding of [1.5]*4 has norm >= 2.
    with pytest.raises(ValueError, match="no rounding"):
        conditional_randomized_round(np.full(4, 1.5), 1.0, rng)
    # Possible (all down), but with probability 2**-40 per attempt.
    with pytest.raises(RuntimeError):
        conditional_randomized_round(np.full(40, 0.5), 0.0, rng, max_tries=50)
    # Bound 0 on [0.5]*4 is met by rounding all down (1/16 per attempt).
    assert not np.any(conditional_randomized_round(np.full(4, 0.5), 0.0, rng))
    with pytest.raises(ValueError):
        conditional_randomized_round(np.array([1.0, math.nan]), 10.0, rng)
    with pytest.raises(ValueError):
        conditional_randomized_round(np.ones(3), -1.0, rng)


# ----------------------------------------------------------------- accounting
def test_l1_bound() -> None:
    assert l1_sensitivity_bound(3.0, 100) == 9.0  # integers: ||v||_1 <= ||v||_2^2
    assert l1_sensitivity_bound(300.0, 100) == 3000.0  # sqrt(d) ||v||_2
    with pytest.raises(ValueError):
        l1_sensitivity_bound(-1.0, 10)


def test_one_client_is_the_discrete_gaussian() -> None:
    for sigma in (0.2, 0.5, 1.0, 7.5, 300.0):
        for delta2 in (1.0, 12.0):
            rho = ddg_rho(delta2, l1_sensitivity_bound(delta2, 64), 64, sigma, 1)
            assert rho == pytest.approx(delta2**2 / (2 * sigma**2), rel=1e-12)
    assert ddg_tau(0.3, 1) == 0.0


def test_rho_matches_kls_proposition_14_by_hand() -> None:
    sigma, n, d, delta2, delta1 = 0.8, 5, 20, 6.0, 25.0
    tau = 10 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, n))
    assert ddg_tau(sigma, n) == pytest.approx(tau, rel=1e-12)
    s = math.sqrt(n) * sigma
    by_hand = min(
        delta2**2 / (2 * s**2) + tau * d,
        0.5 * (delta2**2 / s**2 + 2 * delta1 * tau / s + tau**2 * d),
        0.5 * (delta2 / s + tau * math.sqrt(d)) ** 2,
        delta2**2 / (2 * sigma**2),
    )
    assert ddg_rho(delta2, delta1, d, sigma, n) == pytest.approx(by_hand, rel=1e-12)
    # Here tau matters: the bound is above the continuous Gaussian's.
    assert by_hand > delta2**2 / (2 * s**2) * 1.01


def test_rho_falls_with_sigma_and_never_beats_the_gaussian() -> None:
    n, d, delta2 = 10, 1000, 50.0
    delta1 = l1_sensitivity_bound(delta2, d)
    sigmas = np.geomspace(0.05, 1000.0, 80)
    rhos = [ddg_rho(delta2, delta1, d, s, n) for s in sigmas]
    assert all(a > b for a, b in zip(rhos, rhos[1:]))
    for sigma, rho in zip(sigmas, rhos):
        gaussian = delta2**2 / (2 * n * sigma**2)
        assert rho >= gaussian * (1 - 1e-12)
        if sigma >= 3.0:  # tau < 1e-36: the Gaussian of variance n sigma^2
            assert rho == pytest.approx(gaussian, rel=1e-9)
    # Small sigma: the tau penalty (and, below 1/2, one share's bound) shows.
    assert ddg_rho(delta2, delta1, d, 0.6, n) > delta2**2 / (2 * n * 0.36) * 1.5
    assert ddg_rho(delta2, delta1, d, 0.3, n) == pytest.approx(delta2**2 / (2 * 0.09))


def test_rho_is_never_above_one_honest_share_alone() -> None:
    """At sigma = 1/2, n = 2, d = 1000, tau d ~ 850: one share's CKS bound is far smaller."""
    delta2, d = 5.0, 1000
    single = delta2**2 / (2 * 0.25)
    assert ddg_rho(delta2, l1_sensitivity_bound(delta2, d), d, 0.5, 2) == pytest.approx(single)
    for n in (2, 10, 1000):
        for sigma in (0.5, 0.6, 1.0, 4.0):
            assert ddg_rho(delta2, 25.0, d, sigma, n) <= delta2**2 / (2 * sigma**2)


def test_rho_edge_cases() -> None:
    assert ddg_rho(5.0, 25.0, 10, 0.0, 3) == math.inf
    assert ddg_rho(0.0, 0.0, 10, 1.0, 3) == 0.0
    for args in (
        (-1.0, 1.0, 10, 1.0, 2),
        (1.0, -1.0, 10, 1.0, 2),
        (1.0, 1.0, 0, 1.0, 2),
        (1.0, 1.0, 10, -1.0, 2),
        (1.0, 1.0, 10, math.nan, 2),
        (1.0, 1.0, 10, 1.0, 0),
        (1.0, 1.0, 10, 1.0, 2.5),
    ):
        with pytest.raises(ValueError):
            ddg_rho(*args)


def rdp_epsilon(event: dp_accounting.DpEvent, rounds: int, relation: NeighboringRelation) -> float:
    accountant = RdpAccountant(neighboring_relation=relation)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(DELTA))


@pytest.mark.parametrize(
    "relation", [NeighboringRelation.ADD_OR_REMOVE_ONE, NeighboringRelation.REPLACE_ONE]
)
def test_event_epsilon_equals_the_gaussian_when_tau_vanishes_and_exceeds_it_otherwise(
    relation: NeighboringRelation,
) -> None:
    n, d, delta2, rounds = 20, 500, 30.0, 100
    delta1 = l1_sensitivity_bound(delta2, d)
    for sigma in (8.0, 40.0, 200.0):  # tau ~ 0
        event = ddg_dp_event(ddg_rho(delta2, delta1, d, sigma, n))
        gaussian = dp_accounting.GaussianDpEvent(sigma * math.sqrt(n) / delta2)
        assert rdp_epsilon(event, rounds, relation) == pytest.approx(
            rdp_epsilon(gaussian, rounds, relation), rel=1e-9
        )
    for sigma in (0.2, 0.55, 0.7, 1.0, 2.0, 8.0, 40.0):
        event = ddg_dp_event(ddg_rho(delta2, delta1, d, sigma, n))
        gaussian = dp_accounting.GaussianDpEvent(sigma * math.sqrt(n) / delta2)
        assert rdp_epsilon(event, rounds, relation) >= rdp_epsilon(gaussian, rounds, relation) * (
            1 - 1e-12
        )
    event = ddg_dp_event(ddg_rho(delta2, delta1, d, 0.7, n))
    gaussian = dp_accounting.GaussianDpEvent(0.7 * math.sqrt(n) / delta2)
    assert rdp_epsilon(event, rounds, relation) > 1.1 * rdp_epsilon(gaussian, rounds, relation)


def test_event_is_rdp_only_and_refuses_amplification_and_pld() -> None:
    event = ddg_dp_event(0.05)
    assert isinstance(event, dp_accounting.ZCDpEvent) and event.rho == 0.05
    assert gaussian_equivalent_multiplier(0.05) == pytest.approx(1 / math.sqrt(0.1))
    assert RdpAccountant().supports(event)
    assert not RdpAccountant().supports(dp_accounting.PoissonSampledDpEvent(0.1, event))
    assert not RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE).supports(
        dp_accounting.SampledWithoutReplacementDpEvent(100, 10, event)
    )
    assert not PLDAccountant().supports(event)
    assert isinstance(ddg_dp_event(0.0), dp_accounting.NoOpDpEvent)
    assert isinstance(ddg_dp_event(math.inf), dp_accounting.NonPrivateDpEvent)
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError):
            ddg_dp_event(bad)


# ----------------------------------------------------------------------- plan
def test_round_plan_noise_sums_to_the_central_multiplier() -> None:
    clip, d, scale, beta, z, n_min = 0.5, 300, 200.0, math.exp(-0.5), 1.2, 4
    plan = ddg_round_plan(clip, d, scale, beta, z, n_min)
    target = z * scale * clip
    assert plan.local_sigma * math.sqrt(n_min) == pytest.approx(target, rel=1e-12)
    assert plan.rounding_bound == conditional_rounding_bound(scale * clip, d, beta)
    assert plan.rounding_bound > scale * clip
    assert plan.l1_bound == l1_sensitivity_bound(plan.rounding_bound, d)
    assert plan.rho == ddg_rho(plan.rounding_bound, plan.l1_bound, d, plan.local_sigma, n_min)
    # tau vanishes at sigma = 60: rho is the Gaussian's at the rounded sensitivity.
    assert plan.rho == pytest.approx(plan.rounding_bound**2 / (2 * target**2), rel=1e-9)
    assert plan.rho > 1 / (2 * z**2)
    assert plan.dp_event() == dp_accounting.ZCDpEvent(plan.rho)

    shares = sample_discrete_gaussian(plan.local_sigma, (n_min, 100_000), np.random.default_rng(81))
    total = shares.sum(axis=0).astype(np.float64)
    sample_sd = math.sqrt(float(np.mean(total**2)))
    # sd of the sample sd of a near-Gaussian: target / sqrt(2 N).
    assert abs(sample_sd - target) < Z_TOL * target / math.sqrt(2 * total.size)


def test_round_plan_replace_one_doubles_the_sensitivities() -> None:
    zero_out = ddg_round_plan(1.0, 1000, 100.0, 0.5, 1.0, 10)
    replace = ddg_round_plan(1.0, 1000, 100.0, 0.5, 1.0, 10, replace_one=True)
    assert replace.l2_sensitivity == 2 * zero_out.l2_sensitivity == 2 * zero_out.rounding_bound
    assert replace.l1_sensitivity == 2 * zero_out.l1_sensitivity
    assert replace.rho == pytest.approx(4 * zero_out.rho, rel=1e-9)
    for bad in (
        dict(clip_norm=0.0),
        dict(scale=-1.0),
        dict(noise_multiplier=-0.1),
        dict(min_clients=0),
        dict(beta=1.0),
    ):
        args = dict(
            clip_norm=1.0, dim=10, scale=10.0, beta=0.5, noise_multiplier=1.0, min_clients=2
        )
        args.update(bad)
        with pytest.raises(ValueError):
            ddg_round_plan(**args)


# --------------------------------------------------------------------- import
def test_import_loads_no_tensorflow_flower_or_accountant() -> None:
    code = (
        "import sys\n"
        "import privacy.distributed_noise\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'tensorflow', 'keras', 'tf_keras', 'flwr', 'dp_accounting'})\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
