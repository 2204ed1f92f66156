"""The epsilon ledger against independent dp-accounting and tensorflow-privacy computations."""

from __future__ import annotations

import math
import sys

import dp_accounting
import numpy as np
import pytest
from dp_accounting import NeighboringRelation
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from privacy.accounting import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    delta_warning,
    effective_noise_multiplier,
    local_dp_epsilon,
    projected_epsilon,
    round_event,
)
from privacy.local_dp import (
    LOCAL_SENSITIVITY_FACTOR,
    analytic_gaussian_sigma,
    classic_gaussian_sigma,
    gaussian_delta,
    local_dp_noise_stddev,
    privatize_update,
)

sys.skip_tf_privacy_import = True  # tensorflow_privacy's __init__ fails on TF 2.21
from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib  # noqa: E402
from tensorflow_privacy.privacy.analysis import compute_noise_from_budget_lib  # noqa: E402

DELTA = 1e-5


def independent_poisson_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    return accountant.get_epsilon(delta)


def independent_fixed_epsilon(n: int, m: int, z: float, rounds: int, delta: float) -> float:
    # Replace-one: one client's clipped update (norm <= C) replaced by another
    # moves the sum by up to 2C, so the multiplier relative to that sensitivity
    # is z / 2 (see test_rdp_replace_one_multiplier_is_relative_to_replace_sensitivity).
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    accountant.compose(
        dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z / 2)),
        rounds,
    )
    return accountant.get_epsilon(delta)


def test_poisson_ledger_matches_dp_accounting_and_never_decreases() -> None:
    q, z, rounds = 0.1, 1.1, 30
    ledger = PrivacyLedger("poisson", DELTA, compute_pld=False)
    history = [ledger.epsilon]
    for _ in range(rounds):
        ledger.compose(round_event("poisson", z, sampling_rate=q))
        history.append(ledger.epsilon)
    assert history == sorted(history) and history[0] == 0.0
    for k in (1, 7, rounds):
        assert history[k] == pytest.approx(independent_poisson_epsilon(q, z, k, DELTA), abs=1e-6)


def test_poisson_ledger_matches_tensorflow_privacy() -> None:
    """tf-privacy's DP-SGD statement helper: q = 1/8, 16 rounds = 2 'epochs'."""
    q, z, rounds = 0.125, 0.9, 16
    ledger = PrivacyLedger("poisson", DELTA, compute_pld=False)
    for _ in range(rounds):
        ledger.compose(round_event("poisson", z, sampling_rate=q))
    tfp_epsilon = compute_dp_sgd_privacy_lib._compute_dp_sgd_example_privacy(  # pylint: disable=protected-access
        num_epochs=rounds * q,
        noise_multiplier=z,
        example_delta=DELTA,
        used_microbatching=False,
        poisson_subsampling_probability=q,
    )
    assert ledger.epsilon == pytest.approx(tfp_epsilon, abs=1e-6)
    # the deprecated public helper uses coarser RDP orders: close, never tighter by much
    legacy, _ = compute_dp_sgd_privacy_lib.compute_dp_sgd_privacy(
        n=800, batch_size=100, noise_multiplier=z, epochs=2, delta=DELTA
    )
    assert ledger.epsilon == pytest.approx(legacy, rel=0.03)


def test_fixed_size_ledger_matches_dp_accounting_replace_one() -> None:
    n, m, z, rounds = 50, 10, 1.4, 12
    ledger = PrivacyLedger("fixed", DELTA)
    history = []
    for _ in range(rounds):
        ledger.compose(round_event("fixed", z, num_nodes=n, sample_size=m))
        history.append(ledger.epsilon)
    assert history == sorted(history)
    assert ledger.relation is NeighboringRelation.REPLACE_ONE
    assert ledger.epsilon_pld is None  # dp-accounting has no PLD for sampling w/o replacement
    for k in (1, rounds):
        assert history[k - 1] == pytest.approx(
            independent_fixed_epsilon(n, m, z, k, DELTA), abs=1e-6
        )
    # Poisson with the same rate under add/remove is a different (weaker-neighbour) guarantee
    poisson = independent_poisson_epsilon(m / n, z, rounds, DELTA)
    assert ledger.epsilon > poisson


def test_rdp_replace_one_multiplier_is_relative_to_replace_sensitivity() -> None:
    """Why the fixed-size event uses z / 2.

    dp-accounting's PLD accountant treats REPLACE_ONE as a shift of twice the
    per-record bound (PLD(REPLACE_ONE, z) == PLD(ADD_OR_REMOVE, z / 2)); its RDP
    accountant gives GaussianDpEvent(z) the same RDP under both relations, i.e.
    z is relative to the replace-one sensitivity and must be halved by the caller.
    """
    z, k = 2.0, 10

    def eps(accountant_type, relation, multiplier):
        accountant = accountant_type(neighboring_relation=relation)
        accountant.compose(dp_accounting.GaussianDpEvent(multiplier), k)
        return accountant.get_epsilon(DELTA)

    add_remove, replace = NeighboringRelation.ADD_OR_REMOVE_ONE, NeighboringRelation.REPLACE_ONE
    assert eps(PLDAccountant, replace, z) == pytest.approx(
        eps(PLDAccountant, add_remove, z / 2), rel=1e-3
    )
    assert eps(RdpAccountant, replace, z) == pytest.approx(
        eps(RdpAccountant, add_remove, z), rel=1e-12
    )
    assert eps(RdpAccountant, replace, z / 2) > 1.5 * eps(RdpAccountant, replace, z)


def test_pld_epsilon_matches_and_is_tighter() -> None:
    q, z, rounds = 0.2, 1.0, 5
    ledger = PrivacyLedger("poisson", DELTA, compute_pld=True)
    for _ in range(rounds):
        ledger.compose(round_event("poisson", z, sampling_rate=q))
    independent = PLDAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    independent.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    assert ledger.epsilon_pld == pytest.approx(independent.get_epsilon(DELTA), abs=1e-6)
    assert ledger.epsilon_pld < ledger.epsilon


def test_cached_pld_equals_pld_accountant_across_mixed_rounds() -> None:
    """Each event's PLD is built once; the figure must stay PLDAccountant's, every round."""
    ledger = PrivacyLedger("poisson", 1e-3, compute_pld=True)
    events = [round_event("poisson", z, sampling_rate=q)
              for z, q in [(1.4, 0.1), (1.4, 0.1), (0.9, 0.1), (1.4, 0.1), (1.4, 0.05)]]
    for index, event in enumerate(events, start=1):
        ledger.compose(event)
        independent = PLDAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
        for earlier in events[:index]:
            independent.compose(earlier)
        # Same PLDs; only the order of the FFT compositions differs (float rounding).
        assert ledger.epsilon_pld == pytest.approx(independent.get_epsilon(1e-3), rel=1e-9)
    assert len(ledger._pld_of_event) == 3  # three distinct events, each built once


def test_adaptive_round_event_composes_update_and_count_queries() -> None:
    z, sigma_b, q = 1.0, 2.5, 0.3
    z_update = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert effective_noise_multiplier([z_update, 2 * sigma_b]) == pytest.approx(z, rel=1e-12)
    ledger = PrivacyLedger("poisson", DELTA, compute_pld=False)
    ledger.compose(round_event("poisson", [z_update, 2 * sigma_b], sampling_rate=q))
    two_queries = RdpAccountant()
    two_queries.compose(
        dp_accounting.PoissonSampledDpEvent(
            q,
            dp_accounting.ComposedDpEvent(
                [
                    dp_accounting.GaussianDpEvent(z_update),
                    dp_accounting.GaussianDpEvent(2 * sigma_b),
                ]
            ),
        )
    )
    assert ledger.epsilon == pytest.approx(two_queries.get_epsilon(DELTA), abs=1e-6)


def test_no_noise_is_infinite_epsilon() -> None:
    ledger = PrivacyLedger("poisson", DELTA, compute_pld=False)
    ledger.compose(round_event("poisson", 0.0, sampling_rate=0.5))
    assert math.isinf(ledger.epsilon)


def test_budget_checks_and_projection() -> None:
    q, z = 0.25, 1.2
    event = round_event("poisson", z, sampling_rate=q)
    ledger = PrivacyLedger("poisson", DELTA, compute_pld=False)
    eps_10 = projected_epsilon("poisson", z, 10, DELTA, sampling_rate=q)
    assert eps_10 == pytest.approx(independent_poisson_epsilon(q, z, 10, DELTA), abs=1e-6)
    assert ledger.affordable_rounds(event, eps_10, 50) == 10
    for _ in range(9):
        ledger.compose(event)
    assert not ledger.would_exceed(event, eps_10 + 1e-9)
    ledger.compose(event)
    assert ledger.would_exceed(event, eps_10 + 1e-9)
    assert ledger.epsilon == pytest.approx(eps_10, abs=1e-9)


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_calibration_hits_the_target(sampling: str) -> None:
    target, rounds, q, n = 2.0, 40, 0.1, 200
    z = calibrate_noise_multiplier(target, DELTA, rounds, q, sampling, num_nodes=n, tol=1e-4)
    kwargs = {"sampling_rate": q} if sampling == "poisson" else {"num_nodes": n, "sample_size": 20}
    assert projected_epsilon(sampling, z, rounds, DELTA, **kwargs) <= target
    assert projected_epsilon(sampling, z - 2e-4, rounds, DELTA, **kwargs) > target
    if sampling == "poisson":  # independent calibration with dp-accounting's own search
        independent = dp_accounting.calibrate_dp_mechanism(
            RdpAccountant,
            lambda s: dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), rounds
            ),
            target,
            DELTA,
            dp_accounting.LowerEndpointAndGuess(0.3, 1.0),
        )
        assert z == pytest.approx(independent, abs=2e-4)
        tfp = compute_noise_from_budget_lib.compute_noise(n, 20, target, rounds * q, DELTA, 0.3)
        assert z == pytest.approx(tfp, rel=0.03)  # tf-privacy uses coarser orders


def test_delta_warning() -> None:
    assert delta_warning(1e-5, 1000) is None
    assert "1/N" in delta_warning(1e-5, 200_000)


# ------------------------------------------------------------------- local DP
def test_analytic_gaussian_sigma_is_exact_and_beats_classic() -> None:
    for eps in (0.5, 1.0, 4.0):
        sigma = analytic_gaussian_sigma(eps, DELTA, sensitivity=3.0)
        assert gaussian_delta(sigma, eps, 3.0) == pytest.approx(DELTA, rel=1e-6)
        assert gaussian_delta(0.99 * sigma, eps, 3.0) > DELTA
    assert analytic_gaussian_sigma(0.5, DELTA) < classic_gaussian_sigma(0.5, DELTA)
    assert gaussian_delta(classic_gaussian_sigma(0.5, DELTA), 0.5) < DELTA
    with pytest.raises(ValueError):
        classic_gaussian_sigma(2.0, DELTA)  # the classic bound is not valid for eps >= 1


def test_local_dp_update_noise_and_composition() -> None:
    clip, eps, rng = 0.8, 3.0, np.random.default_rng(4)
    sigma = local_dp_noise_stddev(clip, eps, DELTA)
    assert sigma == pytest.approx(
        analytic_gaussian_sigma(eps, DELTA, LOCAL_SENSITIVITY_FACTOR * clip)
    )
    update = {"w": np.full(40_000, 5.0)}
    noised, returned = privatize_update(update, clip, eps, DELTA, rng)
    assert returned == sigma
    assert np.std(noised["w"]) == pytest.approx(sigma, rel=0.02)
    assert np.mean(noised["w"]) == pytest.approx(clip / 200.0, abs=4 * sigma / 200.0)
    single = local_dp_epsilon(sigma / (2 * clip), 1, DELTA)
    assert local_dp_epsilon(sigma / (2 * clip), 10, DELTA) > single > 0
