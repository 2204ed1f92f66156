"""Our FedAvg against Flower's, and its handling of malformed replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from strategies.aggregation import weighted_mean, weighted_metrics
from strategies.fedavg import FedAvg, to_arrayrecord, to_numpy
from strategies.validation import array_specs
from tests.messages import error_reply, reply

SHAPES = {"cnn/conv-1/kernel": (3, 3, 1, 4), "cnn/conv-1/bias": (4,), "cnn/head/kernel": (16, 10)}


def client_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def train_content(arrays: dict[str, np.ndarray], num_examples: float, **metrics: float) -> RecordDict:
    return RecordDict(
        {
            "arrays": to_arrayrecord(arrays),
            "metrics": MetricRecord({"num-examples": num_examples, **metrics}),
        }
    )


def strategy_after_configure(global_arrays: dict[str, np.ndarray]) -> FedAvg:
    """A FedAvg that has 'sent' ``global_arrays`` this round (what replies are checked against)."""
    strategy = FedAvg()
    record = to_arrayrecord(global_arrays)
    strategy._sent_specs = array_specs(record)
    strategy._sent_arrays = to_numpy(record)
    return strategy


@pytest.mark.parametrize("num_clients", [1, 2, 5, 17])
def test_weighted_mean_equals_flowers_fedavg(num_clients: int) -> None:
    rng = np.random.default_rng(num_clients)
    arrays = [client_arrays(rng) for _ in range(num_clients)]
    counts = rng.integers(1, 5000, size=num_clients)
    ours = weighted_mean(arrays, counts)
    flowers = aggregate_arrayrecords(
        [train_content(a, int(n)) for a, n in zip(arrays, counts)], "num-examples"
    )
    assert set(ours) == set(flowers)
    for key in ours:
        np.testing.assert_allclose(ours[key], flowers[key].numpy(), rtol=0, atol=1e-6)
        assert ours[key].dtype == np.float32


def test_weighted_mean_weights_by_examples() -> None:
    a = {"w": np.zeros(3, np.float32)}
    b = {"w": np.ones(3, np.float32)}
    np.testing.assert_allclose(weighted_mean([a, b], [1, 3])["w"], 0.75)


def test_weighted_metrics_skip_clients_without_the_key() -> None:
    metrics = weighted_metrics([{"loss": 1.0, "acc": 0.5}, {"loss": 3.0}], [1, 1])
    assert metrics == {"loss": 2.0, "acc": 0.5}


def test_aggregate_train_equals_flower_on_real_messages() -> None:
    rng = np.random.default_rng(0)
    global_arrays = client_arrays(rng)
    strategy = strategy_after_configure(global_arrays)
    arrays = [client_arrays(rng) for _ in range(4)]
    counts = [10, 200, 33, 7]
    replies = [reply(train_content(a, n, **{"train-loss": float(n)}), node_id=i + 10)
               for i, (a, n) in enumerate(zip(arrays, counts))]
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    expected = aggregate_arrayrecords([m.content for m in replies], "num-examples")
    for key in SHAPES:
        np.testing.assert_allclose(new_arrays[key].numpy(), expected[key].numpy(), atol=1e-6)
    assert metrics["train-loss"] == pytest.approx(np.dot(counts, counts) / sum(counts))
    assert strategy.last_num_rejected == 0


def _malformed_replies(rng: np.random.Generator) -> dict[str, object]:
    good = client_arrays(rng)
    nan = dict(good, **{"cnn/conv-1/bias": np.array([np.nan, 0, 0, 0], np.float32)})
    inf = dict(good, **{"cnn/conv-1/bias": np.array([np.inf, 0, 0, 0], np.float32)})
    missing = {k: v for k, v in good.items() if k != "cnn/head/kernel"}
    extra = dict(good, **{"cnn/private/kernel": np.ones(2, np.float32)})
    shape = dict(good, **{"cnn/conv-1/bias": np.zeros(5, np.float32)})
    dtype = dict(good, **{"cnn/conv-1/bias": np.zeros(4, np.float64)})
    no_count = RecordDict({"arrays": to_arrayrecord(good), "metrics": MetricRecord({"train-loss": 1.0})})
    return {
        "error reply": error_reply("ClientApp raised", 99),
        "NaN": reply(train_content(nan, 10), 99),
        "Inf": reply(train_content(inf, 10), 99),
        "missing key": reply(train_content(missing, 10), 99),
        "extra key": reply(train_content(extra, 10), 99),
        "wrong shape": reply(train_content(shape, 10), 99),
        "wrong dtype": reply(train_content(dtype, 10), 99),
        "no num-examples": reply(no_count, 99),
        "zero num-examples": reply(train_content(good, 0), 99),
        "negative num-examples": reply(train_content(good, -5), 99),
        "fractional num-examples": reply(train_content(good, 2.5), 99),
        "NaN metric": reply(train_content(good, 10, **{"train-loss": float("nan")}), 99),
        "two ArrayRecords": reply(
            RecordDict({"a": to_arrayrecord(good), "b": to_arrayrecord(good),
                        "metrics": MetricRecord({"num-examples": 10})}), 99),
    }


@pytest.mark.parametrize("case", list(_malformed_replies(np.random.default_rng(0))))
def test_malformed_reply_is_dropped_not_averaged(case: str, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(1)
    global_arrays = client_arrays(rng)
    strategy = strategy_after_configure(global_arrays)
    good = [client_arrays(rng) for _ in range(2)]
    bad = _malformed_replies(np.random.default_rng(0))[case]
    replies = [reply(train_content(good[0], 10), 1), bad, reply(train_content(good[1], 30), 2)]
    new_arrays, _ = strategy.aggregate_train(3, replies)
    expected = weighted_mean(good, [10, 30])
    for key in SHAPES:
        np.testing.assert_allclose(new_arrays[key].numpy(), expected[key], atol=1e-6)
    assert strategy.last_num_rejected == 1


def test_round_without_valid_reply_keeps_model(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(2)
    strategy = strategy_after_configure(client_arrays(rng))
    replies = [error_reply("boom", 3), reply(train_content(client_arrays(rng), 0), 4)]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert strategy.last_num_rejected == 2


def test_evaluate_replies_are_weighted_and_validated() -> None:
    strategy = FedAvg()
    replies = [
        reply(RecordDict({"m": MetricRecord({"eval-accuracy": 1.0, "num-examples": 30})}), 1, "evaluate"),
        reply(RecordDict({"m": MetricRecord({"eval-accuracy": 0.0, "num-examples": 10})}), 2, "evaluate"),
        reply(RecordDict({"m": MetricRecord({"eval-accuracy": 0.3, "num-examples": 0})}), 3, "evaluate"),
        error_reply("crashed", 4, "evaluate"),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["eval-accuracy"] == pytest.approx(0.75)


class FakeGrid:
    """Just enough of a Grid for sampling: a fixed set of connected nodes."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def test_configure_train_samples_fraction_with_minimum_and_sends_config() -> None:
    from tests.messages import set_task_identity

    set_task_identity()
    grid = FakeGrid(list(range(100, 120)))
    strategy = FedAvg(fraction_train=0.25, min_train_nodes=2, seed=3)
    arrays = to_arrayrecord(client_arrays(np.random.default_rng(0)))
    messages = list(strategy.configure_train(4, arrays, ConfigRecord({"local-epochs": 2}), grid))
    assert len(messages) == 5
    assert len({m.metadata.dst_node_id for m in messages}) == 5
    assert all(m.content["config"]["server-round"] == 4 for m in messages)
    assert all(m.content["config"]["local-epochs"] == 2 for m in messages)
    small = FedAvg(fraction_train=0.01, min_train_nodes=3)
    assert len(list(small.configure_train(1, arrays, ConfigRecord(), grid))) == 3


def test_sampling_gives_up_after_the_node_wait_timeout() -> None:
    from strategies.sampling import NotEnoughNodes

    strategy = FedAvg(min_train_nodes=5, node_wait_timeout=0.2)
    with pytest.raises(NotEnoughNodes, match="only 2 node"):
        strategy.sample_train_nodes(FakeGrid([1, 2]))
