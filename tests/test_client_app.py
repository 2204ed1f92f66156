"""The ClientApp's handlers, called through the ClientApp with real Messages."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, MessageType, RecordDict

from app.client_app import app as client_app
from app.config import parse_run_config
from app.task import model_spec
from clients.models import build_model
from clients.weights import get_weights
from data.federation import load_server_split
from strategies.fedavg import to_arrayrecord, to_numpy
from tests.messages import instruction
from tests.test_config import defaults


def context(partition_id: int = 1, num_partitions: int = 4, **run_config: object) -> Context:
    config = defaults()
    config.update(run_config)
    return Context(
        run_id=1, node_id=100 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(), run_config=config,
    )


@pytest.fixture(scope="module")
def global_weights() -> dict[str, np.ndarray]:
    config = parse_run_config(defaults())
    _, test = load_server_split(config.dataset, config.data_path, config.test_fraction, config.seed)
    spec = model_spec(config, test)
    return get_weights(build_model(spec.kind, spec.input_shape, spec.num_classes, seed=spec.seed))


def test_train_returns_trained_arrays_with_the_same_keys_and_metrics(global_weights) -> None:
    message = instruction(
        RecordDict({
            "arrays": to_arrayrecord(global_weights),
            "config": ConfigRecord({"server-round": 1, "local-epochs": 1,
                                    "batch-size": 16, "learning-rate": 0.1}),
        }),
        node_id=101,
    )
    reply = client_app(message, context())
    assert not reply.has_error()
    assert reply.metadata.message_type == MessageType.TRAIN
    arrays = to_numpy(reply.content["arrays"])
    assert set(arrays) == set(global_weights)
    assert all(arrays[k].shape == v.shape and arrays[k].dtype == v.dtype for k, v in global_weights.items())
    # Training moved the weights, and only finitely.
    assert any(not np.allclose(arrays[k], v) for k, v in global_weights.items())
    assert all(np.isfinite(a).all() for a in arrays.values())
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and np.isfinite(metrics["train-loss"])
    # The count is this client's training part: a quarter of ~1437, less validation.
    assert 250 < metrics["num-examples"] < 360


def test_evaluate_returns_loss_accuracy_and_count(global_weights) -> None:
    message = instruction(
        RecordDict({"arrays": to_arrayrecord(global_weights),
                    "config": ConfigRecord({"server-round": 1, "batch-size": 32})}),
        node_id=102, kind=MessageType.EVALUATE,
    )
    reply = client_app(message, context(partition_id=2))
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    assert 0.0 <= metrics["eval-accuracy"] <= 1.0
    assert metrics["eval-loss"] > 0 and 20 < metrics["num-examples"] < 50
    assert "arrays" not in reply.content


def test_a_node_without_partition_config_fails_with_a_clear_reason(global_weights) -> None:
    bad = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=defaults())
    message = instruction(
        RecordDict({"arrays": to_arrayrecord(global_weights),
                    "config": ConfigRecord({"server-round": 1, "batch-size": 32})}),
        node_id=7, kind=MessageType.EVALUATE,
    )
    with pytest.raises(ValueError, match="partition-id"):
        client_app(message, bad)
