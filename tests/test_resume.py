"""A run killed after round k (a real SIGKILL) and resumed keeps rounds 1..k and its epsilon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.inprocess import run_config

REPO = Path(__file__).resolve().parents[1]
ROUNDS, KILL_AFTER = 4, 2


def child(config: dict, run_id: int, pause_after: int = -1) -> subprocess.Popen:
    return subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-m", "tests.resume_child", json.dumps(config), str(run_id), str(pause_after)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def rounds_of(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["rounds"]


@pytest.mark.e2e
def test_killed_dp_run_resumes_without_losing_a_round_or_epsilon(tmp_path: Path) -> None:
    base = {
        "strategy": "dp-fedavg", "noise-multiplier": 0.8, "fraction-train": 0.5,
        "min-train-nodes": 2, "min-evaluate-nodes": 2, "num-server-rounds": ROUNDS,
        "local-epochs": 1,
    }
    # The uninterrupted reference run.
    reference = run_config(**base, **{"output-dir": str(tmp_path / "reference")})
    finish(child(reference, run_id=1))
    (reference_dir,) = (tmp_path / "reference").iterdir()

    # The same run, SIGKILLed once round KILL_AFTER is in metrics.json.
    killed = run_config(**base, **{"output-dir": str(tmp_path / "killed")})
    process = child(killed, run_id=2, pause_after=KILL_AFTER)
    deadline = time.monotonic() + 300
    run_dir = None
    while time.monotonic() < deadline:
        runs = list((tmp_path / "killed").glob("*")) if (tmp_path / "killed").exists() else []
        if runs and (runs[0] / "metrics.json").exists():
            run_dir = runs[0]
            if any(r["round"] == KILL_AFTER for r in rounds_of(run_dir)):
                break
        assert process.poll() is None, process.communicate()[0][-4000:]
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("the run never reached the round to kill it after")
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    before = rounds_of(run_dir)
    assert [r["round"] for r in before] == list(range(KILL_AFTER + 1))

    # Resume it: a new run (new run id) continuing the killed run's folder.
    resumed = dict(killed, resume=str(run_dir))
    output = finish(child(resumed, run_id=3))
    after = rounds_of(run_dir)
    assert [r["round"] for r in after] == list(range(ROUNDS + 1))
    assert after[: KILL_AFTER + 1] == before  # rounds 0..k kept verbatim
    assert f"continuing with round {KILL_AFTER + 1}" in output

    reference_rounds = rounds_of(reference_dir)
    epsilons = [r["epsilon"] for r in after[1:]]
    assert epsilons == sorted(epsilons)  # never decreases, never restarts from zero
    assert after[-1]["epsilon"] == pytest.approx(reference_rounds[-1]["epsilon"], rel=1e-9)
    assert (run_dir / "model.keras").exists()
    # The ledger's write-ahead journal counted each round once.
    journal = json.loads((run_dir / "privacy-ledger.json").read_text())
    assert len(journal["events"]) == ROUNDS
