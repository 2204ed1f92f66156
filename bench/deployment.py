"""Deployed rounds vs simulated ones: the scripted TLS + auth deployment, cold and with warm workers.

For each number of SuperNodes (``--nodes``, default 2 and 4), three runs of
the same run config (digits, ``--rounds`` rounds, 1 local epoch, federated
evaluation on every node), one after the other in an alternating order:

- ``deployed``: ``deploy.local_deploy.LocalDeployment`` (TLS, SuperNode
  authentication, one SuperNode per node); Flower starts a fresh
  ``flwr-clientapp`` process, which imports TensorFlow, for every message;
- ``deployed-warm``: the same with ``warm_workers=True``: a worker beside
  each SuperNode keeps TensorFlow, the model and the data loaded
  (:mod:`app.warm_worker`);
- ``simulation``: the same app in Flower's simulation engine
  (``bench.common.simulate``, ``run_simulation`` in a child process).

Measured: wall time (deployment: from ``flwr run`` to its exit; simulation:
the child's run), time to the end of round 1, the steady round (median of
rounds 2..N, from the time each ``[round k/N]`` progress line appears) and
the ratio deployed / simulated. Start-up of the SuperLink and SuperNodes is
outside the wall time of both.

    uv run python bench/deployment.py            # ~15-25 min on 2 cores
    uv run python bench/deployment.py --nodes 2 --rounds 2 --out /tmp/bench-smoke
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from deploy.local_deploy import LocalDeployment  # noqa: E402

NAME = "deployment"
GOAL = 1.5  # steady deployed round <= 1.5 x the simulated one


def run_config(rounds: int) -> dict[str, Any]:
    return {"num-server-rounds": rounds, "local-epochs": 1, "fraction-evaluate": 1.0}


def deployed(nodes: int, rounds: int, warm: bool) -> dict[str, Any]:
    """One deployed run; round times from the progress lines as they appear."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    config = " ".join(f"{k}={v}" for k, v in run_config(rounds).items())
    config += f" min-train-nodes={nodes} min-evaluate-nodes={nodes} output-dir='{workdir / 'out'}'"
    with LocalDeployment(workdir, num_supernodes=nodes, warm_workers=warm) as deployment:
        deployment.start()
        started = time.monotonic()
        run = deployment.start_run(config, log_path=workdir / "run.log")
        marks = []
        for k in range(1, rounds + 1):
            run.wait_for(re.escape(f"[round {k}/{rounds}]"), 1800)
            marks.append(time.monotonic() - started)
        while run.running():
            time.sleep(0.2)
        wall = time.monotonic() - started
        ok = run.returncode == 0
    steady = [b - a for a, b in zip(marks, marks[1:])]
    return {"ok": ok, "wall_s": wall, "round1_s": marks[0], "steady_round_s": steady}


def simulated(nodes: int, rounds: int) -> dict[str, Any]:
    config = common.run_config(**{k.replace("-", "_"): v for k, v in run_config(rounds).items()},
                               min_train_nodes=nodes, min_evaluate_nodes=nodes)
    run = common.simulate("ours", "ours", config, nodes)
    summary = common.summarize(run)
    round_s = summary["round_s"]
    return {"ok": run.returncode == 0, "wall_s": summary["sim_s"],
            "round1_s": round_s[0] if round_s else float("nan"),
            "steady_round_s": round_s[1:]}


def render(results: dict[str, Any], started: float) -> None:
    rows, verdicts = [], []
    for nodes, modes in results["runs"].items():
        steady = {m: statistics.median(r["steady_round_s"]) for m, r in modes.items()
                  if r.get("ok") and r["steady_round_s"]}
        for mode, r in modes.items():
            ratio = (steady[mode] / steady["simulation"]
                     if mode in steady and "simulation" in steady else float("nan"))
            rows.append([nodes, mode, "yes" if r.get("ok") else "**failed**",
                         f"{r['wall_s']:.1f}", f"{r['round1_s']:.1f}",
                         common.fmt_values(r["steady_round_s"], 3), f"{ratio:.2f}"])
        if "deployed-warm" in steady and "simulation" in steady:
            ratio = steady["deployed-warm"] / steady["simulation"]
            verdicts.append(f"{nodes} nodes: steady deployed-warm round {ratio:.2f} x the "
                            f"simulated one: goal (<= {GOAL}) "
                            + ("**met**" if ratio <= GOAL else "**not met**"))
    body = (
        f"Digits, {results['rounds']} rounds, 1 local epoch, federated evaluation on every node; "
        "one run per mode, alternating. Seconds; steady round = median (min-max) of rounds "
        "2..N.\n\n"
        + common.table(["SuperNodes", "mode", "completed", "wall s", "end of round 1 s",
                        "steady round s", "steady round / simulated"], rows)
        + "\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n"
    )
    common.write_results(NAME, "Deployed vs simulated rounds, cold and with warm workers", body,
                         started=started)
    common.write_json(NAME, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=5)
    common.add_out_option(parser)
    args = parser.parse_args()
    common.apply_out_option(args)
    started = time.time()
    results: dict[str, Any] = {"rounds": args.rounds, "runs": {}}
    for i, nodes in enumerate(args.nodes):
        order = ["deployed-warm", "simulation", "deployed"]
        if i % 2:
            order.reverse()
        results["runs"][nodes] = {}
        for mode in order:
            print(f"{nodes} nodes: {mode} ...", flush=True)
            if mode == "simulation":
                result = simulated(nodes, args.rounds)
            else:
                result = deployed(nodes, args.rounds, warm=mode == "deployed-warm")
            print(f"  {result}", flush=True)
            results["runs"][nodes][mode] = result
            render(results, started)


if __name__ == "__main__":
    main()
