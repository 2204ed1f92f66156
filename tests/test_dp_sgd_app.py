"""DP-SGD wired into the apps: per-client sample epsilon in replies, its maximum in metrics.json,
a persistent ledger, the projection before round 1, and a per-client budget the run survives."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from app.client_app import SAMPLE_BUDGET_EXHAUSTED
from app.config import parse_run_config
from app.sample_ledger import LIFETIME_FILE, load_ledger, record_round
from app.server_app import log_projected_sample_privacy
from app.task import federation_spec
from privacy.sample_accounting import STATE_KEY, SampleDPRound, affordable_rounds
from data.federation import build_federation, load_client_data, local_train_size
from tests.inprocess import node_contexts, run_config, run_federation
# Written out from Abadi et al. (2016) / Mironov et al. (2019), not from the module under test.
from tests.test_sample_privacy import independent_epsilon


def _dp_sgd_config(tmp_path: Path, **overrides: object) -> dict:
    return run_config(
        **{
            "num-server-rounds": 2,
            "local-epochs": 1,
            "batch-size": 32,
            "fraction-evaluate": 0.0,
            "min-evaluate-nodes": 0,
            "output-dir": str(tmp_path / "out"),
            "dp-sgd": True,
            "dp-sgd-noise-multiplier": 1.1,
            "dp-sgd-clipping-norm": 1.0,
            **overrides,
        }
    )


def _train_replies(grid) -> list:
    return [r for r in grid.replies if r.metadata.message_type == "train"]


def _rounds(tmp_path: Path) -> list[dict]:
    (metrics,) = (tmp_path / "out").rglob("metrics.json")
    return json.loads(metrics.read_text())["rounds"]


def test_replies_carry_the_independently_computed_sample_epsilon(tmp_path: Path) -> None:
    config = _dp_sgd_config(tmp_path)
    contexts = node_contexts(2, config, state_dir=tmp_path / "state")
    grid = run_federation(config, contexts)

    parsed = parse_run_config(config)
    sizes = {
        node: len(load_client_data(federation_spec(parsed, 2), partition)[0])
        for partition, node in enumerate(sorted(contexts))
    }
    # The server's projection sizes each client without loading its data.
    partitions = build_federation(federation_spec(parsed, 2)).partitions
    assert [local_train_size(len(p), parsed.val_fraction) for p in partitions] == [
        sizes[node] for node in sorted(contexts)
    ]
    replies = _train_replies(grid)
    assert len(replies) == 4  # 2 clients x 2 rounds
    seen: dict[int, int] = {}
    reported = []
    for reply in replies:
        node = reply.metadata.src_node_id
        seen[node] = seen.get(node, 0) + 1
        metrics = reply.content["metrics"]
        expected = independent_epsilon(sizes[node], 32, 1, seen[node], 1.1, 1e-5)
        assert metrics["sample-epsilon"] == pytest.approx(expected, rel=1e-9)
        assert metrics["sample-rounds"] == seen[node]
        # The loss of the private records is not released under DP-SGD.
        assert "train-loss" not in metrics
        reported.append(metrics["sample-epsilon"])

    rounds = _rounds(tmp_path)
    assert [e["round"] for e in rounds] == [0, 1, 2]
    assert "sample-epsilon-max" not in rounds[0]
    assert rounds[1]["sample-epsilon-max"] == pytest.approx(max(reported[:2]))
    assert rounds[2]["sample-epsilon-max"] == pytest.approx(max(reported))
    assert rounds[2]["sample-epsilon-max"] > rounds[1]["sample-epsilon-max"]

    # The ledger is on disk, per run and over all runs, for a restarted node.
    for partition in range(2):
        node_dir = tmp_path / "state" / f"node-{partition}"
        ledger = json.loads((node_dir / "run-7" / "sample-privacy.json").read_text())
        assert len(ledger["steps"]) == 2
        assert json.loads((node_dir / LIFETIME_FILE).read_text())["steps"] == ledger["steps"]


def test_a_client_over_its_budget_stops_and_the_run_goes_on(tmp_path: Path, caplog) -> None:
    # Dirichlet gives two clients of different sizes: the smaller one has the
    # larger sampling rate, so it reaches the target a round earlier.
    base = _dp_sgd_config(
        tmp_path, partitioner="dirichlet", **{"dirichlet-alpha": 0.3, "num-server-rounds": 3}
    )
    parsed = parse_run_config(base)
    n = [len(load_client_data(federation_spec(parsed, 2), p)[0]) for p in range(2)]
    small, large = min(n), max(n)
    assert small < large
    two_small = independent_epsilon(small, 32, 1, 2, 1.1, 1e-5)
    two_large = independent_epsilon(large, 32, 1, 2, 1.1, 1e-5)
    assert two_large < two_small
    target = (two_large + two_small) / 2
    config = {**base, "target-sample-epsilon": target}
    contexts = node_contexts(2, config)
    with caplog.at_level(logging.INFO, logger="flwr"):
        grid = run_federation(config, contexts)

    replies = _train_replies(grid)
    refused = [r for r in replies if r.has_error()]
    trained = [r for r in replies if not r.has_error()]
    # Rounds 1 and 2: both train except the small client in round 2; round 3:
    # the large client has spent too much by then as well.
    assert len(replies) == 6
    assert len(trained) == 3
    assert all(r.error.code == SAMPLE_BUDGET_EXHAUSTED for r in refused)
    assert all("sample-budget-exhausted" in r.error.reason for r in refused)
    assert all(r.content["metrics"]["sample-epsilon"] <= target for r in trained)
    rounds = _rounds(tmp_path)
    assert [e["round"] for e in rounds] == [0, 1, 2, 3]
    assert [e["num-accepted"] for e in rounds[1:]] == [2, 1, 0]
    assert rounds[3]["sample-epsilon-max"] == pytest.approx(
        max(r.content["metrics"]["sample-epsilon"] for r in trained)
    )
    assert rounds[3]["sample-epsilon-max"] <= target
    assert "projected sample-level epsilon" in caplog.text
    assert "can train 1 of 3 rounds" in caplog.text


def _context(state_dir: Path, run_id: int = 3) -> Context:
    return Context(
        run_id=run_id, node_id=5, node_config={"state-dir": str(state_dir)},
        state=RecordDict(), run_config={},
    )


def test_ledger_survives_a_restart_and_composes_over_runs(tmp_path: Path) -> None:
    spec = SampleDPRound(500, 25, 2, 1.3)
    first = _context(tmp_path)
    ledger = load_ledger(first, 1e-5)
    record_round(first, ledger, spec)
    record_round(first, ledger, spec)
    assert STATE_KEY in first.state

    restarted = _context(tmp_path)  # a new process: empty node state, same folder
    restored = load_ledger(restarted, 1e-5)
    assert restored.rounds == 2
    all_runs = record_round(restarted, restored, spec)
    assert restored.epsilon == pytest.approx(independent_epsilon(500, 25, 2, 3, 1.3, 1e-5))

    next_run = _context(tmp_path, run_id=4)  # a new run on the same records
    fresh = load_ledger(next_run, 1e-5)
    assert fresh.rounds == 0
    lifetime = record_round(next_run, fresh, spec)
    assert all_runs == pytest.approx(independent_epsilon(500, 25, 2, 3, 1.3, 1e-5))
    assert lifetime == pytest.approx(independent_epsilon(500, 25, 2, 4, 1.3, 1e-5))

    with pytest.raises(ValueError, match="target-sample-delta"):
        load_ledger(_context(tmp_path), 1e-6)


def test_projection_is_the_smallest_clients_epsilon_over_all_rounds(caplog) -> None:
    config = parse_run_config(
        run_config(**{"dp-sgd": True, "num-server-rounds": 6, "local-epochs": 2,
                      "batch-size": 16, "target-sample-epsilon": 2.0})
    )
    sizes = [local_train_size(n, config.val_fraction) for n in (300, 90, 1000)]
    assert sizes[1] == 90 - math.ceil(0.1 * 90)
    with caplog.at_level(logging.INFO, logger="flwr"):
        projected = log_projected_sample_privacy(config, sizes)
    assert projected == pytest.approx(independent_epsilon(sizes[1], 16, 2, 6, 1.1, 1e-5))
    rounds = affordable_rounds(sizes[1], 16, 2, 1.1, 2.0, 6, 1e-5)
    assert 0 <= rounds < 6
    assert independent_epsilon(sizes[1], 16, 2, rounds, 1.1, 1e-5) <= 2.0 if rounds else True
    assert independent_epsilon(sizes[1], 16, 2, rounds + 1, 1.1, 1e-5) > 2.0
    assert f"can train {rounds} of 6 rounds" in caplog.text


def test_a_resumed_run_counts_rounds_it_has_no_ledger_for(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord

    from app.client_app import app as client_app
    from app.task import model_spec
    from clients.training import initial_weights
    from strategies.fedavg import to_arrayrecord
    from tests.messages import instruction

    config = _dp_sgd_config(tmp_path)
    context = node_contexts(2, config)[1000]  # no state folder: nothing survives the resume
    train, _ = load_client_data(federation_spec(parse_run_config(config), 2), 0)
    weights = initial_weights(model_spec(parse_run_config(config), train))
    message = instruction(
        RecordDict({
            "arrays": to_arrayrecord(weights),
            "config": ConfigRecord({"server-round": 4, "local-epochs": 1, "batch-size": 32,
                                    "learning-rate": 0.1, "run-key": "7",
                                    "rounds-before-resume": 3}),
        }),
        node_id=1000,
    )
    reply = client_app(message, context)
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    assert metrics["sample-rounds"] == 4  # 3 assumed + the one trained now
    assert metrics["sample-epsilon"] == pytest.approx(
        independent_epsilon(len(train), 32, 1, 4, 1.1, 1e-5), rel=1e-9
    )
