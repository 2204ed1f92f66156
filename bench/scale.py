"""Scale: 100 vs 1,000 simulated clients, 10 trained per round.

Our app (ServerApp + ClientApp) in Flower's simulation engine on MNIST (IID,
so 600 vs 60 images per client), ``fraction-train`` = 10 / N, federated
evaluation off, 1 local epoch. Idle clients should cost nothing: the time
per round outside the client calls (sampling, transport, validation,
aggregation, central evaluation) and the peak memory of the whole run
(driver, Ray and actors) should not grow with N. The client calls themselves
are shorter at N = 1,000 (60 images each instead of 600), so the raw round
time is reported but the comparison is on the overhead.

    uv run python bench/scale.py                 # 2 runs each of 4 rounds, ~20-30 min
    uv run python bench/scale.py --clients 20 100 --rounds 2 --repeats 1 --out /tmp/bench-smoke
                                                 # smoke check, ~5 min
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

NAME = "scale"


def overhead_ms(r: dict) -> list[float]:
    """Per round 2-N: wall minus the client calls of that round (ms)."""
    calls = [t + e for t, e in zip(r["per_round_train_call_s"], r["per_round_evaluate_call_s"])]
    return [1e3 * (s - c) for s, c in zip(r["round_s"][1:], calls[1:])]


def render(results, args, started, partial) -> None:
    rows = []
    for n, runs in results.items():
        ok = common.ok_runs(runs)
        rows.append([
            n, len(ok),
            common.fmt_values(r["round_s"][0] for r in ok if r["round_s"]),
            common.fmt_values(x for r in ok for x in r["steady_round_s"]),
            common.fmt_values(x for r in ok for x in r["per_round_train_call_s"][1:]),
            common.fmt_values(x for r in ok for x in overhead_ms(r)),
            common.fmt_values((r["peak_rss_mib"] for r in ok), 4),
            common.fmt_values(r["sim_s"] - r["rounds_total_s"] for r in ok),
            common.fmt_values((r["accuracy"] for r in ok), 4),
        ])
    keys = list(results)
    verdict = ""
    if len(keys) == 2:
        a, b = (common.ok_runs(results[k]) for k in keys)
        if a and b:
            oa = common.Samples([x for r in a for x in overhead_ms(r)]).median
            ob = common.Samples([x for r in b for x in overhead_ms(r)]).median
            ma = common.Samples([r["peak_rss_mib"] for r in a]).median
            mb = common.Samples([r["peak_rss_mib"] for r in b]).median
            verdict = (
                f"\n\nOverhead per round at N={keys[1]} / N={keys[0]}: {ob / oa:.2f}; "
                f"peak memory ratio: {mb / ma:.2f}.\n"
            )
    body = (
        f"MNIST IID, model '{args.model}', {args.per_round} clients trained per round, "
        f"{args.rounds} rounds, "
        f"1 local epoch, batch 10, no federated evaluation; {args.repeats} runs per N. "
        "Seconds/ms: median (min-max) over rounds 2-N of all runs (round 1 carries the engine's "
        "warm-up); memory and start-up over runs.\n\n"
        + common.table(["N clients", "runs", "round 1 s", "rounds 2-N s", "train calls s per round",
                 "outside client calls ms per round", "peak MiB (all processes)",
                 "start-up + shutdown s", "final central accuracy"], rows)
        + verdict
    )
    common.write_simulation_results(NAME, "Scale: 100 vs 1,000 simulated clients", body,
                                    results, args, started, partial)


def main() -> None:
    parser = common.simulation_parser(__doc__, rounds=4, clients=None, timeout=2400)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--model", default="default",
                        help="the run config's model key (default: the app's CNN, 1.7M parameters)")
    args = parser.parse_args()
    if common.prepare(args, NAME, render):
        return
    if not common.MNIST_PATH.is_file():
        sys.exit(f"MNIST not found at {common.MNIST_PATH}")
    specs = {
        n: ("ours", "ours", common.run_config(
            dataset="mnist", data_path=str(common.MNIST_PATH), partitioner="iid",
            num_server_rounds=args.rounds, fraction_train=args.per_round / n,
            min_train_nodes=args.per_round, fraction_evaluate=0.0, local_epochs=1,
            batch_size=10, learning_rate=0.05, model=args.model,
        ), n)
        for n in args.clients
    }
    common.run_alternating(
        NAME, args, common.simulations(specs, args.timeout), render,
        lambda s: f"rounds {s['round_s']}, peak {s['peak_rss_mib']:.0f} MiB",
    )


if __name__ == "__main__":
    main()
