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


@pytest.mark.e2e
def test_two_dp_runs_with_the_same_config_and_seed_release_independent_noise(
    tmp_path: Path,
) -> None:
    """Defect: DP noise was derived from the run-config seed, so a second run replayed it.

    A learning rate of 1e-9 makes every client update ~0, so one DP round
    releases the initial model (the same in both runs: seeded) plus noise of
    std z C / m. Replayed noise would make the two final models equal;
    independent noise makes their difference std sqrt(2) z C / m.
    """
    import numpy as np

    z, clip, nodes = 1.0, 1.0, 4
    outputs = tmp_path / "outputs"
    config = (
        f"strategy='dp-fedavg' noise-multiplier={z} clipping-norm={clip} fraction-train=1.0 "
        f"learning-rate=1e-9 local-epochs=1 seed=7 num-server-rounds=1 fraction-evaluate=0.0 "
        f"min-train-nodes={nodes} output-dir='{outputs}'"
    )
    with simulation_superlink(tmp_path / "flwr-home", num_supernodes=nodes) as env:
        logs = [flwr_run(env, config, timeout=400) for _ in range(2)]
    runs = sorted(outputs.glob("*")) if outputs.exists() else []
    assert len(runs) == 2, "\n".join((r.stdout + r.stderr)[-3000:] for r in logs)
    finals = []
    for run in runs:
        with np.load(run / "checkpoints" / "round-1" / "arrays.npz") as saved:
            finals.append(np.concatenate([saved[k].ravel().astype(np.float64) for k in saved]))
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["privacy"]["private"] is True
        assert metrics["privacy"]["relation"].startswith("zero-out")
        assert "not-private" not in metrics["rounds"][1]
    sigma = z * clip / (1.0 * nodes)
    assert abs(np.std(finals[0] - finals[1]) / (np.sqrt(2.0) * sigma) - 1.0) < 0.05
