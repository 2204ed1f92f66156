"""A ClientApp in the style of Flower's quickstart: positional arrays, "num-examples"."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from quickstart_ours.task import load_data, loss, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    """Train the received model locally; reply with its arrays and example count."""
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    x, y = load_data(int(context.node_config["partition-id"]))
    new = train(arrays, x, y, int(context.run_config["local-steps"]),
                float(context.run_config["learning-rate"]))
    content = RecordDict({
        "arrays": ArrayRecord(new),  # positional: keys "0", "1", ...
        "metrics": MetricRecord({"train_loss": loss(new, x, y), "num-examples": len(y)}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this node's data."""
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    x, y = load_data(int(context.node_config["partition-id"]) + 1000)
    content = RecordDict({"metrics": MetricRecord({"eval_loss": loss(arrays, x, y),
                                                   "num-examples": len(y)})})
    return Message(content=content, reply_to=msg)
