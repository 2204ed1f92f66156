"""A deployment survives a SuperLink crash: its state in a database file, the run resumed.

TLS + auth deployment, 2 SuperNodes, a 4-round DP-FedAvg run. After round 2
the SuperLink (with the ServerApp it runs) is SIGKILLed and started again on
the same database; the SuperNodes, never restarted, reconnect under their
node IDs without being registered again; the run is continued with
``resume``. No round is lost or repeated and the ledger charges exactly four
rounds.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.deploy_harness import finish, loopback_deployment, wait_for_log

CONFIG = ("num-server-rounds=4 local-epochs=1 batch-size=32 fraction-evaluate=0.0 "
          "min-evaluate-nodes=0 strategy='dp-fedavg' client-sampling='fixed' fraction-train=1.0 "
          "min-train-nodes=2 noise-multiplier=0.5 clipping-norm=1.0 round-timeout=120 "
          "node-wait-timeout=180")


@pytest.mark.e2e
def test_a_killed_superlink_restarts_with_its_nodes_and_the_run_resumes(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    with loopback_deployment(tmp_path / "deployment", num_supernodes=2) as deployment:
        node_ids = [slot.node_id for slot in deployment.supernodes]
        pids = [slot.process.pid for slot in deployment.supernodes]  # type: ignore[union-attr]
        assert deployment.database is not None
        run = deployment.start_run(f"{CONFIG} output-dir='{outputs}'", log_path=tmp_path / "1.log")
        wait_for_log(run, r"\[round 2/4\]", 600)
        assert deployment.superlink is not None
        deployment.superlink.kill()  # the SuperLink and everything it started (the ServerApp)
        finish(run, timeout=120)  # `flwr run` loses its SuperLink and ends
        run_dirs = list(outputs.glob("*"))
        assert len(run_dirs) == 1
        before = json.loads((run_dirs[0] / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in before][:3] == [0, 1, 2]

        deployment.restart_superlink()
        # The SuperNodes reconnect by themselves (no registration, no restart).
        for slot in deployment.supernodes:
            assert slot.process is not None and slot.process.running()
        resumed = deployment.start_run(
            f"{CONFIG} output-dir='{outputs}' resume='{run_dirs[0]}'",
            log_path=tmp_path / "2.log",
        )
        code = finish(resumed, timeout=900)
        log = resumed.log_text()
        pids_after = [slot.process.pid for slot in deployment.supernodes]  # type: ignore[union-attr]
        assert [slot.node_id for slot in deployment.supernodes] == node_ids
    assert pids_after == pids  # the same SuperNode processes, never restarted or re-registered
    assert code == 0, log[-4000:]
    rounds = json.loads((run_dirs[0] / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4], rounds
    assert re.search(r"\[round 4/4\]", log)
    # No epsilon lost, none double-counted: round k's epsilon is that of k identical rounds.
    from privacy.accounting import projected_epsilon

    for entry in rounds[1:]:
        expected = projected_epsilon("fixed", 0.5, entry["round"], 1e-5, num_nodes=2,
                                     sample_size=2)
        assert entry["epsilon"] == pytest.approx(expected, rel=1e-9), entry
    assert math.isfinite(rounds[4]["epsilon"])
