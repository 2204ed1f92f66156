"""End to end: robust aggregation against simulated faulty clients under `flwr run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.flwr_harness import flwr_run, simulation_superlink


@pytest.mark.e2e
def test_trimmed_mean_survives_faulty_clients_that_break_the_mean(tmp_path: Path) -> None:
    """2 of 10 digits clients send 100x their update: the mean diverges, the trimmed mean learns.

    Measured on this machine, 3 rounds of 5 local epochs (2026-12-04): central accuracy
    0.814 with the trimmed mean, 0.100 with the mean (chance). The assertions keep a margin
    for noise; the per-client report names the two faulty nodes by their norm.
    """
    outputs = tmp_path / "outputs"
    common = (
        "num-server-rounds=3 fraction-evaluate=0.0 faulty-fraction=0.2 "
        "faulty-kind='scale-100' min-train-nodes=10 "
    )
    with simulation_superlink(tmp_path / "flwr-home", num_supernodes=10) as env:
        results = {
            aggregator: flwr_run(
                env,
                common + f"aggregator='{aggregator}' output-dir='{outputs / aggregator}'",
                timeout=400,
            )
            for aggregator in ("mean", "trimmed-mean")
        }
    accuracy, rounds = {}, {}
    for aggregator, result in results.items():
        runs = list((outputs / aggregator).glob("*"))
        assert len(runs) == 1, (result.stdout + result.stderr)[-3000:]
        rounds[aggregator] = json.loads((runs[0] / "metrics.json").read_text())["rounds"]
        accuracy[aggregator] = rounds[aggregator][-1]["central-accuracy"]
    assert accuracy["trimmed-mean"] >= 0.7, accuracy
    assert accuracy["mean"] < 0.3, accuracy
    report = rounds["trimmed-mean"][1]["clients"]
    norms = sorted(report, key=lambda c: c["update-norm"], reverse=True)
    assert len(report) == 10
    # The two scaled clients stand out by an order of magnitude.
    assert norms[1]["update-norm"] > 10 * norms[2]["update-norm"]
    assert "max norm" in results["trimmed-mean"].stdout + results["trimmed-mean"].stderr
