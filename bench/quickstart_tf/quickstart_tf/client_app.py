"""A ClientApp in the style of Flower's quickstart-tensorflow example.

Every call clears the Keras session, loads this node's partition, builds and
compiles a new model, sets the received weights, then trains (``model.fit``)
or evaluates (``model.evaluate``) it. Arrays travel as Flower's quickstart
sends them: a list (keys "0", "1", ...). The same as the ``quickstart``
ClientApp of ``bench/common.py`` (the ``run_simulation`` bench).
"""

from __future__ import annotations

import keras
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from quickstart_tf.task import load_data, load_model

app = ClientApp()


def _setup(msg: Message, context: Context):  # type: ignore[no-untyped-def]
    keras.backend.clear_session()
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    train, val = load_data(context.run_config, partition_id, num_partitions)
    model = load_model(context.run_config, train)
    model.set_weights(msg.content["arrays"].to_numpy_ndarrays())
    return model, train, val


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's data; reply with its weights."""
    model, train_data, _ = _setup(msg, context)
    config = msg.content["config"]
    history = model.fit(train_data.x, train_data.y, epochs=int(config["local-epochs"]),
                        batch_size=int(config["batch-size"]), shuffle=True, verbose=0)
    content = RecordDict({
        "arrays": ArrayRecord(model.get_weights()),
        "metrics": MetricRecord({"train-loss": float(history.history["loss"][-1]),
                                 "num-examples": len(train_data)}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this node's validation data."""
    model, _, val = _setup(msg, context)
    loss, accuracy = model.evaluate(val.x, val.y, verbose=0)
    return Message(content=RecordDict({"metrics": MetricRecord(
        {"eval-loss": float(loss), "eval-accuracy": float(accuracy), "num-examples": len(val)}
    )}), reply_to=msg)
