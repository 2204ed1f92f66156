"""The ServerApp: validate the config, run the strategy, write the run's outputs."""

from __future__ import annotations

from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from clients.training import evaluate, get_model
from clients.weights import get_weights, set_weights
from data.federation import load_server_split
from strategies.fedavg import FedAvg, RoundReport, to_arrayrecord, to_numpy

from .config import ConfigError, RunConfig, parse_run_config
from .run_outputs import MetricsLog, create_run_dir, resolve_output_dir
from .task import model_spec

app = ServerApp()


class CentralEvaluator:
    """Evaluates a global model on the server's held-out test set.

    The FedAvg procedure of the design ends every round by testing the new
    global model on held-out data to see whether it improved.
    """

    def __init__(self, config: RunConfig) -> None:
        _, self.test = load_server_split(
            config.dataset, config.data_path, config.test_fraction, config.seed
        )
        self.model = get_model(model_spec(config, self.test))

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Return ``central-loss`` and ``central-accuracy`` of ``arrays``."""
        set_weights(self.model, to_numpy(arrays))
        loss, accuracy = evaluate(self.model, self.test)
        return MetricRecord({"central-loss": loss, "central-accuracy": accuracy})


def round_entry(report: RoundReport) -> dict[str, float | int]:
    """One round's entry of ``metrics.json``."""
    entry: dict[str, float | int] = {"round": report.server_round}
    entry.update(report.train_metrics)
    for key, value in report.federated_metrics.items():
        entry[key.replace("eval-", "federated-")] = value
    entry.update(report.central_metrics)
    if report.server_round > 0:
        entry["num-sampled"] = report.num_sampled
        entry["num-accepted"] = report.num_accepted
        entry["num-rejected"] = report.num_rejected
        entry["elapsed-s"] = round(report.elapsed_s, 3)
    return entry


def log_round(report: RoundReport) -> None:
    """The one progress line per round."""
    central = report.central_metrics
    log(
        INFO,
        "[round %d/%d] train-loss %s | central accuracy %.4f loss %.4f | "
        "federated accuracy %s | %d/%d replies | %.1f s",
        report.server_round,
        report.num_rounds,
        _fmt(report.train_metrics.get("train-loss")),
        central.get("central-accuracy", float("nan")),
        central.get("central-loss", float("nan")),
        _fmt(report.federated_metrics.get("eval-accuracy")),
        report.num_accepted,
        report.num_sampled,
        report.elapsed_s,
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated training as the run config says."""
    try:
        config = parse_run_config(context.run_config)
    except ConfigError as error:
        log(ERROR, "Invalid run config: %s", error)
        raise
    run_dir = create_run_dir(resolve_output_dir(config.output_dir), context.run_id)
    log(INFO, "Run %s: outputs in %s", context.run_id, run_dir)

    evaluator = CentralEvaluator(config)
    initial = to_arrayrecord(get_weights(evaluator.model))
    metrics_log = MetricsLog(run_dir / "metrics.json", config.as_dict())

    strategy = FedAvg(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=config.min_evaluate_nodes,
        node_wait_timeout=config.node_wait_timeout,
        seed=config.seed,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord(
            {
                "local-epochs": config.local_epochs,
                "batch-size": config.batch_size,
                "learning-rate": config.learning_rate,
            }
        ),
        evaluate_config=ConfigRecord({"batch-size": config.batch_size}),
        evaluate_fn=evaluator,
        on_round_end=[log_round, lambda report: metrics_log.append(round_entry(report))],
    )
    save_model(evaluator, result.arrays, run_dir / "model.keras")
    log(INFO, "Run %s finished: model and metrics in %s", context.run_id, run_dir)


def save_model(evaluator: CentralEvaluator, arrays: ArrayRecord, path: Path) -> None:
    """Save the final global model as a Keras file (``keras.saving.load_model`` reads it)."""
    set_weights(evaluator.model, to_numpy(arrays))
    evaluator.model.save(path)
