"""DP-FedAvg through SecAgg+: clients clip, the server noises only the sum; or the clients noise it."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

from privacy.distributed_noise import ddg_rho, ddg_round_plan
from secagg.parameters import SecAggParameters
from strategies import protocol
from strategies.dp_fedavg import DPFedAvg
from strategies.fedavg import to_arrayrecord
from strategies.secure_aggregation import SecAggPlus
from tests.secagg_harness import SecureGrid

SHAPES = {"dense/kernel": (200, 60), "dense/bias": (60,), "out/kernel": (60, 10)}
NODES = [301, 302, 303, 304, 305]
Z, C, ROUNDS = 0.8, 1.0, 3


def federation(seed: int):
    rng = np.random.default_rng(seed)
    global_arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    # Updates of norm ~5-20: every one is clipped to C.
    local = {
        n: {k: (v + rng.normal(scale=0.05 * (i + 1), size=v.shape)).astype(np.float32)
            for k, v in global_arrays.items()}
        for i, n in enumerate(NODES)
    }
    return global_arrays, local, {n: 100 for n in NODES}


def clipped_mean_update(global_arrays, local, nodes) -> np.ndarray:
    keys = sorted(global_arrays)
    total = 0.0
    for n in nodes:
        update = np.concatenate([(local[n][k].astype(np.float64) - global_arrays[k]).ravel()
                                 for k in keys])
        total = total + update * min(1.0, C / np.linalg.norm(update))
    return total / len(NODES)


def run(noise_placement: str, drop_from=None, rounds: int = 1, seed: int = 0):
    global_arrays, local, examples = federation(seed)
    grid = SecureGrid(local, examples, drop_from=drop_from)
    strategy = DPFedAvg(
        noise_multiplier=Z, clipping_norm=C, fraction_train=1.0, fraction_evaluate=0.0,
        min_train_nodes=2, secure_aggregation=SecAggPlus(SecAggParameters()),
        noise_placement=noise_placement,  # type: ignore[arg-type]
    )
    result = strategy.start(grid, to_arrayrecord(dict(global_arrays)),
                            num_rounds=rounds)
    keys = sorted(global_arrays)
    new = np.concatenate([result.arrays[k].numpy().astype(np.float64).ravel() for k in keys])
    old = np.concatenate([global_arrays[k].astype(np.float64).ravel() for k in keys])
    return strategy, grid, new - old, global_arrays, local


def test_clients_clip_the_server_noises_the_unmasked_sum_and_charges_the_ledger() -> None:
    strategy, grid, moved, global_arrays, local = run("central")
    # Clients were told to clip, and the server never got an update to check.
    collect = [m for m in grid.sent
               if m.content[protocol.CONFIG][protocol.SECAGG_STAGE] == protocol.SECAGG_COLLECT]
    assert all(m.content[protocol.CONFIG][protocol.CLIPPING_NORM] == C for m in collect)
    noise = moved - clipped_mean_update(global_arrays, local, NODES)
    expected = Z * C / len(NODES)
    assert abs(noise.std() / expected - 1) < 0.05  # 12,660 draws: 5% is > 5 sigma
    figures = strategy.last_round_privacy
    assert figures["noise-stddev"] == pytest.approx(expected)
    assert "distributed-noise" not in figures


def test_the_epsilon_equals_an_independent_dp_accounting_computation() -> None:
    strategy, *_ = run("central", rounds=ROUNDS)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(Z)), ROUNDS
    )
    assert strategy.ledger.rounds == ROUNDS
    assert strategy.ledger.epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_distributed_noise_no_party_sees_a_noiseless_sum_and_the_server_adds_none() -> None:
    strategy, grid, moved, global_arrays, local = run("distributed")
    noise = moved - clipped_mean_update(global_arrays, local, NODES)
    # Sized for the t = 3 guaranteed survivors: 5 survived, so sqrt(5/3) times z C.
    expected = Z * C * math.sqrt(5 / 3) / len(NODES)
    assert abs(noise.std() / expected - 1) < 0.05
    # What the server unmasked already held that noise: it is in every client's vector
    # (each masked vector decodes to nothing, and the sum is all the server has).
    figures = strategy.last_round_privacy
    assert figures["distributed-noise"] == 1.0
    assert figures["noisy-clients-guaranteed"] == 3.0
    assert figures["local-noise-stddev"] == pytest.approx(Z * C / math.sqrt(3), rel=1e-12)


def test_distributed_noise_with_dropouts_still_holds_the_guaranteed_noise() -> None:
    # Two drop after sharing keys: exactly the t = 3 guaranteed survivors remain.
    strategy, grid, moved, global_arrays, local = run(
        "distributed", drop_from={301: protocol.SECAGG_COLLECT, 302: protocol.SECAGG_COLLECT}
    )
    survivors = NODES[2:]
    noise = moved - clipped_mean_update(global_arrays, local, survivors)
    assert abs(noise.std() / (Z * C / len(NODES)) - 1) < 0.05


def test_distributed_noise_below_its_guaranteed_survivors_voids_and_charges_nothing() -> None:
    strategy, _, moved, *_ = run(
        "distributed",
        drop_from={n: protocol.SECAGG_COLLECT for n in NODES[:3]},
    )
    assert np.all(moved == 0)
    assert strategy.ledger.rounds == 0
    assert strategy.last_aggregation_metrics["secagg-voided"] == 1.0


def test_distributed_noise_epsilon_is_the_ddg_bound_never_below_the_gaussian() -> None:
    strategy, *_ = run("distributed", rounds=2)
    dim = sum(math.prod(s) for s in SHAPES.values())
    # Independent: the continuous Gaussian of the same multiplier, no amplification.
    gaussian = dp_accounting.rdp.RdpAccountant()
    gaussian.compose(dp_accounting.GaussianDpEvent(Z), 2)
    eps_gaussian = gaussian.get_epsilon(1e-5)
    assert strategy.ledger.epsilon >= eps_gaussian
    # The rounding bound makes the sensitivity a little above s C: within 1% here.
    assert strategy.ledger.epsilon <= eps_gaussian * 1.01
    # The round was charged the DDG plan of its public parameters (t = 3 of 5).
    expected = ddg_round_plan(C, dim, 2**21 / C, math.exp(-0.5), Z, 3)
    assert strategy.last_round_privacy["rho"] == pytest.approx(expected.rho, rel=1e-12)
    assert expected.rho == pytest.approx(
        ddg_rho(expected.l2_sensitivity, expected.l1_sensitivity, dim, expected.local_sigma, 3)
    )
