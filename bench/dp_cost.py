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

NAME = "dp_cost"
VARIANTS = {
    "fedavg": {"strategy": "fedavg"},
    "dp-fedavg": {"strategy": "dp-fedavg", "noise-multiplier": 1.0, "clipping-norm": 1.0},
    "dp-fedavg-client": {"strategy": "dp-fedavg", "noise-multiplier": 1.0,
                         "clipping-norm": 1.0, "clipping-side": "client"},
}


def render(results, args, started, partial) -> None:
    rows = []
    base_runs = [r for r in results.get("fedavg", []) if r["returncode"] == 0]
    base = Samples([x for r in base_runs for x in r["steady_round_s"]]).median
    base_out = Samples([1e3 * r["steady_outside_client_calls_s_per_round"] for r in base_runs]).median
    for name, runs in results.items():
        ok = [r for r in runs if r["returncode"] == 0]
        per_round = Samples([x for r in ok for x in r["steady_round_s"]])
        outside = Samples([1e3 * r["steady_outside_client_calls_s_per_round"] for r in ok])
        train_call = Samples([
            sum(r["per_round_train_call_s"][1:]) / max(sum(1 for e in r["events"]
                if e["kind"] == "train" and e["round"] > 1), 1)
            for r in ok
        ])
        rows.append([
            name, len(ok), per_round.fmt(digits=3),
            f"{per_round.median / base:.3f}" if ok and base == base else "-",
            train_call.fmt(digits=3), outside.fmt(digits=3),
            f"{outside.median - base_out:+.0f}" if ok and base_out == base_out else "-",
            Samples([r["accuracy"] for r in ok]).fmt(digits=4),
            Samples([r.get("epsilon", float("nan")) for r in ok]).fmt(digits=4),
        ])
    body = (
        ("**Partial: the run is still going.**\n\n" if partial else "")
        + f"Digits, {args.clients} clients x {args.rounds} rounds, {args.repeats} runs per "
        "variant, alternating. Rounds 2-N (round 1 carries the engine's warm-up). Per round: "
        "seconds, median (min-max) over those rounds of all runs. `outside client calls`: ms "
        "per round in neither a train nor an evaluate call (transport and everything the "
        "server does: validation, clipping, noise, accounting, central evaluation); `extra`: "
        "its median minus FedAvg's.\n\n"
        + table(["variant", "runs", "per round s", "/ fedavg", "train call s",
                 "outside client calls ms/round", "extra ms/round vs fedavg",
                 "final central accuracy", "final epsilon"], rows)
        + "\n\nServer-side DP aggregation alone, 10-1,000 clients x 100k-10M parameters: "
        "`bench/results/aggregation.md`. DP-SGD (sample-level, on the client) per-epoch cost: "
        "`bench/dp_sgd_epoch.py` and its results file (another helper's).\n"
    )
    write_results(NAME, "DP costs: DP-FedAvg vs FedAvg rounds", body, started=started,
                  extra_header=f"- Load at start: {args.load_at_start}\n")
    write_json(NAME, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
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
    results = {name: [] for name in args.variants}
    for rep in range(args.repeats):
        order = args.variants if rep % 2 == 0 else args.variants[::-1]
        for name in order:
            config = run_config(num_server_rounds=args.rounds,
                                **{k.replace("-", "_"): v for k, v in VARIANTS[name].items()})
            print(f"repeat {rep + 1}: {name} ...", flush=True)
            run = simulate("ours", "ours", config, args.clients, timeout=args.timeout)
            summary = summarize(run)
            rounds = run.rounds_from_metrics()
            if rounds and "epsilon" in rounds[-1]:
                summary["epsilon"] = rounds[-1]["epsilon"]
            summary["load"] = load_text()
            if run.returncode != 0:
                summary["log_tail"] = run.log_tail
                print(run.log_tail, flush=True)
            results[name].append(summary)
            print(f"  rounds {summary['round_s']}, accuracy {summary['accuracy']:.4f}", flush=True)
            render(results, args, started, partial=True)
    render(results, args, started, partial=False)
    print((Path(__file__).parent / "results" / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
