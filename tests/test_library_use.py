"""Our strategies as a library: Flower's quickstart-style ClientApp, our ServerApp strategies.

``examples/flower_quickstart_with_our_strategies`` is run with ``flwr run`` in
this project's environment (the harness's SuperLink disables runtime
dependency installation, so the example's FAB needs nothing new).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.flwr_harness import BIN, REPO, simulation_superlink

EXAMPLE = REPO / "examples" / "flower_quickstart_with_our_strategies"


def _run(env: dict[str, str], run_config: str) -> str:
    result = subprocess.run(
        [str(BIN / "flwr"), "run", str(EXAMPLE), "--stream", "--run-config", run_config],
        env=env, cwd=EXAMPLE, capture_output=True, text=True, timeout=300, check=False,
    )
    return result.stdout + result.stderr


@pytest.mark.e2e
def test_quickstart_clients_with_our_fedavg_and_dpfedavg(tmp_path: Path) -> None:
    with simulation_superlink(tmp_path / "flwr-home", num_supernodes=4) as env:
        fedavg = _run(env, "strategy='fedavg' num-server-rounds=2")
        dp = _run(env, "strategy='dp-fedavg' num-server-rounds=2")
    for log in (fedavg, dp):
        assert "finished in" in log, log[-4000:]
        assert "no valid train reply" not in log, log[-4000:]
        assert "quickstart: final eval_loss" in log, log[-4000:]
    assert "FedAvg for 2 rounds" in fedavg
    assert "DPFedAvg for 2 rounds" in dp
    found = re.search(r"quickstart: \(epsilon ([0-9.]+), delta ([0-9.e-]+)\) after 2 rounds", dp)
    assert found, dp[-4000:]
    assert float(found.group(1)) > 0
