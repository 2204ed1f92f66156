"""Our main job against Flower's quickstart pattern: 10 clients x 5 rounds on digits.

- ``quickstart``: Flower's built-in ``FedAvg`` (its ``Strategy.start`` loop)
  and a ClientApp in the style of Flower's quickstart-tensorflow example:
  every call clears the Keras session, reloads the partition, rebuilds and
  recompiles the model, then trains (or evaluates) it.
- ``ours``: the app's ServerApp (our FedAvg with reply validation, central
  evaluation, metrics and model files) and ClientApp (one compiled model per
  process, reused across calls).

Same data (our digits partitions), same CNN, same hyperparameters (the app's
defaults: 5 local epochs, batch 16, SGD lr 0.1), same duties per round (train
all 10, federated evaluation on all 10, central evaluation on the server's
test set), same Flower simulation engine (``run_simulation``, Ray, 2 CPUs per
client as Flower's default), each run in a fresh process; the two alternate
(ABBA...) so the machine's other load hits both alike.

Targets (issue #10): ours in at most half the quickstart's wall time at higher
accuracy; a client train call at most 2x its ``model.fit`` time; round time
outside client training under 20%.

    uv run python bench/main_job.py              # 3 repeats each, ~15-30 min on 2 busy cores
    uv run python bench/main_job.py --clients 2 --rounds 2 --repeats 1 --out /tmp/bench-smoke
                                                 # smoke check, ~3-4 min
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

NAME = "main_job"
CONTENDERS = {"quickstart": ("flower", "quickstart"), "ours": ("ours", "ours")}


def first_call_delay(run: dict) -> float:
    """Seconds from the ServerApp's start to the start of the first client call."""
    start = [e["t"] for e in run["events"] if e["kind"] == "server-start"]
    calls = [e["t"] - e["call_s"] for e in run["events"] if e["kind"] == "train"]
    return min(calls) - start[0] if start and calls else float("nan")


def render(results: dict[str, list[dict]], args: argparse.Namespace, started: float,
           partial: bool) -> None:
    rows = []
    for name, runs in results.items():
        ok = common.ok_runs(runs)
        rows.append([
            name, len(ok),
            common.fmt_values(r["wall_s"] for r in ok), common.fmt_values(r["sim_s"] for r in ok),
            common.fmt_values(first_call_delay(r) for r in ok),
            common.fmt_values(r["round_s"][0] for r in ok if r["round_s"]),
            common.fmt_values(x for r in ok for x in r["steady_round_s"]),
            common.fmt_values((r["accuracy"] for r in ok), 4),
            common.fmt_values(x for r in ok for x in r["steady_call_over_fit"]),
            common.fmt_values(r["steady_fit_share"] for r in ok),
            common.fmt_values(r["steady_evaluate_share"] for r in ok),
            common.fmt_values(r["steady_outside_client_calls_share"] for r in ok),
            common.fmt_values((r["peak_rss_mib"] for r in ok), 4),
        ])
    q, o = results.get("quickstart", []), results.get("ours", [])
    pairs = common.ok_pairs(q, o)
    ratio_wall = common.Samples([b["wall_s"] / a["wall_s"] for a, b in pairs])
    ratio_sim = common.Samples([b["sim_s"] / a["sim_s"] for a, b in pairs])
    ratio_steady = common.Samples([b["steady_rounds_total_s"] / a["steady_rounds_total_s"]
                            for a, b in pairs])
    o_ok, q_ok = common.ok_runs(o), common.ok_runs(q)
    calls = [x for r in o_ok for x in r["steady_call_over_fit"]]
    first = [x for r in o_ok for x in r["first_call_over_fit"]]
    qcalls = [x for r in q_ok for x in r["steady_call_over_fit"]]
    acc_o = common.Samples([r["accuracy"] for r in o_ok])
    acc_q = common.Samples([r["accuracy"] for r in q_ok])
    outside = common.Samples([r["steady_outside_fit_share"] for r in o_ok])
    outside_calls = common.Samples([r["steady_outside_client_calls_share"] for r in o_ok])

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    targets = common.table(
        ["target", "measured (median (min-max))", "verdict"],
        [
            ["ours wall <= 0.5 x quickstart wall (whole process, per pair)",
             ratio_wall.fmt(digits=3), verdict(ratio_wall.median <= 0.5)],
            ["... the same, `run_simulation` only (no interpreter/TF import)",
             ratio_sim.fmt(digits=3), verdict(ratio_sim.median <= 0.5)],
            ["... the same, rounds 2-N only (no engine warm-up)", ratio_steady.fmt(digits=3),
             verdict(ratio_steady.median <= 0.5)],
            ["ours accuracy > quickstart accuracy (same hyperparameters)",
             f"ours {acc_o.fmt(digits=4)} vs quickstart {acc_q.fmt(digits=4)}",
             verdict(acc_o.median > acc_q.median)],
            ["ours accuracy > 0.77 (the quickstart run quoted in the issue)",
             acc_o.fmt(digits=4), verdict(acc_o.median > 0.77)],
            ["ours client train call <= 2 x its model.fit (rounds 2-N)",
             f"{common.fmt_values(calls)}; round-1 calls (the first one in a process builds "
             f"and traces the model): {common.fmt_values(first)}; quickstart pattern: "
             f"{common.fmt_values(qcalls)}",
             verdict(common.Samples(calls).median <= 2)],
            ["ours round time outside model.fit < 20% (rounds 2-N)",
             f"{outside.fmt(digits=3)}, of which federated evaluation calls "
             f"{common.fmt_values(r['steady_evaluate_share'] for r in o_ok)}"
             f" and outside any client call {outside_calls.fmt(digits=3)}",
             verdict(outside.median < 0.2)],
        ],
    )
    body = (
        f"{args.clients} clients x {args.rounds} rounds on digits, {args.repeats} runs each, "
        "alternating. Times in seconds, median (min-max). `wall`: the whole child process "
        "(Python and TensorFlow import, Ray start, the run, shutdown), what a user waits for; "
        "`simulation`: the `run_simulation` call; `server start -> first call`: from the ServerApp's "
        "start to the first client call (server set-up, then Ray's actor start). `round 1` includes the engine's warm-up (Ray "
        "starts the actor process, which imports TensorFlow before the first client call: a "
        "minute or two on this busy machine, the same for both); `rounds 2-N`: one round's "
        "train + federated evaluation + central evaluation, over all steady rounds of all runs. "
        "`call/fit`: a client's train call over its `model.fit` time (rounds 2-N). Shares are of "
        "the steady rounds' wall time: `fit`, federated `evaluate` calls, and `outside client "
        "calls` (Flower/Ray transport, server validation and aggregation, central evaluation). "
        "Peak memory: all processes of the run (driver, Ray, actors).\n\n"
        + common.table(["contender", "runs", "wall s", "simulation s", "server start -> first call s",
                 "round 1 s", "rounds 2-N s",
                 "central accuracy", "call / fit", "fit share", "evaluate share",
                 "outside client calls", "peak MiB"], rows)
        + "\n\n## Targets\n\n" + targets
        + "\n\nThe quickstart run quoted in the issue (118.5 s, 0.77 accuracy) used the "
        "quickstart's own settings on an idle machine; here both contenders use the app's "
        "hyperparameters so that the difference is the engineering pattern, not tuning, and "
        "the machine was shared with other jobs (see the load lines), which stretches every "
        "figure but hits both alike.\n"
    )
    common.write_simulation_results(NAME, "Main job: ours vs Flower's quickstart pattern",
                                    body, results, args, started, partial)


def main() -> None:
    common.compare_apps(
        NAME, __doc__, CONTENDERS, render,
        lambda s: f"wall {s['wall_s']:.1f} s, rounds {s['round_s']}, accuracy "
                  f"{s['accuracy']:.4f}, steady fit share {s['steady_fit_share']:.3f}",
        repeats=3,
    )


if __name__ == "__main__":
    main()
