"""What a run says about its own privacy: the statement in metrics.json, the NOT PRIVATE stamp."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import ConfigError, parse_run_config
from app.progress import format_round_line, format_summary
from app.server_app import NOT_PRIVATE_KEY, build_strategy, privacy_statement
from tests.test_config import defaults


def _config(**changes: object):
    values = defaults()
    values.update({key.replace("_", "-"): value for key, value in changes.items()})
    return parse_run_config(values)


def test_insecure_dp_seed_is_off_by_default_and_validated() -> None:
    assert _config().insecure_dp_seed == -1
    with pytest.raises(ConfigError, match="'insecure-dp-seed' = -2.*tests only"):
        _config(insecure_dp_seed=-2)


def test_a_dp_run_states_its_relation_and_what_is_not_covered() -> None:
    config = _config(strategy="dp-fedavg")
    statement = privacy_statement(config, build_strategy(config))
    assert statement["private"] is True and statement["stamp"] == "private"
    assert statement["relation"].startswith("zero-out")  # N and counts are published
    assert {"num-nodes (N)", "num-sampled", "federated evaluation metrics"} <= set(
        statement["not-covered"]
    )
    fixed = _config(strategy="dp-fedavg", client_sampling="fixed")
    assert privacy_statement(fixed, build_strategy(fixed))["relation"].startswith("replace-one")
    plain = _config()
    assert privacy_statement(plain, build_strategy(plain)) == {"user-level-dp": False}


def test_a_run_with_a_replayable_dp_seed_is_stamped_not_private_everywhere(tmp_path: Path) -> None:
    config = _config(strategy="dp-fedavg", insecure_dp_seed=5)
    strategy = build_strategy(config)
    statement = privacy_statement(config, strategy)
    assert statement["private"] is False and statement["stamp"] == "NOT PRIVATE"
    entry = {"round": 1, "epsilon": 1.0, "central-accuracy": 0.5, NOT_PRIVATE_KEY: 1}
    assert "NOT PRIVATE" in format_round_line(entry, 2, 1.0, [1.0])
    assert "NOT PRIVATE" not in format_round_line({**entry, NOT_PRIVATE_KEY: 0}, 2, 1.0, [1.0])
    metrics = {"config": config.as_dict(), "privacy": statement, "rounds": [entry]}
    assert "NOT PRIVATE" in format_summary(metrics, tmp_path)
    honest = {"config": config.as_dict(), "privacy": {"private": True}, "rounds": [
        {k: v for k, v in entry.items() if k != NOT_PRIVATE_KEY}]}
    assert "NOT PRIVATE" not in format_summary(honest, tmp_path)
