"""A ServerApp that runs fedprivacy's FedAvg or DPFedAvg on Flower's quickstart clients.

Our strategies are Flower ``Strategy`` objects: ``strategy.start(grid=...,
initial_arrays=..., num_rounds=...)`` as with Flower's own FedAvg. They send
the model's ArrayRecord as it is (here positional keys "0", "1", ...) and
check every reply has the same keys, shapes and dtypes, finite values and a
MetricRecord with a positive whole "num-examples".
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from quickstart_ours.task import initial_arrays
from strategies import DPFedAvg, FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds with the strategy the run config names."""
    cfg = context.run_config
    num_nodes = len(list(grid.get_node_ids()))
    if cfg["strategy"] == "dp-fedavg":
        strategy: FedAvg = DPFedAvg(
            noise_multiplier=float(cfg["noise-multiplier"]),
            clipping_norm=float(cfg["clipping-norm"]),
            fraction_train=float(cfg["fraction-train"]),
            min_train_nodes=1,
            min_evaluate_nodes=max(1, num_nodes),
        )
    elif cfg["strategy"] == "fedavg":
        strategy = FedAvg(fraction_train=float(cfg["fraction-train"]), min_train_nodes=1,
                          min_evaluate_nodes=max(1, num_nodes))
    else:
        raise ValueError(f"strategy must be 'fedavg' or 'dp-fedavg', got {cfg['strategy']!r}")
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial_arrays()),
        num_rounds=int(cfg["num-server-rounds"]),
    )
    rounds = sorted(result.evaluate_metrics_clientapp)
    if rounds:
        log(INFO, "quickstart: final eval_loss %.4f",
            result.evaluate_metrics_clientapp[rounds[-1]]["eval_loss"])
    if isinstance(strategy, DPFedAvg):
        log(INFO, "quickstart: (epsilon %.3f, delta %g) after %d rounds",
            strategy.ledger.epsilon, strategy.ledger.target_delta, rounds[-1] if rounds else 0)
