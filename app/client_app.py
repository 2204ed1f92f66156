"""The ClientApp: local training and evaluation on this node's part of the data."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.training import evaluate as evaluate_model
from clients.training import get_model, train_locally
from clients.weights import get_weights, set_weights
from data.dataset import LabeledData
from data.federation import load_client_data
from strategies.clipping import clip_to_reference
from strategies.dp_fedavg import (
    CONFIG_CLIPPING_NORM,
    CONFIG_LOCAL_DP_DELTA,
    CONFIG_LOCAL_DP_EPSILON,
)
from strategies.fedavg import to_arrayrecord, to_numpy
from strategies.local_dp import privatize_arrays

from .config import parse_run_config
from .task import federation_spec, model_spec

app = ClientApp()


def _local_data(context: Context) -> tuple[LabeledData, LabeledData, object]:
    """This node's (train, validation) data and its model, from the node config.

    In simulation Flower sets ``partition-id`` and ``num-partitions``; a
    deployed SuperNode gets them from ``--node-config``: one code path.
    """
    config = parse_run_config(context.run_config)
    try:
        partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
    except KeyError as missing:
        raise ValueError(
            f"node config has no {missing}; start the SuperNode with "
            "--node-config \"partition-id=K num-partitions=N\""
        ) from None
    spec = federation_spec(config, num_partitions)
    train, val = load_client_data(spec, partition_id)
    return train, val, get_model(model_spec(config, train))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local data and send it back."""
    train_data, _, model = _local_data(context)
    global_arrays = to_numpy(msg.content["arrays"])
    set_weights(model, global_arrays)
    config = msg.content["config"]
    loss = train_locally(
        model,
        train_data,
        epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        learning_rate=float(config["learning-rate"]),
    )
    content = RecordDict(
        {
            "arrays": to_arrayrecord(outgoing_arrays(get_weights(model), global_arrays, config)),
            "metrics": MetricRecord(
                {"train-loss": loss, "num-examples": len(train_data)}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


def outgoing_arrays(
    local: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray], config: ConfigRecord
) -> dict[str, np.ndarray]:
    """What leaves the client: its arrays, clipped or locally privatised when DP asks.

    Under DP-FedAvg with ``clipping-side='client'`` the update is clipped here
    to ``clipping-norm``; with ``local-dp-epsilon`` it is clipped and noised
    here (the noise drawn from the OS entropy pool, never known to the server).
    """
    if CONFIG_LOCAL_DP_EPSILON in config:
        return privatize_arrays(
            local,
            global_arrays,
            float(config[CONFIG_CLIPPING_NORM]),
            float(config[CONFIG_LOCAL_DP_EPSILON]),
            float(config[CONFIG_LOCAL_DP_DELTA]),
            np.random.default_rng(),
        )
    if CONFIG_CLIPPING_NORM in config:
        return clip_to_reference(local, global_arrays, float(config[CONFIG_CLIPPING_NORM]))
    return local


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local validation data."""
    _, val_data, model = _local_data(context)
    set_weights(model, to_numpy(msg.content["arrays"]))
    loss, accuracy = evaluate_model(model, val_data)
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {"eval-loss": loss, "eval-accuracy": accuracy, "num-examples": len(val_data)}
            )
        }
    )
    return Message(content=content, reply_to=msg)
