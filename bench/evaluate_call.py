"""One evaluation call: ``model.evaluate`` (before) vs ``clients.training.evaluate`` (after).

On the app's default task (digits, the CNN, seed 42), in one process,
interleaved (a rotating order every repeat), after one warm-up call each (the
first call traces): the model's figures on

- a client's validation split (partition 0 of ``--clients``, what a federated
  evaluation call evaluates; digits leave a client of 10 about 14 rows);
- the server's test split (what the central evaluation evaluates, 360 rows);
- and the whole ClientApp evaluate call (``app.client_app.evaluate`` with a
  real Message: data set-up, weights, then the evaluation), with the
  evaluation done the old way (``model.evaluate``) and the new way.

Both ways must give the same loss and accuracy (checked, to 1e-5).

    uv run python bench/evaluate_call.py                  # 20 calls each, ~1 min
    uv run python bench/evaluate_call.py --repeats 5 --out /tmp/bench-smoke    # smoke, ~30 s
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

NAME = "evaluate_call"


def keras_evaluate(model, data, *, batch_size: int = 256) -> tuple[float, float]:
    """``clients.training.evaluate`` before this benchmark: ``model.evaluate`` per call."""
    loss, accuracy = model.evaluate(data.x, data.y, batch_size=batch_size, verbose=0)
    return float(loss), float(accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10,
                        help="number of partitions (the client's split is partition 0's)")
    common.add_out_option(parser)
    args = parser.parse_args()
    common.apply_out_option(args)
    if args.repeats < 2:
        sys.exit("--repeats must be at least 2 (never a single timing)")

    import app.client_app as client_module
    from app.config import parse_run_config
    from app.task import federation_spec, model_spec
    from clients.training import evaluate, get_model
    from clients.weights import get_weights
    from data.federation import load_client_data, load_server_split
    from flwr.app import ConfigRecord, Context, MessageType, RecordDict
    from strategies.fedavg import to_arrayrecord
    from tests.messages import instruction

    started = time.time()
    config_dict = common.run_config()
    config = parse_run_config(config_dict)
    _, val = load_client_data(federation_spec(config, args.clients), 0)
    _, test = load_server_split(config.dataset, config.data_path, config.test_fraction,
                                config.seed)
    model = get_model(model_spec(config, test))
    message = instruction(
        RecordDict({"arrays": to_arrayrecord(get_weights(model)),
                    "config": ConfigRecord({"server-round": 1, "batch-size": 16})}),
        node_id=1000, kind=MessageType.EVALUATE,
    )
    context = Context(run_id=1, node_id=1000,
                      node_config={"partition-id": 0, "num-partitions": args.clients},
                      state=RecordDict(), run_config=config_dict)

    def client_call(evaluate_fn):  # type: ignore[no-untyped-def]
        def call() -> None:
            client_module.evaluate_model = evaluate_fn
            try:
                reply = client_module.evaluate(message, context)
            finally:
                client_module.evaluate_model = evaluate
            assert not reply.has_error(), reply.error.reason

        return call

    checks = []
    for label, data in (("client validation split", val), ("server test split", test)):
        before, after = keras_evaluate(model, data), evaluate(model, data)
        diff = max(abs(before[0] - after[0]), abs(before[1] - after[1]))
        checks.append([label, len(data), f"{before[0]:.6f} / {before[1]:.4f}",
                       f"{after[0]:.6f} / {after[1]:.4f}", f"{diff:.1e}"])
        if diff > 1e-5:
            sys.exit(f"{label}: evaluate differs from model.evaluate by {diff}")

    contenders = {
        "client split: model.evaluate (before)": lambda: keras_evaluate(model, val),
        "client split: evaluate (after)": lambda: evaluate(model, val),
        "server split: model.evaluate (before)": lambda: keras_evaluate(model, test),
        "server split: evaluate (after)": lambda: evaluate(model, test),
        "ClientApp evaluate call, model.evaluate (before)": client_call(keras_evaluate),
        "ClientApp evaluate call, evaluate (after)": client_call(evaluate),
    }
    samples = common.interleaved(contenders, args.repeats, warmup=1)
    names = list(contenders)
    rows = [[name, samples[name].fmt(1e3)] for name in names]
    ratios = [
        [label, common.ratio_samples(samples[names[i]].values,
                                     samples[names[i + 1]].values).fmt(digits=3)]
        for i, label in ((0, "client split"), (2, "server split"), (4, "ClientApp call"))
    ]
    body = (
        f"Digits (the app's defaults), the CNN, {args.repeats} interleaved calls per row after "
        f"one warm-up call each; the client's split is partition 0 of {args.clients}. "
        "Milliseconds, median (min-max).\n\n"
        + common.table(["call", "ms"], rows)
        + "\n\n" + common.table(["before / after (per repeat)", "median (min-max)"], ratios)
        + "\n\nSame figures (loss / accuracy), checked before timing:\n\n"
        + common.table(["data", "rows", "model.evaluate", "evaluate", "max abs diff"], checks)
        + "\n"
    )
    common.write_results(NAME, "One evaluation call: model.evaluate vs one compiled pass", body,
                         started=started)
    common.write_json(NAME, {name: samples[name].values for name in names})
    print((common.results_dir() / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
