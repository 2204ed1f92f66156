"""Beyond one machine: Flower's simulation joins an existing Ray cluster (a head and a worker node).

Nothing of ours is involved in the distribution: the SuperLink's simulation
runtime calls ``ray.init()``, which joins the cluster named by ``RAY_ADDRESS``
(README, "Beyond one machine"). The two Ray nodes run on loopback here; the
test stops every process it started, by PID, and no other.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.flwr_harness import BIN, flwr_run, free_port, simulation_superlink

RAY = BIN / "ray"


def _processes_under(marker: str) -> list[int]:
    """PIDs of the processes whose command line names ``marker`` (our Ray temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if marker in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def _ray_start(*args: str, env: dict[str, str]) -> None:
    result = subprocess.run([str(RAY), "start", *args], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.e2e
def test_a_simulation_runs_its_clients_on_both_nodes_of_a_ray_cluster(tmp_path: Path) -> None:
    # Ray's Unix sockets live under --temp-dir: keep the path short.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    common = ["--num-cpus=2", "--object-store-memory=100000000", f"--temp-dir={temp_dir}",
              "--disable-usage-stats"]
    try:
        _ray_start("--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                   "--include-dashboard=false", *common, env=env)
        _ray_start(f"--address={address}", "--node-ip-address=127.0.0.1", *common, env=env)
        outputs = tmp_path / "outputs"
        # Each ClientApp actor takes 2 CPUs: one fits on each node.
        with simulation_superlink(tmp_path / "flwr-home", num_supernodes=4,
                                  extra_env={"RAY_ADDRESS": address},
                                  client_cpus=2) as flwr_env:
            result = flwr_run(
                flwr_env,
                f"num-server-rounds=2 local-epochs=1 fraction-evaluate=0.0 "
                f"min-evaluate-nodes=0 output-dir='{outputs}'",
                timeout=400,
            )
            log = result.stdout + result.stderr
            runs = list(outputs.glob("*")) if outputs.exists() else []
            assert len(runs) == 1 and (runs[0] / "metrics.json").exists(), log[-5000:]
            rounds = json.loads((runs[0] / "metrics.json").read_text())["rounds"]
            assert [r["round"] for r in rounds] == [0, 1, 2]
            probe = subprocess.run(
                [str(BIN / "python"), "-c",
                 "import json, ray\n"
                 "from ray._private import state\n"
                 f"ray.init(address='{address}', logging_level='ERROR')\n"
                 "nodes = sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])\n"
                 "actors = state.actors().values()\n"
                 "ran = sorted({a['Address']['NodeID'] for a in actors\n"
                 "              if 'ClientAppActor' in a['ActorClassName']})\n"
                 "print(json.dumps({'nodes': nodes, 'ran': ran}))\n"],
                env=env, capture_output=True, text=True, timeout=120, check=False,
            )
            assert probe.returncode == 0, probe.stderr[-3000:]
            found = json.loads(probe.stdout.strip().splitlines()[-1])
            assert len(found["nodes"]) == 2, found
            assert set(found["ran"]) == set(found["nodes"]), found
    finally:
        for pid in _processes_under(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)
        left = _processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes outlived SIGKILL: {left}"
