"""Every run-config key is checked before round 1, with an error naming key, value and what is allowed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from app.config import RULES, ConfigError, parse_run_config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def defaults() -> dict[str, object]:
    with PYPROJECT.open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def test_the_shipped_defaults_are_valid_and_cover_every_rule() -> None:
    config = parse_run_config(defaults())
    assert set(config.as_dict()) == set(RULES)
    assert config.as_dict() == {k: defaults()[k] for k in RULES}


BAD_VALUES = [
    ("num-server-rounds", 0, "an integer >= 1"),
    ("num-server-rounds", 2.5, "an integer >= 1"),
    ("num-server-rounds", "3", "is a string"),
    ("num-server-rounds", True, "has type bool"),
    ("fraction-train", 0.0, "(0, 1]"),
    ("fraction-train", 1.5, "(0, 1]"),
    ("fraction-evaluate", -0.1, "[0, 1]"),
    ("min-train-nodes", 0, "an integer >= 1"),
    ("local-epochs", -1, "an integer >= 1"),
    ("batch-size", 0, "an integer >= 1"),
    ("learning-rate", 0.0, "a number > 0"),
    ("learning-rate", float("nan"), "a number > 0"),
    ("learning-rate", float("inf"), "a number > 0"),
    ("dataset", "imagenet", "one of"),
    ("partitioner", "random", "'iid', 'dirichlet', 'shards', 'natural'"),
    ("dirichlet-alpha", 0, "a number > 0"),
    ("test-fraction", 1.0, "(0, 1)"),
    ("val-fraction", 0.0, "(0, 1)"),
    ("seed", -3, "an integer >= 0"),
    ("output-dir", "  ", "a non-empty string"),
    ("round-timeout", 0, "a number > 0"),
    ("dp-sgd", "true", "true or false"),
    ("dp-sgd", 1, "true or false"),
    ("dp-sgd-noise-multiplier", 0.0, "a number > 0"),
    ("dp-sgd-clipping-norm", -1.0, "a number > 0"),
    ("target-sample-epsilon", -1.0, "a number >= 0"),
    ("target-sample-delta", 1.0, "(0, 1)"),
]


def test_dp_sgd_is_a_real_boolean() -> None:
    config = defaults()
    config["dp-sgd"] = True
    assert parse_run_config(config).dp_sgd is True
    config["dp-sgd"] = False
    assert parse_run_config(config).dp_sgd is False


def test_dp_sgd_with_fedprox_fails_naming_both_keys() -> None:
    config = defaults()
    config.update({"dp-sgd": True, "proximal-mu": 0.1})
    with pytest.raises(ConfigError, match="'proximal-mu'.*'dp-sgd'"):
        parse_run_config(config)


@pytest.mark.parametrize(("key", "value", "allowed"), BAD_VALUES)
def test_bad_value_names_key_value_and_allowed(key: str, value: object, allowed: str) -> None:
    config = defaults()
    config[key] = value
    with pytest.raises(ConfigError) as error:
        parse_run_config(config)
    message = str(error.value)
    assert f"'{key}'" in message
    assert allowed in message
    if not isinstance(value, float) or value == value:  # NaN has no stable repr match
        assert repr(value) in message or str(value) in message


def test_unknown_key_is_an_error_not_ignored() -> None:
    config = defaults()
    config["num-rounds"] = 3
    with pytest.raises(ConfigError, match="unknown run config key.*num-rounds"):
        parse_run_config(config)


def test_missing_key_is_an_error() -> None:
    config = defaults()
    del config["seed"]
    with pytest.raises(ConfigError, match="missing key.*seed"):
        parse_run_config(config)


def test_integral_float_is_accepted_as_int_and_int_as_float() -> None:
    config = defaults()
    config["num-server-rounds"] = 4.0
    config["learning-rate"] = 1
    parsed = parse_run_config(config)
    assert parsed.num_server_rounds == 4 and isinstance(parsed.num_server_rounds, int)
    assert parsed.learning_rate == 1.0 and isinstance(parsed.learning_rate, float)


def test_evaluation_needs_at_least_one_node_when_enabled() -> None:
    config = defaults()
    config["min-evaluate-nodes"] = 0
    with pytest.raises(ConfigError, match="min-evaluate-nodes"):
        parse_run_config(config)
    config["fraction-evaluate"] = 0.0
    assert parse_run_config(config).fraction_evaluate == 0.0
