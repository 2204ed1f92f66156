"""End to end: `flwr run` in Flower's simulation engine, 3 clients, 2 rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.flwr_harness import flwr_run, simulation_superlink


@pytest.mark.e2e
def test_flwr_run_writes_metrics_and_model_and_learns(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    with simulation_superlink(tmp_path / "flwr-home", num_supernodes=3) as env:
        result = flwr_run(
            env,
            f"num-server-rounds=2 min-train-nodes=3 min-evaluate-nodes=3 "
            f"output-dir='{outputs}'",
            timeout=400,
        )
    log = result.stdout + result.stderr
    runs = list(outputs.glob("*")) if outputs.exists() else []
    assert len(runs) == 1, f"expected one run folder in {outputs}; flwr run said:\n{log[-4000:]}"
    run_dir = runs[0]
    assert (run_dir / "model.keras").stat().st_size > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["num-server-rounds"] == 2
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["central-accuracy"] > rounds[0]["central-accuracy"]
    assert all(r["num-accepted"] == 3 and r["num-rejected"] == 0 for r in rounds[1:])
    assert all(k in rounds[1] for k in ("train-loss", "central-loss", "elapsed-s", "federated-accuracy"))
    assert "[round 2/2]" in log


@pytest.mark.e2e
def test_bad_run_config_fails_before_round_one(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    with simulation_superlink(tmp_path / "flwr-home", num_supernodes=2) as env:
        result = flwr_run(env, f"partitioner='random' output-dir='{outputs}'", timeout=200)
    log = result.stdout + result.stderr
    assert "'partitioner' = 'random' is not allowed" in log, log[-4000:]
    assert "[round 1/" not in log
    assert not outputs.exists()


@pytest.mark.e2e
def test_dp_fedavg_run_writes_a_growing_epsilon_ledger(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    with simulation_superlink(tmp_path / "flwr-home", num_supernodes=4) as env:
        result = flwr_run(
            env,
            "strategy='dp-fedavg' noise-multiplier=0.8 clipping-norm=1.0 fraction-train=0.5 "
            f"num-server-rounds=2 min-evaluate-nodes=2 output-dir='{outputs}'",
            timeout=400,
        )
    log = result.stdout + result.stderr
    runs = list(outputs.glob("*")) if outputs.exists() else []
    assert len(runs) == 1, log[-4000:]
    rounds = json.loads((runs[0] / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    eps = [r["epsilon"] for r in rounds[1:]]
    assert 0 < eps[0] < eps[1]
    assert all(r["delta"] == 1e-5 and r["clipping-norm"] == 1.0 for r in rounds[1:])
    assert all(r["noise-stddev"] == pytest.approx(0.8 * 1.0 / (0.5 * 4)) for r in rounds[1:])
    assert "projected epsilon after 2 rounds" in log
