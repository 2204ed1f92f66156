"""DP costs: a DP-FedAvg round against a FedAvg round, same clients, same data.

Our app in Flower's simulation engine on digits (10 clients, all sampled each
round, 5 local epochs), each run in a fresh process, alternating:

- ``fedavg``: ``strategy='fedavg'``;
- ``dp-fedavg``: ``strategy='dp-fedavg'``, server-side fixed clipping C = 1,
  noise multiplier z = 1 (user-level DP with the RDP accountant and, under
  Poisson sampling, the PLD accountant run every round);
- ``dp-fedavg-client``: the same with ``clipping-side='client'`` (clients clip
  their own update; the server checks the norms).

What a round costs on top of FedAvg is reported per round and split into the
client calls and the rest (server: validation, clipping, noise, accounting).
The per-aggregation server cost alone, for 10-1,000 clients and 100k-10M
parameters, is in ``bench/results/aggregation.md`` (``ours-dp`` vs
``flower-dp``); the per-epoch cost of DP-SGD on a client (sample-level DP) is
measured by ``bench/dp_sgd_epoch.py`` (another helper's script, see
``bench/README.md``).

    uv run python bench/dp_cost.py               # 2 runs each, ~20-30 min on 2 busy cores
    uv run python bench/dp_cost.py --clients 2 --rounds 2 --repeats 1 --out /tmp/bench-smoke
                                                 # smoke check, ~5 min
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

NAME = "dp_cost"
VARIANTS = {
    "fedavg": {"strategy": "fedavg"},
    "dp-fedavg": {"strategy": "dp-fedavg", "noise-multiplier": 1.0, "clipping-norm": 1.0},
    "dp-fedavg-client": {"strategy": "dp-fedavg", "noise-multiplier": 1.0,
                         "clipping-norm": 1.0, "clipping-side": "client"},
}


def epsilon(run: dict) -> float:
    """The run's final epsilon from our ServerApp's metrics (NaN for FedAvg)."""
    rounds = run.get("metrics_rounds") or [{}]
    return float(run.get("epsilon", rounds[-1].get("epsilon", float("nan"))))


def render(results, args, started, partial) -> None:
    rows = []
    base_runs = common.ok_runs(results.get("fedavg", []))
    base = common.Samples([x for r in base_runs for x in r["steady_round_s"]]).median
    base_out = common.Samples([1e3 * r["steady_outside_client_calls_s_per_round"] for r in base_runs]).median
    for name, runs in results.items():
        ok = common.ok_runs(runs)
        per_round = common.Samples([x for r in ok for x in r["steady_round_s"]])
        outside = common.Samples([1e3 * r["steady_outside_client_calls_s_per_round"] for r in ok])
        train_call = common.Samples([
            sum(r["per_round_train_call_s"][1:]) / max(sum(1 for e in r["events"]
                if e["kind"] == "train" and e["round"] > 1), 1)
            for r in ok
        ])
        rows.append([
            name, len(ok), per_round.fmt(digits=3),
            f"{per_round.median / base:.3f}" if ok and base == base else "-",
            train_call.fmt(digits=3), outside.fmt(digits=3),
            f"{outside.median - base_out:+.0f}" if ok and base_out == base_out else "-",
            common.fmt_values((r["accuracy"] for r in ok), 4),
            common.fmt_values((epsilon(r) for r in ok), 4),
        ])
    body = (
        f"Digits, {args.clients} clients x {args.rounds} rounds, {args.repeats} runs per "
        "variant, alternating. Rounds 2-N (round 1 carries the engine's warm-up). Per round: "
        "seconds, median (min-max) over those rounds of all runs. `outside client calls`: ms "
        "per round in neither a train nor an evaluate call (transport and everything the "
        "server does: validation, clipping, noise, accounting, central evaluation); `extra`: "
        "its median minus FedAvg's.\n\n"
        + common.table(["variant", "runs", "per round s", "/ fedavg", "train call s",
                 "outside client calls ms/round", "extra ms/round vs fedavg",
                 "final central accuracy", "final epsilon"], rows)
        + "\n\nServer-side DP aggregation alone, 10-1,000 clients x 100k-10M parameters: "
        "`bench/results/aggregation.md`. DP-SGD (sample-level, on the client) per-epoch cost: "
        "`bench/dp_sgd_epoch.py` and its results file (another helper's).\n"
    )
    common.write_simulation_results(NAME, "DP costs: DP-FedAvg vs FedAvg rounds", body,
                                    results, args, started, partial)


def main() -> None:
    parser = common.simulation_parser(__doc__)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    if common.prepare(args, NAME, render):
        return
    specs = {
        name: ("ours", "ours", common.run_config(
            num_server_rounds=args.rounds,
            **{k.replace("-", "_"): v for k, v in VARIANTS[name].items()},
        ), args.clients)
        for name in args.variants
    }
    common.run_alternating(
        NAME, args, common.simulations(specs, args.timeout), render,
        lambda s: f"rounds {s['round_s']}, accuracy {s['accuracy']:.4f}, "
                  f"epsilon {epsilon(s):.3g}",
    )


if __name__ == "__main__":
    main()
