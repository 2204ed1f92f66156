"""Simulated faulty clients, the simulation-only rule, and the per-client report in metrics.json."""

from __future__ import annotations

import numpy as np
import pytest

from app.config import ConfigError
from app.server_app import build_strategy, check_simulation_only, round_entry
from clients.faults import FAULT_KINDS, faulty_update, flip_labels, is_faulty
from data.dataset import LabeledData
from strategies.fedavg import RoundReport
from strategies.robust import CoordinateMedian, Krum, NormBound, TrimmedMean
from tests.test_privacy_statement import _config

REFERENCE = {"w": np.ones(4, np.float32)}
LOCAL = {"w": np.array([2.0, 1.0, 0.0, 1.0], np.float32)}  # update (1, 0, -1, 0)
STALE = {"w": np.zeros(4, np.float32)}


def test_each_fault_sends_what_its_name_says() -> None:
    rng = np.random.default_rng(0)
    update = LOCAL["w"] - REFERENCE["w"]
    assert np.array_equal(faulty_update("sign-flip", LOCAL, REFERENCE, STALE, rng)["w"],
                          REFERENCE["w"] - update)
    assert np.array_equal(faulty_update("scale-100", LOCAL, REFERENCE, STALE, rng)["w"],
                          REFERENCE["w"] + 100 * update)
    assert np.array_equal(faulty_update("stale", LOCAL, REFERENCE, STALE, rng)["w"], STALE["w"])
    assert np.array_equal(faulty_update("label-flip", LOCAL, REFERENCE, STALE, rng)["w"], LOCAL["w"])
    noise = faulty_update("gaussian", {"w": np.zeros(10_000, np.float32)},
                          {"w": np.zeros(10_000, np.float32)}, {}, rng)["w"]
    assert noise.dtype == np.float32 and abs(noise.std() - 1.0) < 0.03
    with pytest.raises(ValueError, match="faulty-kind"):
        faulty_update("bitflip", LOCAL, REFERENCE, STALE, rng)
    assert set(FAULT_KINDS) == {"sign-flip", "scale-10", "scale-100", "gaussian", "stale",
                                "label-flip"}


def test_the_first_fraction_of_partitions_is_faulty_and_label_flip_flips() -> None:
    assert [is_faulty(p, 10, 0.2) for p in range(10)] == [True, True] + [False] * 8
    assert not any(is_faulty(p, 10, 0.0) for p in range(10))
    data = LabeledData(np.zeros((3, 2), np.float32), np.array([0, 1, 9]), 10, "tabular", "t")
    assert flip_labels(data).y.tolist() == [9, 8, 0]


def test_faulty_clients_are_refused_outside_the_simulation_engine() -> None:
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    config = _config(faulty_fraction=0.2)
    with pytest.raises(ConfigError, match="'faulty-fraction' = 0.2.*simulation engine only"):
        check_simulation_only(config, object())  # a deployment's grid
    check_simulation_only(config, InMemoryGrid.__new__(InMemoryGrid))  # simulation: allowed
    check_simulation_only(_config(), object())  # no faults: anywhere


@pytest.mark.parametrize(
    ("aggregator", "stage"),
    [("median", CoordinateMedian), ("trimmed-mean", TrimmedMean), ("krum", Krum),
     ("multi-krum", Krum), ("norm-bound", NormBound)],
)
def test_the_aggregator_key_builds_its_stage(aggregator: str, stage: type) -> None:
    strategy = build_strategy(_config(aggregator=aggregator, byzantine_clients=1))
    assert isinstance(strategy.aggregator, stage) and strategy.report_clients
    if aggregator == "multi-krum":
        assert strategy.aggregator.keep is None


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean", "krum", "multi-krum"])
def test_robust_aggregators_under_dp_are_refused_with_the_reason(aggregator: str) -> None:
    with pytest.raises(ConfigError, match="sensitivity"):
        _config(strategy="dp-fedavg", aggregator=aggregator)


def test_norm_bound_under_dp_is_dp_fedavgs_own_clipping() -> None:
    strategy = build_strategy(_config(strategy="dp-fedavg", aggregator="norm-bound"))
    assert strategy.clipping_norm == 1.0 and not strategy.report_clients


def test_per_client_figures_reach_metrics_json_but_never_under_dp() -> None:
    figures = [{"node": 3, "update-norm": 1.5, "cosine-to-aggregate": 0.9, "status": "used"}]
    report = RoundReport(server_round=1, num_rounds=2, client_figures=figures)
    assert round_entry(report, build_strategy(_config()))["clients"] == figures
    dp = build_strategy(_config(strategy="dp-fedavg", client_report=True))
    assert not dp.report_clients  # the DP stage forbids it, whatever the config says
    empty = RoundReport(server_round=1, num_rounds=2)
    assert "clients" not in round_entry(empty, dp)
