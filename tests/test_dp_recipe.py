"""The pieces of the user-level DP recipe: a model for DP, noise from a target epsilon, the warning."""

from __future__ import annotations

import logging

import dp_accounting
import numpy as np
import pytest

from app.config import ConfigError, parse_run_config
from privacy.central import NOISE_TO_SIGNAL_WARNING
from tests.test_config import defaults


def _config(**overrides: object):
    values = defaults()
    values.update(overrides)
    return parse_run_config(values)


def _independent_rdp_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """dp-accounting's own RDP accountant, used directly (not through privacy/)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    return accountant.get_epsilon(delta)


# ------------------------------------------------------------------ the model key
@pytest.mark.parametrize(
    ("architecture", "shape", "params"),
    [("mlp", (28, 28, 1), 52_650), ("2nn", (28, 28, 1), 199_210), ("mlp", (13,), 3_042)],
)
def test_models_for_dp_have_the_documented_sizes(architecture, shape, params) -> None:
    from clients.models import build_model

    kind = "image" if len(shape) > 1 else "tabular"
    model = build_model(kind, shape, 10 if kind == "image" else 2, architecture=architecture)
    assert model.count_params() == params
    names = [layer.name for layer in model.layers]
    assert names[-1] == "head"  # private-layers='head' still finds the classifier


def test_the_cnn_is_refused_for_tables_and_unknown_models_name_the_key() -> None:
    from clients.models import build_model

    with pytest.raises(ValueError, match="needs image data"):
        build_model("tabular", (13,), 2, architecture="cnn")
    with pytest.raises(ConfigError, match="'model'.*'2nn'"):
        _config(model="resnet")


def test_the_cnn_for_a_table_is_a_config_error_before_round_one(tmp_path) -> None:
    from app.server_app import CentralEvaluator

    heart = tmp_path / "heart.csv"
    heart.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40)))
    config = _config(dataset="csv", model="cnn", **{"data-path": f"{heart}?label=label"})
    with pytest.raises(ConfigError, match="'model' = 'cnn'.*tabular.*needs image data"):
        CentralEvaluator(config)


# ------------------------------------------------------------ noise from a target
def test_auto_noise_needs_a_target_epsilon_and_poisson_sampling() -> None:
    with pytest.raises(ConfigError, match="'noise-multiplier' = 'auto' needs 'target-epsilon'"):
        _config(strategy="dp-fedavg", **{"noise-multiplier": "auto", "target-epsilon": 0.0})
    with pytest.raises(ConfigError, match="'client-sampling' = 'poisson'"):
        _config(strategy="dp-fedavg", **{"noise-multiplier": "auto", "target-epsilon": 3.0,
                                         "client-sampling": "fixed"})
    with pytest.raises(ConfigError, match="'noise-multiplier'"):
        _config(**{"noise-multiplier": "loud"})


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_auto_noise_is_the_smallest_that_keeps_every_round_within_the_target(clipping) -> None:
    from app.server_app import build_strategy

    rounds, q, target, delta = 50, 0.1, 3.0, 1e-3
    config = _config(strategy="dp-fedavg", clipping=clipping, **{
        "noise-multiplier": "auto", "target-epsilon": target, "target-delta": delta,
        "num-server-rounds": rounds, "fraction-train": q, "min-train-nodes": 2,
    })
    strategy = build_strategy(config)
    z = strategy.mechanism.noise_multiplier
    # Independent check: dp-accounting's RDP accountant on the same Poisson Gaussian.
    assert _independent_rdp_epsilon(z, q, rounds, delta) <= target
    assert _independent_rdp_epsilon(0.99 * z, q, rounds, delta) > target  # not wasteful
    # The strategy's own ledger agrees: the last round fits, the budget stop never fires early.
    nodes = list(range(1, 1001))
    plan = strategy.mechanism.plan_round(1, nodes)
    assert strategy.mechanism.project(plan, rounds) <= target
    assert strategy.mechanism.stop_reason(plan) is None


# ------------------------------------------------------------------ the warning
def _ratio(caplog: pytest.LogCaptureFixture, num_nodes: int, params: int, **overrides: object):
    from app.server_app import build_strategy, warn_if_noise_swamps_updates

    strategy = build_strategy(_config(strategy="dp-fedavg", **overrides))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        ratio = warn_if_noise_swamps_updates(strategy, num_nodes, params)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    return ratio, warned


def test_the_readme_dp_example_is_warned_in_plain_words(caplog) -> None:
    """10 digits clients, all sampled, z 1.1, the CNN (13,706 parameters): near chance."""
    ratio, warned = _ratio(caplog, 10, 13_706, **{"noise-multiplier": 1.1,
                                                  "fraction-train": 1.0})
    assert ratio == pytest.approx(1.1 * np.sqrt(13_706) / 10, rel=1e-9)
    assert ratio > NOISE_TO_SIGNAL_WARNING
    assert len(warned) == 1 and "drown" in warned[0].getMessage()
    assert "recipe" in warned[0].getMessage()


def test_the_recipe_is_not_warned(caplog) -> None:
    """1000 clients, q 0.1, the MLP: the noise is a few times the update at most."""
    ratio, warned = _ratio(caplog, 1000, 52_650, **{"noise-multiplier": 1.0,
                                                    "fraction-train": 0.1})
    assert ratio < NOISE_TO_SIGNAL_WARNING and warned == []


def test_fedavg_has_no_noise_to_warn_about(caplog) -> None:
    from app.server_app import build_strategy, warn_if_noise_swamps_updates

    assert warn_if_noise_swamps_updates(build_strategy(_config()), 10, 13_706) is None


def test_settings_that_fail_only_for_the_connected_nodes_fail_before_round_one() -> None:
    from app.server_app import build_strategy, check_dp_plan

    strategy = build_strategy(_config(strategy="dp-fedavg", clipping="adaptive",
                                      **{"noise-multiplier": 1.0, "fraction-train": 0.5}))
    with pytest.raises(ConfigError, match="for 4 connected nodes.*count stddev"):
        check_dp_plan(strategy, 4)
    check_dp_plan(strategy, 1000)  # 500 clients per round afford it


# ------------------------------------------------------------------ through flwr run
@pytest.mark.e2e
def test_the_recipe_keys_run_end_to_end_and_the_budget_holds(tmp_path) -> None:
    """model='mlp', noise 'auto' from target-epsilon, server momentum (fixed clipping: with
    two clients per round adaptive clipping's count noise cannot be afforded, see below)."""
    import json

    from tests.flwr_harness import flwr_run, simulation_superlink

    outputs = tmp_path / "outputs"
    with simulation_superlink(tmp_path / "flwr-home", num_supernodes=4) as env:
        result = flwr_run(
            env,
            "strategy='dp-fedavg' model='mlp' noise-multiplier='auto' target-epsilon=3.0 "
            "target-delta=0.25 clipping='fixed' server-optimizer='momentum' "
            "server-learning-rate=1.0 fraction-train=0.5 num-server-rounds=2 "
            f"fraction-evaluate=0.0 min-evaluate-nodes=0 output-dir='{outputs}'",
            timeout=400,
        )
    log = result.stdout + result.stderr
    runs = list(outputs.glob("*")) if outputs.exists() else []
    assert len(runs) == 1 and (runs[0] / "metrics.json").exists(), log[-6000:]
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["config"]["model"] == "mlp"
    assert metrics["config"]["noise-multiplier"] == "auto"
    privacy = metrics["privacy"]
    assert privacy["noise-multiplier-from"].startswith("target-epsilon")
    z = privacy["noise-multiplier"]
    assert _independent_rdp_epsilon(z, 0.5, 2, 0.25) <= 3.0
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert 0 < rounds[1]["epsilon"] < rounds[2]["epsilon"] <= 3.0
    # Four clients, half of them per round: the plain-words warning, before round 1.
    assert "DP noise will drown the updates" in log
    assert log.index("DP noise will drown") < log.index("[round 1/2]")
    assert privacy["noise-to-signal"] > NOISE_TO_SIGNAL_WARNING
