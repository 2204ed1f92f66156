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
