"""The log a user sees: no third-party noise, no duplicated lines, a bounded length.

``FEDPRIVACY_VERBOSE=1`` turns the quiet set-up (app/logs.py) off; these tests
check the default.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flwr_harness import REPO, flwr_run, simulation_superlink

#: Third-party noise that must never reach the user's log.
NOISE = ("cuInit", "oneDNN", "Could not find cuda drivers", "absl::InitializeLog",
         "FutureWarning", "DeprecationWarning")

#: Lines of a run: a fixed part (start-up, summary, final report) and a part per round.
FIXED_LINES, LINES_PER_ROUND = 24, 3.6  # 10 rounds: at most 60 lines


def line_budget(rounds: int) -> int:
    return int(FIXED_LINES + LINES_PER_ROUND * rounds)


def _noise(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(word in line for word in NOISE)]


def _duplicates(log: str) -> list[str]:
    """Flower lines printed a second time by a root-logger handler (``INFO:flwr:...``)."""
    return [line for line in log.splitlines() if re.search(r"\b(INFO|WARNING|ERROR):flwr:", line)]


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, float]]:
    """One SuperLink; a short default run and a short DP run (log, seconds)."""
    tmp = tmp_path_factory.mktemp("quiet-log")
    out: dict[str, tuple[str, float]] = {}
    env_extra = {k: v for k, v in os.environ.items() if k != "FEDPRIVACY_VERBOSE"}
    os.environ.pop("FEDPRIVACY_VERBOSE", None)
    try:
        with simulation_superlink(tmp / "flwr-home", num_supernodes=2) as env:
            for name, config in (
                ("fedavg", "num-server-rounds=2 local-epochs=1"),
                ("dp-fedavg", "strategy='dp-fedavg' num-server-rounds=2 local-epochs=1"),
            ):
                start = time.monotonic()
                result = flwr_run(env, f"{config} output-dir='{tmp / name}'", timeout=300)
                out[name] = (result.stdout + result.stderr, time.monotonic() - start)
                runs = list((tmp / name).glob("*")) if (tmp / name).exists() else []
                assert len(runs) == 1, out[name][0][-4000:]
                rounds = json.loads((runs[0] / "metrics.json").read_text())["rounds"]
                assert [r["round"] for r in rounds] == [0, 1, 2]
    finally:
        os.environ.clear()
        os.environ.update(env_extra)
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["fedavg", "dp-fedavg"])
def test_log_has_no_third_party_noise_and_no_duplicates(
    logs: dict[str, tuple[str, float]], name: str
) -> None:
    log, _ = logs[name]
    assert _noise(log) == [], log
    assert _duplicates(log) == [], log
    assert "[round 2/2]" in log


@pytest.mark.e2e
def test_default_run_log_fits_its_line_budget(logs: dict[str, tuple[str, float]]) -> None:
    log, _ = logs["fedavg"]
    lines = log.splitlines()
    assert len(lines) <= line_budget(2), f"{len(lines)} lines > {line_budget(2)}:\n{log}"


_SETUP_PROBE = r"""
import logging, os, sys, warnings
import app.client_app  # the ClientApp's import path, as in a Ray worker
print("TF_CPP_MIN_LOG_LEVEL=" + os.environ.get("TF_CPP_MIN_LOG_LEVEL", ""))
root = logging.getLogger()
before = list(root.handlers)
import privacy.accounting, dp_accounting
from privacy.accounting import projected_epsilon
# q = 0.5 makes dp-accounting log (through absl) for the orders it excludes:
# absl calls logging.basicConfig() when the root logger has no handler.
projected_epsilon("poisson", 1.0, 3, sampling_rate=0.5, num_nodes=4)
print("root handlers unchanged:", root.handlers == before and len(before) == 1)
logging.getLogger("flwr").info("once")
with warnings.catch_warnings(record=True) as caught:
    warnings.filterwarnings("always", append=True)  # our ignores stay first
    warnings.warn_explicit("x", FutureWarning, "worker.py", 1, module="ray._private.worker")
    warnings.warn_explicit("y", DeprecationWarning, "core.py", 1,
                           module="keras.src.backend.tensorflow.core")
    warnings.warn_explicit("z", UserWarning, "ours.py", 1, module="app.x")
print("warnings shown:", [str(w.message) for w in caught])
"""


def test_import_sets_a_quiet_environment_and_no_duplicating_root_handler() -> None:
    """Fast: importing the ClientApp (as a Ray worker does) sets up the quiet log."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FEDPRIVACY_VERBOSE", "TF_CPP_MIN_LOG_LEVEL")}
    result = subprocess.run(
        [sys.executable, "-c", _SETUP_PROBE], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "TF_CPP_MIN_LOG_LEVEL=3" in result.stdout
    assert "root handlers unchanged: True" in result.stdout, result.stdout
    assert _noise(result.stderr) == [], result.stderr
    assert "INFO:flwr" not in result.stderr and "WARNING:absl" not in result.stderr
    assert "warnings shown: ['z']" in result.stdout, result.stdout
