"""Sample-level epsilon of local DP-SGD against independent dp-accounting computations."""

from __future__ import annotations

import json
import math
import sys

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from app.sample_ledger import reply_metrics
from strategies.protocol import SAMPLE_BUDGET_EXHAUSTED as METRIC_SAMPLE_BUDGET_EXHAUSTED
from strategies.protocol import SAMPLE_DELTA as METRIC_SAMPLE_DELTA
from strategies.protocol import SAMPLE_EPSILON as METRIC_SAMPLE_EPSILON
from strategies.protocol import SAMPLE_ROUNDS as METRIC_SAMPLE_ROUNDS
from privacy.sample_accounting import (
    SampleDPRound,
    SamplePrivacyState,
    expected_batch_size,
    newest,
    num_steps,
    sample_epsilon,
    sampling_rate,
)

sys.skip_tf_privacy_import = True  # tensorflow_privacy's __init__ fails on TF 2.21
from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib  # noqa: E402

DELTA = 1e-5


def independent_epsilon(
    n: int, batch: int, epochs: int, rounds: int, z: float, delta: float
) -> float:
    """Written out from Abadi et al. (2016) / Mironov et al. (2019), not from the module."""
    q = batch / n
    steps = rounds * math.ceil(epochs * n / batch)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
    )
    return RdpAccountant().compose(event).get_epsilon(delta)


def test_steps_and_rate() -> None:
    assert sampling_rate(600, 32) == pytest.approx(32 / 600)
    assert num_steps(600, 32, 1) == 19  # ceil(600 / 32)
    assert num_steps(640, 32, 3) == 60
    assert num_steps(10, 32, 5) == 5  # q = 1: one full batch per epoch
    assert expected_batch_size(10, 32) == 10
    assert num_steps(0, 32, 5) == 0


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "rounds", "z"),
    [(600, 32, 1, 10, 1.1), (640, 32, 5, 3, 0.8), (60_000, 256, 15, 1, 1.1), (123, 10, 2, 7, 2.0)],
)
def test_sample_epsilon_matches_independent_dp_accounting(
    n: int, batch: int, epochs: int, rounds: int, z: float
) -> None:
    got = sample_epsilon(n, batch, epochs, rounds, z, DELTA)
    assert got == pytest.approx(independent_epsilon(n, batch, epochs, rounds, z, DELTA), rel=1e-9)
    # PLD accounting of the same event is tighter, and not far off.
    q, steps = batch / n, rounds * math.ceil(epochs * n / batch)
    pld = PLDAccountant(value_discretization_interval=1e-3).compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
        )
    ).get_epsilon(DELTA)
    assert pld <= got * 1.001
    assert pld > 0.5 * got


def test_sample_epsilon_matches_tensorflow_privacy() -> None:
    """tf-privacy's example-level DP-SGD statement (Poisson, no microbatches)."""
    n, batch, epochs, rounds, z = 640, 32, 2, 4, 1.1
    theirs = compute_dp_sgd_privacy_lib._compute_dp_sgd_example_privacy(
        num_epochs=epochs * rounds,
        noise_multiplier=z,
        example_delta=DELTA,
        used_microbatching=False,
        poisson_subsampling_probability=batch / n,
    )
    assert sample_epsilon(n, batch, epochs, rounds, z, DELTA) == pytest.approx(theirs, rel=1e-6)


def test_published_mnist_setting_is_at_most_tf_privacy_epsilon() -> None:
    """tf-privacy's tutorial: n=60000, B=256, z=1.1, 60 epochs printed eps 2.92 at 1e-5.

    That figure came from the RDP-to-(eps, delta) conversion of the time;
    dp-accounting 0.6 converts more tightly (Canonne, Kamath, Steinke 2020),
    so the same run gets a smaller epsilon here (2.60), never a larger one.
    """
    eps = sample_epsilon(60_000, 256, 60, 1, 1.1, DELTA)
    assert 2.4 < eps < 2.92


def test_ledger_counts_only_rounds_taken_part_in() -> None:
    """A client sampled in rounds 1, 3 and 4 of 5 has spent three rounds, not five."""
    n, batch, epochs, z = 600, 32, 2, 1.0
    state = SamplePrivacyState(delta=DELTA)
    spec = SampleDPRound(n, batch, epochs, z)
    for server_round in range(1, 6):
        if server_round in (1, 3, 4):
            state.record(spec)
    assert state.rounds == 3
    assert state.total_steps == 3 * num_steps(n, batch, epochs)
    assert state.epsilon == pytest.approx(independent_epsilon(n, batch, epochs, 3, z, DELTA))
    assert state.epsilon < independent_epsilon(n, batch, epochs, 5, z, DELTA)


def test_ledger_after_real_local_training_matches_independent_computation() -> None:
    """The steps the trainer takes are the steps the accountant charges."""
    pytest.importorskip("tensorflow")
    from clients.dp_sgd import dp_sgd_train
    from clients.models import build_mlp
    from data.dataset import LabeledData

    rng = np.random.default_rng(0)
    n, batch, epochs, z = 48, 8, 2, 1.3
    data = LabeledData(
        x=rng.normal(size=(n, 5)).astype(np.float32),
        y=rng.integers(0, 2, n).astype(np.int64),
        num_classes=2, kind="tabular", name="toy",
    )
    model = build_mlp((5,), 2)
    state = SamplePrivacyState(delta=DELTA)
    for _ in range(3):
        result = dp_sgd_train(model, data, epochs=epochs, batch_size=batch, learning_rate=0.1,
                              noise_multiplier=z, clipping_norm=1.0)
        spec = SampleDPRound(result.num_examples, batch, epochs, z)
        assert result.steps == spec.steps
        state.record(spec)
    assert state.epsilon == pytest.approx(independent_epsilon(n, batch, epochs, 3, z, DELTA))


def test_mixed_rounds_compose() -> None:
    """Rounds with different z or q compose as the product of their events."""
    state = SamplePrivacyState(delta=DELTA)
    a, b = SampleDPRound(600, 32, 1, 1.0), SampleDPRound(600, 64, 2, 0.7)
    state.record(a)
    state.record(b)
    state.record(a)
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(32 / 600, dp_accounting.GaussianDpEvent(1.0)),
                2 * 19,
            ),
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(64 / 600, dp_accounting.GaussianDpEvent(0.7)),
                num_steps(600, 64, 2),
            ),
        ]
    )
    assert state.epsilon == pytest.approx(RdpAccountant().compose(event).get_epsilon(DELTA))


def test_would_exceed_stops_at_target() -> None:
    spec = SampleDPRound(600, 32, 1, 1.0)
    eps = [sample_epsilon(600, 32, 1, r, 1.0) for r in (1, 2, 3)]
    target = (eps[1] + eps[2]) / 2  # two rounds fit, the third does not
    state = SamplePrivacyState()
    trained = 0
    for _ in range(5):
        if state.would_exceed(spec, target):
            break
        state.record(spec)
        trained += 1
    assert trained == 2
    assert state.epsilon <= target < state.epsilon_after(spec)
    assert not state.would_exceed(spec, 0.0)  # 0 = no target


def test_epsilon_edge_cases_and_monotonicity() -> None:
    assert sample_epsilon(600, 32, 1, 0, 1.0) == 0.0
    assert math.isinf(sample_epsilon(600, 32, 1, 1, 0.0))
    assert SamplePrivacyState().epsilon == 0.0
    by_rounds = [sample_epsilon(600, 32, 1, r, 1.0) for r in (1, 2, 4, 8)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    by_noise = [sample_epsilon(600, 32, 1, 5, z) for z in (0.6, 1.0, 2.0)]
    assert by_noise == sorted(by_noise, reverse=True)


def test_state_round_trips_through_config_record_and_json(tmp_path) -> None:
    from flwr.app import ConfigRecord, RecordDict

    state = SamplePrivacyState(delta=1e-6)
    state.record(SampleDPRound(600, 32, 2, 1.1))
    state.record(SampleDPRound(600, 32, 2, 0.9))
    record = RecordDict({"sample-privacy": ConfigRecord(state.to_dict())})
    restored = SamplePrivacyState.from_dict(record["sample-privacy"])
    assert restored == state
    assert restored.epsilon == state.epsilon

    path = tmp_path / "node" / "sample-privacy.json"
    state.save(path)
    assert json.loads(path.read_text())["steps"] == [38, 38]
    assert SamplePrivacyState.load(path) == state
    assert SamplePrivacyState.load(tmp_path / "missing.json").rounds == 0
    empty = SamplePrivacyState()
    assert SamplePrivacyState.from_dict(ConfigRecord(empty.to_dict())) == empty


def test_newest_copy_wins() -> None:
    old, new = SamplePrivacyState(), SamplePrivacyState()
    new.record(SampleDPRound(100, 10, 1, 1.0))
    assert newest(old, new) is new
    assert newest(None, old) is old
    assert newest(None, None) is None


def test_reply_metrics() -> None:
    state = SamplePrivacyState()
    state.record(SampleDPRound(600, 32, 1, 1.0))
    metrics = reply_metrics(state, exhausted=True)
    assert metrics[METRIC_SAMPLE_EPSILON] == pytest.approx(state.epsilon)
    assert metrics[METRIC_SAMPLE_DELTA] == 1e-5
    assert metrics[METRIC_SAMPLE_ROUNDS] == 1
    assert metrics[METRIC_SAMPLE_BUDGET_EXHAUSTED] == 1


def test_sample_ledger_speaks_the_user_level_ledgers_api() -> None:
    """One ledger API for both levels: epsilon a property; (round, target) argument order."""
    from privacy.accounting import PrivacyLedger
    from privacy.sample_accounting import SampleDPRound
    from privacy.sample_accounting import affordable_rounds as projected_affordable

    spec = SampleDPRound(1000, 32, 1, 1.1)
    state = SamplePrivacyState(delta=1e-5)
    state.record(spec)
    for name in ("epsilon_after", "would_exceed", "affordable_rounds", "state_dict",
                 "load_state_dict"):
        assert callable(getattr(PrivacyLedger, name)) and callable(getattr(state, name))
    assert isinstance(type(state).epsilon, property) and isinstance(PrivacyLedger.epsilon, property)
    target = state.epsilon_after(spec, 5)
    assert state.affordable_rounds(spec, target, 50) == 5
    # The same count as the projection for a fresh client, one round already spent.
    assert state.affordable_rounds(spec, target, 50) + 1 == projected_affordable(
        1000, 32, 1, 1.1, target, 51, 1e-5
    )
    assert state.would_exceed(spec, state.epsilon_after(spec, 1) * 0.999)
    restored = SamplePrivacyState()
    restored.load_state_dict(state.state_dict())
    assert restored.epsilon == state.epsilon and restored.rounds == 1
