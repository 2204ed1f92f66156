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
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MNIST_PATH,
    Samples,
    load_text,
    run_config,
    simulate,
    summarize,
    table,
    write_json,
    write_results,
)

NAME = "scale"


def overhead_ms(r: dict) -> list[float]:
    """Per round 2-N: wall minus the client calls of that round (ms)."""
    calls = [t + e for t, e in zip(r["per_round_train_call_s"], r["per_round_evaluate_call_s"])]
    return [1e3 * (s - c) for s, c in zip(r["round_s"][1:], calls[1:])]


def render(results, args, started, partial) -> None:
    rows = []
    for n, runs in results.items():
        ok = [r for r in runs if r["returncode"] == 0]
        rows.append([
            n, len(ok),
            Samples([r["round_s"][0] for r in ok if r["round_s"]]).fmt(digits=3),
            Samples([x for r in ok for x in r["steady_round_s"]]).fmt(digits=3),
            Samples([x for r in ok for x in r["per_round_train_call_s"][1:]]).fmt(digits=3),
            Samples([x for r in ok for x in overhead_ms(r)]).fmt(digits=3),
            Samples([r["peak_rss_mib"] for r in ok]).fmt(digits=4),
            Samples([r["sim_s"] - r["rounds_total_s"] for r in ok]).fmt(digits=3),
            Samples([r["accuracy"] for r in ok]).fmt(digits=4),
        ])
    keys = list(results)
    verdict = ""
    if len(keys) == 2:
        a, b = ([r for r in results[k] if r["returncode"] == 0] for k in keys)
        if a and b:
            oa = Samples([x for r in a for x in overhead_ms(r)]).median
            ob = Samples([x for r in b for x in overhead_ms(r)]).median
            ma = Samples([r["peak_rss_mib"] for r in a]).median
            mb = Samples([r["peak_rss_mib"] for r in b]).median
            verdict = (
                f"\n\nOverhead per round at N={keys[1]} / N={keys[0]}: {ob / oa:.2f}; "
                f"peak memory ratio: {mb / ma:.2f}.\n"
            )
    body = (
        ("**Partial: the run is still going.**\n\n" if partial else "")
        + f"MNIST IID, {args.per_round} clients trained per round, {args.rounds} rounds, "
        f"1 local epoch, batch 10, no federated evaluation; {args.repeats} runs per N. "
        "Seconds/ms: median (min-max) over rounds 2-N of all runs (round 1 carries the engine's "
        "warm-up); memory and start-up over runs.\n\n"
        + table(["N clients", "runs", "round 1 s", "rounds 2-N s", "train calls s per round",
                 "outside client calls ms per round", "peak MiB (all processes)",
                 "start-up + shutdown s", "final central accuracy"], rows)
        + verdict
    )
    write_results(NAME, "Scale: 100 vs 1,000 simulated clients", body, started=started,
                  extra_header=f"- Load at start: {args.load_at_start}\n")
    write_json(NAME, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--render-only", action="store_true",
                        help=f"re-render the table from results/{NAME}.json")
    parser.add_argument("--timeout", type=float, default=2400)
    args = parser.parse_args()
    if args.render_only:
        import json

        args.load_at_start = "(re-rendered from the JSON; each run's load is in the JSON)"
        render(json.loads((Path(__file__).parent / "results" / f"{NAME}.json").read_text()),
               args, time.time(), partial=False)
        return
    if args.repeats < 2:
        sys.exit("--repeats must be at least 2 (never a single timing)")
    if not MNIST_PATH.is_file():
        sys.exit(f"MNIST not found at {MNIST_PATH}")
    args.load_at_start = load_text()
    started = time.time()
    results = {n: [] for n in args.clients}
    for rep in range(args.repeats):
        for n in (args.clients if rep % 2 == 0 else args.clients[::-1]):
            config = run_config(
                dataset="mnist", data_path=str(MNIST_PATH), partitioner="iid",
                num_server_rounds=args.rounds, fraction_train=args.per_round / n,
                min_train_nodes=args.per_round, fraction_evaluate=0.0, local_epochs=1,
                batch_size=10, learning_rate=0.05,
            )
            print(f"repeat {rep + 1}: N={n} ...", flush=True)
            run = simulate("ours", "ours", config, n, timeout=args.timeout)
            summary = summarize(run)
            summary["load"] = load_text()
            if run.returncode != 0:
                summary["log_tail"] = run.log_tail
                print(run.log_tail, flush=True)
            results[n].append(summary)
            print(f"  rounds {summary['round_s']}, peak {summary['peak_rss_mib']:.0f} MiB",
                  flush=True)
            render(results, args, started, partial=True)
    render(results, args, started, partial=False)
    print((Path(__file__).parent / "results" / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
