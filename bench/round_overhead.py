"""Round overhead: our strategy vs Flower's built-in FedAvg, same ClientApp, same data.

Both run in Flower's simulation engine (``run_simulation``, Ray, 2 CPUs per
client), each in a fresh process, alternating: ``flower-fedavg`` is Flower's
``FedAvg`` and ``Strategy.start`` with our ClientApp; ``ours`` is the app's
ServerApp (our FedAvg with reply validation). Both evaluate every round on
all clients and on the server's test set. Reported: time per round and the
share of it spent in ``model.fit`` on the clients, in the rest of the client
calls (setting weights, evaluation), and outside the client calls (Flower/Ray
transport, server-side validation, aggregation and central evaluation).

    uv run python bench/round_overhead.py        # 2 runs each of 10 clients x 5 rounds, ~15-25 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Samples,
    load_text,
    run_config,
    simulate,
    summarize,
    table,
    write_json,
    write_results,
)

NAME = "round_overhead"
CONTENDERS = {"flower-fedavg": ("flower", "ours"), "ours": ("ours", "ours")}


def render(results, args, started, partial) -> None:
    rows = []
    for name, runs in results.items():
        ok = [r for r in runs if r["returncode"] == 0]
        rows.append([
            name, len(ok),
            Samples([r["round_s"][0] for r in ok if r["round_s"]]).fmt(digits=3),
            Samples([x for r in ok for x in r["steady_round_s"]]).fmt(digits=3),
            Samples([r["steady_fit_share"] for r in ok]).fmt(digits=3),
            Samples([r["steady_other_train_call_share"] for r in ok]).fmt(digits=3),
            Samples([r["steady_evaluate_share"] for r in ok]).fmt(digits=3),
            Samples([r["steady_outside_client_calls_share"] for r in ok]).fmt(digits=3),
            Samples([1e3 * r["steady_outside_client_calls_s_per_round"] for r in ok]).fmt(digits=3),
            Samples([r["accuracy"] for r in ok]).fmt(digits=4),
        ])
    f, o = results.get("flower-fedavg", []), results.get("ours", [])
    pairs = [(a, b) for a, b in zip(f, o) if a["returncode"] == 0 and b["returncode"] == 0]
    ratio = Samples([b["steady_rounds_total_s"] / a["steady_rounds_total_s"] for a, b in pairs])
    outside = Samples([r["steady_outside_fit_share"] for r in o if r["returncode"] == 0])
    body = (
        ("**Partial: the run is still going.**\n\n" if partial else "")
        + f"{args.clients} clients x {args.rounds} rounds on digits (5 local epochs, batch 16), "
        f"{args.repeats} runs each, alternating. `round 1` includes the engine's warm-up (Ray "
        "starts the actor, which imports TensorFlow and builds the model before the first "
        "call), the same for both; the other columns use rounds 2-N. Seconds: median (min-max) "
        "over rounds of all runs; shares of the steady rounds' wall time, median (min-max) over "
        "runs: `model.fit`, the rest of the train calls (setting weights, reply), federated "
        "evaluation calls, and outside any client call (Flower/Ray transport, server "
        "validation, aggregation and central evaluation), also in ms per round.\n\n"
        + table(["strategy", "runs", "round 1 s", "rounds 2-N s", "model.fit share",
                 "rest of train calls", "evaluate calls", "outside client calls",
                 "outside client calls ms/round", "final central accuracy"], rows)
        + "\n\n"
        + table(["figure", "median (min-max)"], [
            ["ours / Flower FedAvg, rounds 2-N wall (per pair)", ratio.fmt(digits=3)],
            ["ours: share of rounds 2-N outside model.fit (target < 0.20)",
             f"{outside.fmt(digits=3)} -> {'met' if outside.median < 0.2 else '**missed**'}"],
        ])
        + "\n\nClients run one at a time (2 CPUs each on a 2-core machine, Flower's default "
        "resources), so a round is the sum of its client calls plus what happens outside them. "
        "Federated evaluation on every client every round is a duty of the run, not overhead, "
        "but it is not training either, so it counts against the 20% here.\n"
    )
    write_results(NAME, "Round overhead: our FedAvg vs Flower's FedAvg", body, started=started,
                  extra_header=f"- Load at start: {args.load_at_start}\n")
    write_json(NAME, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--render-only", action="store_true",
                        help=f"re-render the table from results/{NAME}.json")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if args.render_only:
        import json

        args.load_at_start = "(re-rendered from the JSON; each run's load is in the JSON)"
        render(json.loads((Path(__file__).parent / "results" / f"{NAME}.json").read_text()),
               args, time.time(), partial=False)
        return
    if args.repeats < 2:
        sys.exit("--repeats must be at least 2 (never a single timing)")
    args.load_at_start = load_text()
    started = time.time()
    config = run_config(num_server_rounds=args.rounds)
    results = {name: [] for name in CONTENDERS}
    names = list(CONTENDERS)
    for rep in range(args.repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            server, client = CONTENDERS[name]
            print(f"repeat {rep + 1}: {name} ...", flush=True)
            run = simulate(server, client, config, args.clients, timeout=args.timeout)
            summary = summarize(run)
            summary["load"] = load_text()
            if run.returncode != 0:
                summary["log_tail"] = run.log_tail
                print(run.log_tail, flush=True)
            results[name].append(summary)
            print(f"  rounds {summary['round_s']}, steady fit share "
                  f"{summary['steady_fit_share']:.3f}", flush=True)
            render(results, args, started, partial=True)
    render(results, args, started, partial=False)
    print((Path(__file__).parent / "results" / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
