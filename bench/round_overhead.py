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
    uv run python bench/round_overhead.py --clients 2 --rounds 2 --repeats 1 --out /tmp/bench-smoke
                                                 # smoke check, ~3-4 min
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

NAME = "round_overhead"
CONTENDERS = {"flower-fedavg": ("flower", "ours"), "ours": ("ours", "ours")}


def render(results, args, started, partial) -> None:
    rows = []
    for name, runs in results.items():
        ok = common.ok_runs(runs)
        rows.append([
            name, len(ok),
            common.fmt_values(r["round_s"][0] for r in ok if r["round_s"]),
            common.fmt_values(x for r in ok for x in r["steady_round_s"]),
            common.fmt_values(r["steady_fit_share"] for r in ok),
            common.fmt_values(r["steady_other_train_call_share"] for r in ok),
            common.fmt_values(r["steady_evaluate_share"] for r in ok),
            common.fmt_values(r["steady_outside_client_calls_share"] for r in ok),
            common.fmt_values(1e3 * r["steady_outside_client_calls_s_per_round"] for r in ok),
            common.fmt_values((r["accuracy"] for r in ok), 4),
        ])
    f, o = results.get("flower-fedavg", []), results.get("ours", [])
    pairs = common.ok_pairs(f, o)
    ratio = common.Samples([b["steady_rounds_total_s"] / a["steady_rounds_total_s"] for a, b in pairs])
    outside = common.Samples([r["steady_outside_fit_share"] for r in common.ok_runs(o)])
    body = (
        f"{args.clients} clients x {args.rounds} rounds on digits (5 local epochs, batch 16), "
        f"{args.repeats} runs each, alternating. `round 1` includes the engine's warm-up (Ray "
        "starts the actor, which imports TensorFlow and builds the model before the first "
        "call), the same for both; the other columns use rounds 2-N. Seconds: median (min-max) "
        "over rounds of all runs; shares of the steady rounds' wall time, median (min-max) over "
        "runs: `model.fit`, the rest of the train calls (setting weights, reply), federated "
        "evaluation calls, and outside any client call (Flower/Ray transport, server "
        "validation, aggregation and central evaluation), also in ms per round. Both use our "
        "ClientApp; a run in which any client call failed or a round trained no client is "
        "left out (see 'Failed runs').\n\n"
        + common.table(["strategy", "runs", "round 1 s", "rounds 2-N s", "model.fit share",
                 "rest of train calls", "evaluate calls", "outside client calls",
                 "outside client calls ms/round", "final central accuracy"], rows)
        + "\n\n"
        + common.table(["figure", "median (min-max)"], [
            ["ours / Flower FedAvg, rounds 2-N wall (per pair)", ratio.fmt(digits=3)],
            ["ours: share of rounds 2-N outside model.fit (target < 0.20)",
             f"{outside.fmt(digits=3)} -> {'met' if outside.median < 0.2 else '**missed**'}"],
        ])
        + "\n\nClients run one at a time (2 CPUs each on a 2-core machine, Flower's default "
        "resources), so a round is the sum of its client calls plus what happens outside them. "
        "Federated evaluation on every client every round is a duty of the run, not overhead, "
        "but it is not training either, so it counts against the 20% here.\n"
    )
    common.write_simulation_results(NAME, "Round overhead: our FedAvg vs Flower's FedAvg",
                                    body, results, args, started, partial)


def main() -> None:
    common.compare_apps(
        NAME, __doc__, CONTENDERS, render,
        lambda s: f"rounds {s['round_s']}, steady fit share {s['steady_fit_share']:.3f}, "
                  f"accuracy {s['accuracy']:.4f}",
    )


if __name__ == "__main__":
    main()
