"""FedAvg, FedProx, FedAvgM, FedAdam (and server-side training) on pathological non-IID MNIST.

The setting of McMahan et al. (2017), https://arxiv.org/abs/1602.05629: the
60,000 MNIST training images sorted by label, cut into 200 shards, 2 shards
per client, 100 clients, 10 sampled per round; the official 10,000 test
images for central evaluation. The model is their "2NN" (784-200-200-10,
ReLU), which a 2-core CPU trains fast enough for the whole grid.

Methods (same seeds everywhere, so every method sees the same client
samples each round and the same data order on each client):

- ``fedavg``: FedAvg (McMahan et al. 2017).
- ``fedprox-<mu>``: FedProx local training, proximal term ``mu/2 ||w - w^t||^2``
  (Li et al. 2020, https://arxiv.org/abs/1812.06127).
- ``fedavgm``: server momentum on the pseudo-gradient (Hsu et al. 2019).
- ``fedadam``: FedAdam (Reddi et al. 2021, https://arxiv.org/abs/2003.00295).
- ``... +server``: the same, and the server fine-tunes the aggregated model
  each round on a public slice of the training split (600 images, stratified,
  held out *before* partitioning, :mod:`data.public_slice`).
- ``public-only``: no clients; the server's fine-tuning alone, one epoch on
  the public slice per "round" (what the public data is worth by itself).

The public slice is held out in every run, used or not, so client data is
identical across all methods (59,400 images in 200 shards of 297).

The loop is our real strategy (``strategies.fedavg.FedAvg.start`` with
``server_optimizer`` and ``server_update_fn``) over an in-process grid whose
nodes train with :func:`clients.proximal.train_proximal`; no Flower
simulation engine, so the comparison fits in minutes.

Run::

    uv run python bench/noniid_optimizers.py --data-path /work/shared/datasets/mnist/mnist.npz

and see ``--help``; the result note is ``bench/results/noniid_optimizers.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from bench.common import MNIST_PATH, Samples, append_results, set_task_identity  # noqa: E402
from clients.proximal import local_seed, train_proximal  # noqa: E402
from clients.server_training import make_server_update_fn  # noqa: E402
from clients.training import ModelSpec, build_compiled  # noqa: E402
from clients.weights import get_weights, set_weights  # noqa: E402
from data.dataset import LabeledData  # noqa: E402
from data.federation import FederationSpec  # noqa: E402
from data.federation import build_federation_with_public_slice  # noqa: E402
from strategies.fedavg import FedAvg, to_arrayrecord, to_numpy  # noqa: E402
from strategies.server_optimizers import make_server_optimizer  # noqa: E402

TARGET_ACCURACY = 0.95


@dataclass(frozen=True)
class Method:
    """One row of the comparison."""

    name: str
    proximal_mu: float = 0.0
    optimizer: str | None = None
    optimizer_lr: float | None = None
    optimizer_hyper: dict[str, Any] = field(default_factory=dict)
    server_train: bool = False
    clients: bool = True


def methods(server_lr_momentum: float, server_lr_adam: float, mus: Iterable[float]) -> list[Method]:
    """The grid: each method without and with server-side training."""
    base = [Method("fedavg")]
    base += [Method(f"fedprox-{mu:g}", proximal_mu=mu) for mu in mus]
    base.append(Method("fedavgm", optimizer="momentum", optimizer_lr=server_lr_momentum,
                       optimizer_hyper={"momentum": 0.9}))
    base.append(Method("fedadam", optimizer="adam", optimizer_lr=server_lr_adam,
                       optimizer_hyper={"beta1": 0.9, "beta2": 0.99, "tau": 1e-3}))
    return base + [
        Method(m.name + "+server", m.proximal_mu, m.optimizer, m.optimizer_lr,
               m.optimizer_hyper, server_train=True)
        for m in base
    ] + [Method("public-only", server_train=True, clients=False)]


def build_2nn(seed: int) -> Any:
    """McMahan et al.'s 2NN (``model='2nn'``), a new compiled instance: plain SGD, sparse CE."""
    return build_compiled(ModelSpec("image", (28, 28, 1), 10, seed=seed, architecture="2nn"))


class LocalGrid:
    """Nodes ``1..N`` in this process: node ``k`` trains on partition ``k - 1``."""

    # pylint: disable=too-many-arguments
    def __init__(self, model: Any, pool: LabeledData, partitions: tuple[np.ndarray, ...],
                 *, epochs: int, batch_size: int, learning_rate: float, proximal_mu: float,
                 seed: int) -> None:
        self.model = model
        self.clients = [pool.subset(p) for p in partitions]
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.proximal_mu = proximal_mu
        self.seed = seed
        self.round = 0

    def get_node_ids(self) -> list[int]:
        return list(range(1, len(self.clients) + 1))

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None
                         ) -> list[Message]:
        replies = []
        for message in messages:
            if message.metadata.message_type != MessageType.TRAIN:
                continue
            config = message.content.config_records["config"]
            server_round = int(config["server-round"])
            partition = message.metadata.dst_node_id - 1
            global_arrays = to_numpy(message.content.array_records["arrays"])
            set_weights(self.model, global_arrays)
            data = self.clients[partition]
            loss = train_proximal(
                self.model, data, epochs=self.epochs, batch_size=self.batch_size,
                learning_rate=self.learning_rate, proximal_mu=self.proximal_mu,
                global_weights=global_arrays,
                seed=local_seed(self.seed, server_round, partition),
            )
            content = RecordDict({
                "arrays": to_arrayrecord(get_weights(self.model)),
                "metrics": MetricRecord({"train-loss": loss, "num-examples": len(data)}),
            })
            replies.append(Message(content, reply_to=message))
        return replies


def central_evaluator(model: Any, test: LabeledData):
    """``evaluate_fn`` of the strategy: accuracy on the official test set."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_weights(model, to_numpy(arrays))
        loss, accuracy = model.evaluate(test.x, test.y, batch_size=2000, verbose=0)
        return MetricRecord({"central-loss": float(loss), "central-accuracy": float(accuracy)})

    return evaluate


# pylint: disable=too-many-locals
def run_public_only(args: argparse.Namespace, federation: Any, public: LabeledData,
                    model: Any, initial: dict[str, np.ndarray]) -> dict[str, Any]:
    """The server alone: one fine-tuning epoch on the public slice per "round", no clients."""
    started = time.monotonic()
    evaluate = central_evaluator(model, federation.test)
    trainer = make_server_update_fn(model, public, epochs=args.server_epochs,
                                    batch_size=args.batch_size, learning_rate=args.lr,
                                    seed=args.seed)
    assert trainer is not None
    arrays = initial
    curve = [evaluate(0, to_arrayrecord(arrays))["central-accuracy"]]
    for server_round in range(1, args.rounds + 1):
        arrays = trainer(server_round, arrays)
        curve.append(evaluate(server_round, to_arrayrecord(arrays))["central-accuracy"])
    print(f"  {'public-only':<22} round {args.rounds:3d}  acc {curve[-1]:.4f}", flush=True)
    reached = next((r for r, a in enumerate(curve) if a >= TARGET_ACCURACY), None)
    return {"method": "public-only", "accuracy": curve, "rounds_to_target": reached,
            "seconds": time.monotonic() - started}


def run_method(method: Method, args: argparse.Namespace, federation: Any, public: LabeledData,
               model: Any, initial: dict[str, np.ndarray]) -> dict[str, Any]:
    """Run one method for ``args.rounds`` rounds; return its accuracy curve."""
    if not method.clients:
        return run_public_only(args, federation, public, model, initial)
    optimizer = (
        None if method.optimizer is None
        else make_server_optimizer(method.optimizer, method.optimizer_lr, **method.optimizer_hyper)
    )
    server_model = build_2nn(args.seed)
    update_fn = make_server_update_fn(
        server_model, public if method.server_train else None,
        epochs=args.server_epochs if method.server_train else 0,
        batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
    )
    strategy = FedAvg(
        fraction_train=0.1, fraction_evaluate=0.0, min_train_nodes=2, min_evaluate_nodes=0,
        seed=args.seed, server_optimizer=optimizer, server_update_fn=update_fn,
    )
    grid = LocalGrid(model, federation.train, federation.partitions, epochs=args.local_epochs,
                     batch_size=args.batch_size, learning_rate=args.lr,
                     proximal_mu=method.proximal_mu, seed=args.seed)
    curve: list[float] = []
    round_s: list[float] = []
    started = time.monotonic()

    def listener(report: Any) -> None:
        accuracy = report.central_metrics.get("central-accuracy", math.nan)
        curve.append(accuracy)
        if report.server_round > 0:
            round_s.append(report.elapsed_s)
        if report.server_round % 5 == 0 or report.server_round == args.rounds:
            print(f"  {method.name:<22} round {report.server_round:3d}  acc {accuracy:.4f}  "
                  f"{time.monotonic() - started:6.0f} s", flush=True)

    strategy.start(grid, to_arrayrecord(initial), num_rounds=args.rounds,
                   evaluate_fn=central_evaluator(model, federation.test),
                   on_round_end=[listener])
    reached = next((r for r, a in enumerate(curve) if a >= TARGET_ACCURACY), None)
    return {
        "method": method.name,
        "accuracy": curve,  # index 0 is the initial model
        "rounds_to_target": reached,
        "seconds": time.monotonic() - started,
        "round_s": round_s,
    }


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The result table: rounds to 95% and accuracy after R rounds, with and without +server."""
    by_name = {r["method"]: r for r in results}
    rounds = args.rounds
    marks = sorted({m for m in (10, 20, rounds) if m <= rounds})
    lines = [
        f"| method | rounds to {TARGET_ACCURACY:.0%} | "
        + " | ".join(f"acc @{m}" for m in marks)
        + f" | best acc | s per round | rounds to {TARGET_ACCURACY:.0%} (+server) | "
        + " | ".join(f"acc @{m} (+server)" for m in marks)
        + " | best acc (+server) | s per round (+server) |",
        "|---|---:|" + "---:|" * len(marks) + "---:|---:|---:|" + "---:|" * len(marks)
        + "---:|---:|",
    ]
    for name, row in by_name.items():
        if name.endswith("+server"):
            continue
        cells = [name]
        for variant in (row, by_name.get(name + "+server")):
            if variant is None:
                cells += ["-"] * (len(marks) + 3)
                continue
            reached = variant["rounds_to_target"]
            cells.append(str(reached) if reached is not None else f"> {rounds}")
            cells += [f"{variant['accuracy'][m]:.4f}" for m in marks]
            cells.append(f"{max(variant['accuracy'][1:]):.4f}")
            cells.append(Samples(variant.get("round_s", [])).fmt(digits=3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default=str(MNIST_PATH))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.1,
                        help="client (and server fine-tuning) SGD rate")
    parser.add_argument("--mus", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--server-lr-momentum", type=float, default=1.0)
    parser.add_argument("--server-lr-adam", type=float, default=0.01)
    parser.add_argument("--public-size", type=int, default=600)
    parser.add_argument("--server-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="run only these method names")
    parser.add_argument("--json", type=Path, default=None, help="write the raw curves here")
    parser.add_argument("--out", type=Path, default=None,
                        help="append the table (with command, machine, date, load) to this file")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="print the table of earlier --json files (merged) and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_json:
        merged = {}
        for path in args.from_json:
            for row in json.loads(path.read_text())["results"]:
                merged[row["method"]] = row
        args.rounds = min(len(r["accuracy"]) - 1 for r in merged.values())
        print(markdown(list(merged.values()), args))
        return
    logging.getLogger("flwr").setLevel(logging.WARNING)
    set_task_identity(run_id=1, node_id=0, task_id=1)

    spec = FederationSpec(dataset="mnist", data_path=args.data_path, partitioner="shards",
                          num_partitions=100, seed=args.seed, test_fraction=0.2,
                          shards_per_client=2)
    built = build_federation_with_public_slice(spec, f"public-slice:{args.public_size}")
    federation, public = built.federation, built.public
    sizes = [len(p) for p in federation.partitions]
    print(f"clients: {len(sizes)} x {min(sizes)}..{max(sizes)} images, public slice "
          f"{len(public)} (per class {np.bincount(public.y).tolist()}), "
          f"test {len(federation.test)}")

    model = build_2nn(args.seed)
    initial = get_weights(model)
    chosen = methods(args.server_lr_momentum, args.server_lr_adam, args.mus)
    if args.only:
        chosen = [m for m in chosen if m.name in set(args.only)]
    results = []
    started = time.monotonic()
    for method in chosen:
        results.append(run_method(method, args, federation, public, model, initial))
        if args.json is not None:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "results": results}, indent=1))
    print(f"total {time.monotonic() - started:.0f} s")
    append_results(
        args.out, "FedAvg, FedProx, FedAvgM, FedAdam on pathological non-IID MNIST",
        f"{args.rounds} rounds, E = {args.local_epochs}, B = {args.batch_size}, lr {args.lr}, "
        f"seed {args.seed}; one run per method (same seeds for all); seconds per round: median "
        "(min-max) over the rounds.\n\n" + markdown(results, args),
    )


if __name__ == "__main__":
    main()
