"""A run killed after round k (a real SIGKILL) and resumed keeps rounds 1..k and its epsilon."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.checkpoint import (
    LEDGER_FILE,
    STATE_FILE,
    checkpoint_dir,
    resume_run,
    save_run_checkpoint,
    write_privacy_ledger,
)
from app.config import ConfigError, parse_run_config
from app.run_outputs import MetricsLog
from tests.inprocess import node_contexts, run_config, run_federation

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


# ------------------------------------------------------------ infinite epsilon
INF = float("inf")


def strict_json(path: Path):
    """``path`` parsed as standard JSON: ``Infinity``/``NaN`` are errors, not numbers."""

    def refuse(constant: str):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def noise_free_dp_strategy():
    from strategies.dp_fedavg import DPFedAvg

    return DPFedAvg(noise_multiplier=0.0, clipping_norm=1.0, fraction_train=0.5,
                    compute_pld=False, seed=42)


def spend_a_round(strategy) -> None:
    """What a round does to the ledger (as tests/test_checkpoint.py's fake rounds)."""
    plan = strategy.plan_round(1, list(range(10)))
    strategy.ledger.compose(plan.event)
    strategy.privacy_history.append({"round": 1.0, "epsilon": strategy.ledger.epsilon})


def test_a_noise_free_dp_checkpoint_and_ledger_are_json_and_resume_with_inf(
    tmp_path: Path,
) -> None:
    """The checkpoint's metrics-entry and state, and privacy-ledger.json: "inf", not Infinity."""
    config = {"strategy": "dp-fedavg", "noise-multiplier": 0.0}
    first = noise_free_dp_strategy()
    spend_a_round(first)
    assert first.ledger.epsilon == INF
    entry = {"round": 1, "epsilon": INF, "delta": 1e-5, "train-loss": float("nan")}
    save_run_checkpoint(tmp_path, 1, {"w": np.zeros(3, np.float32)}, first, config, entry)
    write_privacy_ledger(tmp_path, 1, first.ledger)

    state = strict_json(checkpoint_dir(tmp_path, 1) / STATE_FILE)["state"]
    assert state["metrics-entry"] == {"round": 1, "epsilon": "inf", "delta": 1e-5,
                                      "train-loss": None}
    journal = strict_json(tmp_path / LEDGER_FILE)
    assert journal["epsilon"] == "inf" and journal["rounds"] == 1

    resumed = noise_free_dp_strategy()
    checkpoint, kept = resume_run(tmp_path, resumed, config, [])  # metrics.json never got it
    assert checkpoint.round == 1
    assert resumed.ledger.epsilon == INF and resumed.ledger.rounds == 1
    assert resumed.privacy_history[-1]["epsilon"] == INF  # restored as the float
    assert kept == [{"round": 1, "epsilon": "inf", "delta": 1e-5, "train-loss": None}]
    MetricsLog(tmp_path / "metrics.json", config, kept)  # the resumed run's first write
    assert strict_json(tmp_path / "metrics.json")["rounds"] == kept


# ------------------------------------------------- damaged or missing metrics.json
@pytest.fixture
def flwr_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def checkpointed_run(run_dir: Path, rounds: int) -> tuple[dict, list[dict]]:
    """A fedavg run folder with metrics.json and checkpoints of rounds 0..rounds (last 2 kept)."""
    from app.server_app import build_strategy

    config = run_config(**{"num-server-rounds": rounds})
    parsed = parse_run_config(config)
    strategy = build_strategy(parsed)
    metrics = MetricsLog(run_dir / "metrics.json", parsed.as_dict())
    entries = []
    for server_round in range(rounds + 1):
        entry = {"round": server_round, "central-accuracy": 0.25 * server_round}
        save_run_checkpoint(run_dir, server_round, {"w": np.full(3, server_round, np.float32)},
                            strategy, parsed.as_dict(), entry)
        metrics.append(entry)
        entries.append(entry)
    return config, entries


def resume_from(run_dir: Path, config: dict):
    from app.server_app import build_strategy, resume_checkpoint

    parsed = parse_run_config(dict(config, resume=str(run_dir)))
    return resume_checkpoint(run_dir, build_strategy(parsed), parsed)


@pytest.mark.parametrize("damage", ["truncated", "no-rounds", "bad-entry", "not-utf8"])
def test_an_unreadable_metrics_json_is_rebuilt_from_checkpoints_that_hold_every_round(
    tmp_path: Path, flwr_log: pytest.LogCaptureFixture, damage: str
) -> None:
    """Defect: a bare json.decoder.JSONDecodeError, naming no file, and no fallback."""
    config, entries = checkpointed_run(tmp_path, rounds=1)  # checkpoints of rounds 0 and 1
    metrics = tmp_path / "metrics.json"
    damaged = {
        "truncated": metrics.read_bytes()[:-40],
        "no-rounds": b'{"config": {}}',
        "bad-entry": b'{"rounds": [{"round": 0}, [1]]}',
        "not-utf8": b"\xff\xfe{",
    }[damage]
    metrics.write_bytes(damaged)
    plan = resume_from(tmp_path, config)
    assert plan.checkpoint.round == 1
    assert plan.kept == entries
    assert plan.damaged_metrics == metrics
    assert metrics.read_bytes() == damaged  # nothing is changed before every check passed
    warnings = [r.getMessage() for r in flwr_log.records if r.levelno == logging.WARNING]
    assert any(
        text.startswith(str(metrics)) and text.endswith(
            "; the history of rounds 0, 1 is rebuilt from the checkpoints' metrics entries"
        )
        for text in warnings
    ), warnings


def test_a_damaged_metrics_json_is_set_aside_when_the_history_is_rebuilt(tmp_path: Path) -> None:
    from app.checkpoint import set_aside_damaged_metrics

    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"rounds": [')
    (tmp_path / "metrics.json.damaged").write_text("an earlier one")
    kept_as = set_aside_damaged_metrics(metrics)
    assert kept_as == tmp_path / "metrics.json.damaged-1"
    assert kept_as.read_text() == '{"rounds": [' and not metrics.exists()
    assert (tmp_path / "metrics.json.damaged").read_text() == "an earlier one"


def test_an_unreadable_metrics_json_the_checkpoints_cannot_replace_is_refused(
    tmp_path: Path,
) -> None:
    config, _ = checkpointed_run(tmp_path, rounds=4)  # checkpoints of rounds 3 and 4
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"config": {}, "rounds": [{"round": 0}, {"rou')
    with pytest.raises(ConfigError) as caught:
        resume_from(tmp_path, config)
    message = str(caught.value)
    assert message.startswith(
        f"run config 'resume' = {str(tmp_path)!r}: {metrics} is not valid JSON (truncated?): "
    )
    assert message.endswith(
        f"; the checkpoints in {tmp_path / 'checkpoints'} hold the entries of rounds 3, 4 "
        "only, not of rounds 0, 1, 2, so the history cannot be rebuilt. Restore "
        "metrics.json from a backup, or, to continue with the history of rounds 3, 4 only, "
        f"move it away (mv {metrics} {metrics}.damaged) and resume again"
    )


def test_a_metrics_json_moved_away_resumes_with_the_rounds_the_checkpoints_hold(
    tmp_path: Path, flwr_log: pytest.LogCaptureFixture
) -> None:
    """What the refusal above offers: the partial history, with a WARNING naming what is lost."""
    config, entries = checkpointed_run(tmp_path, rounds=4)
    (tmp_path / "metrics.json").unlink()
    plan = resume_from(tmp_path, config)
    assert plan.checkpoint.round == 4 and plan.kept == entries[3:]
    assert plan.damaged_metrics is None
    assert (
        f"{tmp_path / 'metrics.json'} is missing; the history of rounds 3, 4 is rebuilt from "
        "the checkpoints' metrics entries (rounds 0, 1, 2 are lost from it)"
    ) in flwr_log.text


def test_a_checkpoint_from_before_max_classes_resumes_with_the_default(tmp_path: Path) -> None:
    """A run checkpointed before the key existed ran with the default cap; it still resumes."""
    config, entries = checkpointed_run(tmp_path, rounds=1)
    from app.checkpoint import check_resume_config

    saved = parse_run_config(config).as_dict()
    del saved["max-classes"]
    check_resume_config(saved, parse_run_config(config).as_dict())  # no error
    with pytest.raises(Exception, match=r"max-classes: 1000 -> 7"):
        check_resume_config(saved, parse_run_config(dict(config, **{"max-classes": 7})).as_dict())
    assert resume_from(tmp_path, config).kept == entries


@pytest.mark.e2e
def test_a_noise_free_dp_run_completes_shows_inf_and_resumes(
    tmp_path: Path, flwr_log: pytest.LogCaptureFixture
) -> None:
    """Defect: strategy='dp-fedavg', noise-multiplier=0 crashed after round 1.

    In process (the real ServerApp and ClientApp, no Ray): 1 round, then the
    same run resumed for a 2nd. Every file is standard JSON; the progress
    line and the summary say "epsilon inf".
    """
    flwr_log.set_level(logging.INFO, logger="flwr")
    config = run_config(**{
        "strategy": "dp-fedavg", "noise-multiplier": 0.0, "num-server-rounds": 1,
        "local-epochs": 1, "fraction-evaluate": 0.0, "output-dir": str(tmp_path),
    })
    run_federation(config, node_contexts(2, config, run_id=5))
    run_dir = tmp_path / "5"
    rounds = strict_json(run_dir / "metrics.json")["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["epsilon"] == "inf"
    assert strict_json(run_dir / LEDGER_FILE)["epsilon"] == "inf"
    for state in run_dir.glob("checkpoints/round-*/state.json"):
        strict_json(state)
    assert "NOT PRIVATE (no noise) |" in flwr_log.text and "| epsilon inf |" in flwr_log.text
    assert "NOT PRIVATE: noise-multiplier = 0 adds no noise (epsilon inf)" in flwr_log.text
    assert "final epsilon inf (PLD inf) at delta 1e-05 (user-level): no privacy guarantee" in (
        flwr_log.text
    )

    resumed = dict(config, resume=str(run_dir), **{"num-server-rounds": 2})
    run_federation(resumed, node_contexts(2, resumed, run_id=6))
    rounds = strict_json(run_dir / "metrics.json")["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["epsilon"] for r in rounds[1:]] == ["inf", "inf"]
    assert (run_dir / "model.keras").exists() and not (tmp_path / "6").exists()
