"""Cross-silo sample-level DP: federated MNIST with DP-SGD on 10 clients at epsilon ~1, 3, 8.

The counterpart of ``bench/dp_scale.py`` for a few large institutions: 10
clients (MNIST, IID, about 5,000 training images each), every client in
every round, each training with DP-SGD (``dp-sgd=true``: per-record clipping
to ``dp-sgd-clipping-norm`` and Gaussian noise, sample-level RDP accounting
per client), against the same run without DP. The whole app runs in this
process: the real ServerApp (``app.server_app.main``) drives the real
ClientApp through ``bench.common.InProcessGrid`` (no Ray), so the figures
are read back from the run's own ``metrics.json`` (central accuracy and the
largest sample-level epsilon any client reached). The DP-SGD noise
multiplier of each run is the smallest (bisection on the app's own
``privacy.sample_accounting.sample_epsilon``) whose epsilon after all rounds
is within the target at delta 1e-5.

Run (about 5 min on 2 cores)::

    uv run python bench/dp_cross_silo.py --data-path ../shared/datasets/mnist/mnist.npz

Smoke check::

    uv run python bench/dp_cross_silo.py --rounds 1 --targets 8 --out /tmp/bench-smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MNIST_PATH,
    InProcessGrid,
    add_out_option,
    apply_out_option,
    command_line,
    load_json,
    load_text,
    node_contexts,
    run_config,
    set_task_identity,
    table,
    write_json,
    write_results,
)
from privacy.sample_accounting import sample_epsilon  # noqa: E402

NAME = "dp_cross_silo"
DELTA = 1e-5


def calibrate(num_examples: int, batch_size: int, epochs: int, rounds: int,
              target: float) -> float:
    """Smallest DP-SGD noise multiplier (to 1e-3) keeping ``rounds`` rounds within ``target``."""
    low, high = 0.3, 50.0
    while high - low > 1e-3:
        mid = 0.5 * (low + high)
        if sample_epsilon(num_examples, batch_size, epochs, rounds, mid, DELTA) <= target:
            high = mid
        else:
            low = mid
    return high


def run_one(args: argparse.Namespace, noise: float | None) -> dict[str, Any]:
    """One in-process run of the app; ``noise`` None: without DP-SGD."""
    from flwr.app import Context, RecordDict

    from app.client_app import app as client_app
    from app.server_app import main

    out = Path(tempfile.mkdtemp(prefix="dp-cross-silo-"))
    overrides: dict[str, Any] = dict(
        dataset="mnist", data_path=str(args.data_path), partitioner="iid", model="mlp",
        num_server_rounds=args.rounds, fraction_train=1.0, min_train_nodes=args.clients,
        fraction_evaluate=0.0, min_evaluate_nodes=0, local_epochs=args.local_epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, output_dir=str(out),
        seed=args.seed, target_sample_delta=DELTA,
    )
    if noise is not None:
        overrides.update(dp_sgd=True, dp_sgd_noise_multiplier=noise,
                         dp_sgd_clipping_norm=args.clipping_norm)
    config = run_config(**overrides)
    contexts = node_contexts(args.clients, config)
    grid = InProcessGrid(client_app, contexts)
    set_task_identity(run_id=7, node_id=1)
    started = time.perf_counter()
    main(grid, Context(run_id=7, node_id=1, node_config={}, state=RecordDict(),
                       run_config=config))
    wall = time.perf_counter() - started
    grid.check()
    metrics = json.loads(next(out.glob("*/metrics.json")).read_text())
    rounds = metrics["rounds"]
    return {
        "noise_multiplier": noise,
        "accuracy": [r.get("central-accuracy") for r in rounds],
        "sample_epsilon": [r.get("sample-epsilon-max") for r in rounds],
        "final_accuracy": rounds[-1]["central-accuracy"],
        "final_sample_epsilon": rounds[-1].get("sample-epsilon-max", math.inf),
        "wall_s": wall,
    }


def render(data: dict[str, Any], started: float | None) -> None:
    cfg = data["config"]
    rows = []
    for run in data["runs"]:
        eps = run["final_sample_epsilon"]
        rows.append([
            "none" if run["target"] is None else f"{run['target']:g}",
            "-" if run["noise_multiplier"] is None else f"{run['noise_multiplier']:.3f}",
            "inf" if eps is None or math.isinf(eps) else f"{eps:.3g}",
            f"{run['final_accuracy']:.4f}", f"{run['wall_s']:.0f} s",
        ])
    body = (
        f"MNIST IID over {cfg['clients']} clients (about {cfg['examples']} training images "
        f"each), every client every round, {cfg['rounds']} rounds of {cfg['local_epochs']} local "
        f"epoch(s), batch {cfg['batch_size']}, client lr {cfg['learning_rate']:g}, model 'mlp'; "
        f"DP-SGD clipping norm {cfg['clipping_norm']:g}, delta {DELTA:g}. The whole app in one "
        "process (real ServerApp and ClientApp, no Ray); one run per row.\n\n"
        + table(["target sample-level epsilon", "DP-SGD noise multiplier",
                 "largest client epsilon reached", "central accuracy", "wall time"], rows)
        + "\n\nSample-level epsilon protects each training record of a client against the "
        "server and anyone after it; it says nothing about a client's whole contribution "
        "(that is user-level DP, `bench/results/dp_scale.md`).\n"
    )
    write_results(NAME, "Cross-silo DP-SGD: 10 clients at sample-level epsilon 1, 3, 8", body,
                  started=started,
                  extra_header=f"- Invocation: `{data['command']}` (load at start {data['load']})\n")


def main_cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", type=Path, default=MNIST_PATH)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--clipping-norm", type=float, default=1.0)
    parser.add_argument("--targets", nargs="*", type=float, default=[1.0, 3.0, 8.0])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--render-only", action="store_true")
    add_out_option(parser)
    args = parser.parse_args(argv)
    apply_out_option(args)
    if args.render_only:
        render(load_json(NAME), None)
        return
    if not args.data_path.is_file():
        raise SystemExit(f"MNIST not found at {args.data_path}: pass --data-path")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    from data.federation import FederationSpec, load_client_data

    spec = FederationSpec(dataset="mnist", data_path=str(args.data_path), partitioner="iid",
                          num_partitions=args.clients, seed=args.seed, test_fraction=0.2,
                          val_fraction=0.1)
    examples = min(len(load_client_data(spec, p)[0]) for p in range(args.clients))
    started = time.time()
    data: dict[str, Any] = {
        "config": {"clients": args.clients, "rounds": args.rounds, "examples": examples,
                   "local_epochs": args.local_epochs, "batch_size": args.batch_size,
                   "learning_rate": args.learning_rate, "clipping_norm": args.clipping_norm},
        "command": command_line(), "load": load_text(), "runs": [],
    }
    for target in [None, *args.targets]:
        noise = None if target is None else calibrate(
            examples, args.batch_size, args.local_epochs, args.rounds, target)
        print(f"target {target}: noise {noise}", flush=True)
        run = run_one(args, noise)
        run["target"] = target
        print(f"  accuracy {run['final_accuracy']:.4f}, epsilon {run['final_sample_epsilon']}, "
              f"{run['wall_s']:.0f} s", flush=True)
        data["runs"].append(run)
        write_json(NAME, data)
        render(data, started)


if __name__ == "__main__":
    main_cli()
