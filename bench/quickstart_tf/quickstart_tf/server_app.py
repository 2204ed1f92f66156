"""Flower's built-in FedAvg, as Flower's quickstart-tensorflow ServerApp runs it.

Central evaluation of every round's model on the server's held-out test split
of this project's digits data (the same split, model and evaluation as the
main app's ServerApp), federated evaluation on every node. The same as the
``flower`` ServerApp of ``bench/common.py`` (the ``run_simulation`` bench).
The last line names the final central accuracy, for the bench to read.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from app.task import model_spec
from clients.training import evaluate, get_model
from data.federation import load_server_split
from quickstart_tf.task import Settings

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``num-server-rounds`` rounds of Flower's FedAvg with central evaluation."""
    cfg = context.run_config
    settings = Settings.from_run_config(cfg)
    _, test = load_server_split(settings.dataset, settings.data_path, settings.test_fraction,
                                settings.seed, settings.max_classes)
    model = get_model(model_spec(settings, test))  # type: ignore[arg-type]

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.set_weights(arrays.to_numpy_ndarrays())
        loss, accuracy = evaluate(model, test)
        return MetricRecord({"central-loss": loss, "central-accuracy": accuracy})

    min_train = int(cfg["min-train-nodes"])
    strategy = FedAvg(
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=float(cfg["fraction-evaluate"]),
        min_train_nodes=min_train,
        min_evaluate_nodes=max(int(cfg["min-evaluate-nodes"]), 1),
        min_available_nodes=min_train,
    )
    num_rounds = int(cfg["num-server-rounds"])
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.get_weights()),
        num_rounds=num_rounds,
        timeout=float(cfg["round-timeout"]),
        train_config=ConfigRecord({"local-epochs": int(cfg["local-epochs"]),
                                   "batch-size": int(cfg["batch-size"]),
                                   "learning-rate": float(cfg["learning-rate"])}),
        evaluate_config=ConfigRecord({"batch-size": int(cfg["batch-size"])}),
        evaluate_fn=central,
    )
    rounds = sorted(result.evaluate_metrics_serverapp)
    if rounds:
        final = result.evaluate_metrics_serverapp[rounds[-1]]
        log(INFO, "quickstart: final central accuracy %.4f loss %.4f after %d rounds",
            final["central-accuracy"], final["central-loss"], rounds[-1])
