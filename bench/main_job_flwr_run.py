"""Our main job against Flower's quickstart pattern, measured as a user runs it: ``flwr run``.

- ``ours``: ``flwr run . --stream --federation-config "num-supernodes=10"
  --run-config "num-server-rounds=5 output-dir='<tmp>'"``,
  the app as shipped (its ServerApp and ClientApp, every other setting its default).
- ``quickstart``: ``flwr run bench/quickstart_tf --stream --federation-config
  "num-supernodes=10" --run-config "num-server-rounds=5"``,
  Flower's quickstart-tensorflow pattern as a Flower app of its own: Flower's
  built-in ``FedAvg`` and a ClientApp that clears the Keras session, reloads its
  partition, rebuilds and recompiles the model every call; the same data (our
  digits partitions), CNN, hyperparameters (5 local epochs, batch 16, SGD lr
  0.1), central evaluation on the same server test split every round and
  federated evaluation on every node (the ``quickstart`` ClientApp and
  ``flower`` ServerApp of ``bench/common.py``, as an app directory).

Both run against a simulation SuperLink started by this script as the tests'
harness starts one (``tests/flwr_harness.py``: its own FLWR_HOME, loopback
port, subprocess isolation, ``--disable-runtime-dependency-installation``);
``--clients`` SuperNodes set as the README's command sets them
(``--federation-config``), Flower's default 2 CPUs per client. **A fresh
SuperLink per run**: no run inherits another's SuperLink state, leftover
simulation or Ray processes, or a stuck run, and the ABBA order cannot favour
whichever app runs second on a warm SuperLink. The SuperLink is started, and
its SuperExec has finished starting (its CPU time stops growing), before the
clock starts, and stopped after it stops: the wall time is that of a user
whose local SuperLink is already running (README, "Run"), i.e. the ``flwr run``
command from its start to its exit (CLI start, FAB build and upload, the run,
the end of the log stream). The two alternate (ABBA...), so the machine's other
load hits both alike.

Every line ``flwr run --stream`` prints is timestamped as it arrives. Flower
streams the run's log in polls (the SuperLink sends new lines every 0.5 s, the
ServerApp uploads them every 0.2 s or more), so a timestamp lags the moment
the line was logged by up to about a second; rounds of a few seconds carry
that error, sums of rounds much less (it cancels between consecutive marks).

How a round is delimited (each from the ServerApp's own log lines):

- ours: the strategy's progress line ``[round k/N]`` is logged when round k
  has ended (train, federated evaluation, central evaluation, then the
  round's checkpoint, metrics.json and TensorBoard entry); round 0's line
  (``[round 0/N] initial model``) ends the initial central evaluation and
  round-0 checkpoint. Round k = from the arrival of ``[round k-1/N]`` to that
  of ``[round k/N]``. Round k starts right after ``[round k-1/N]``: nothing
  but the strategy's stop check lies between.
- quickstart: Flower's ``Strategy.start`` logs ``[ROUND k/N]`` just before it
  configures round k's training, and after the round's central evaluation
  ``Global evaluation`` then ``\u2514\u2500\u2500> MetricRecord: {...}``. Round k =
  from the arrival of ``[ROUND k/N]`` to that of round k's central-evaluation
  ``MetricRecord`` line.

Both therefore span train + federated evaluation + central evaluation (+ ours'
per-round files). "Set-up outside the rounds" = wall - sum of the rounds:
before round 1 (CLI, FAB, SuperExec pick-up, simulation and Ray start, the
ServerApp's imports and set-up, the initial central evaluation) plus after the
last round (ours: plots, model file, summary; both: the end of the run and of
the stream). The final central accuracy: ours' ``metrics.json`` (the run folder
under ``output-dir``), the quickstart's last line ``quickstart: final central
accuracy``.

Separately, in fresh interpreters (``--call-repeats`` each, alternating): the
import time of each ClientApp module (``app.client_app``;
``quickstart_tf.client_app``) after ``flwr.app`` and ``flwr.clientapp`` are
imported (they are, in every Flower runtime, before the ClientApp is loaded),
then the first call of its train handler on a real message (digits partition
0 of ``--clients``, the seeded initial model as the ServerApp sends it, the
app's defaults), a second train call (steady), then two evaluate calls.

Goals (the issue): ours' wall time <= 0.5 x the quickstart's, and ours'
set-up outside the rounds no longer than the quickstart's.

    uv run python bench/main_job_flwr_run.py        # 3 pairs + 5 call children each,
                                                    # ~15 min idle, 20-25 min on 2 busy cores
    uv run python bench/main_job_flwr_run.py --quick  # 2 clients x 2 rounds, 1 pair, 1 call
                                                      # child each, to /tmp/bench-smoke, ~4 min

Each run's streamed log, with arrival times, stays in its ``workdir`` (named
in the JSON) as ``run.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The ClientApp child times its imports from a bare interpreter: bench.common
#: imports Flower's ServerApp and ClientApp modules, so the child loads it after.
_CALLS_CHILD = __name__ == "__main__" and sys.argv[1:2] == ["calls-child"]
if not _CALLS_CHILD:
    from bench import common  # noqa: E402

NAME = "main_job_flwr_run"
REPO = Path(__file__).resolve().parents[1]
QUICKSTART_DIR = REPO / "bench" / "quickstart_tf"
CONTENDERS = ("ours", "quickstart")
#: The issue's measurement (10 clients x 5 rounds, `flwr run`), for context.
ISSUE = {"ours_wall_s": 69.9, "quickstart_wall_s": 111.2, "ours_setup_s": 32.0,
         "quickstart_setup_s": 25.0}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
OURS_ROUND = re.compile(r"\[round (\d+)/(\d+)\]")
OURS_REPLIES = re.compile(r"\| (\d+)/(\d+) replies \|")
QS_ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")
QS_FINAL = re.compile(r"quickstart: final central accuracy ([0-9.]+)")
QS_CENTRAL = re.compile(r"'central-accuracy': ([0-9.e-]+)")
QS_REPLIES = re.compile(r"aggregate_(train|evaluate): Received (\d+) results and (\d+) failures")
STARTED = re.compile(r"Successfully started run (\d+)")
FEDERATION = re.compile(r"\((\d+) simulated SuperNodes\)")


# ----------------------------------------------------------------- the SuperLink
def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, ValueError, IndexError):
            continue
    return total


def _rss_mib(pids: list[int]) -> float:
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    return total / 2**20


class SuperLink:
    """A simulation SuperLink as ``tests.flwr_harness.simulation_superlink`` starts it.

    Exposes what the harness's context manager keeps inside: the processes it
    spawned (for peak memory) and a wait until SuperExec has finished starting.
    """

    def __init__(self, flwr_home: Path) -> None:
        from tests.flwr_harness import BIN, SpawnedProcesses, _wait_for_port, free_port

        port = free_port()
        flwr_home.mkdir(parents=True, exist_ok=True)
        (flwr_home / "config.toml").write_text(
            "[superlink]\n"
            'default = "bench"\n\n'
            "[superlink.bench]\n"
            f'address = "127.0.0.1:{port}"\n'
            "insecure = true\n"
        )
        env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_DISABLE_UPDATE_CHECK="1")
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        # What a terminal gives `flwr run` (line by line); a pipe would buffer the stream.
        env["PYTHONUNBUFFERED"] = "1"
        self.env = env
        self.bin = BIN
        self.process = subprocess.Popen(  # pylint: disable=consider-using-with
            [str(BIN / "flower-superlink"), "--insecure", "--simulation",
             "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
             "--log-file", str(flwr_home / "superlink.log"),
             "--disable-runtime-dependency-installation"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.spawned = SpawnedProcesses(self.process.pid)
        try:
            _wait_for_port(port, self.process, timeout=120)
            self.settle_s = self._wait_for_superexec()
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        return [info.pid for info in self.spawned.refresh()]

    def _wait_for_superexec(self, timeout: float = 90) -> float:
        """Wait until SuperExec runs and the SuperLink's processes stop using CPU; seconds waited."""
        start = time.monotonic()
        quiet = 0
        last = _cpu_ticks(self.pids())
        while time.monotonic() - start < timeout:
            time.sleep(0.5)
            infos = self.spawned.refresh()
            now = _cpu_ticks([i.pid for i in infos])
            has_superexec = any("superexe" in i.name for i in infos)  # comm: 15 chars
            # Under 5 ticks (~0.05 s of CPU) in half a second, twice in a row.
            quiet = quiet + 1 if has_superexec and now - last < 5 else 0
            last = now
            if quiet >= 2:
                break
        return time.monotonic() - start

    def stop(self) -> list[str]:
        from tests.flwr_harness import _stop

        return _stop(self.process, self.spawned)


# ----------------------------------------------------------------- one `flwr run`
def app_config(app_dir: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the Flower app in ``app_dir`` (its defaults, as now)."""
    with (app_dir / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def quickstart_overrides() -> dict[str, Any]:
    """The main app's defaults for every key the quickstart app shares and sets differently."""
    quick = app_config(QUICKSTART_DIR)
    ours = app_config(REPO)
    return {key: ours[key] for key in quick
            if key in ours and key != "num-server-rounds" and ours[key] != quick[key]}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def flwr_command(contender: str, rounds: int, clients: int, output_dir: Path) -> list[str]:
    """The `flwr run` command line of ``contender`` (run from the repository root).

    The federation's size as the README's command sets it (``--federation-config``).
    """
    federation = ["--federation-config", f"num-supernodes={clients}"]
    if contender == "ours":
        run_config = f"num-server-rounds={rounds} output-dir='{output_dir}'"
        return ["flwr", "run", ".", "--stream", *federation, "--run-config", run_config]
    run_config = " ".join([f"num-server-rounds={rounds}"] + [
        f"{key}={_toml_value(value)}" for key, value in quickstart_overrides().items()])
    return ["flwr", "run", str(QUICKSTART_DIR.relative_to(REPO)), "--stream", *federation,
            "--run-config", run_config]


def parse_log(contender: str, lines: list[tuple[float, str]], rounds: int) -> dict[str, Any]:
    """Round marks, accuracy and reply counts from the timestamped lines of one run."""
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    problems: list[str] = []
    accuracy = float("nan")
    submitted = next((t for t, line in lines if STARTED.search(line)), float("nan"))
    if contender == "ours":
        marks: dict[int, float] = {}
        for t, line in lines:
            found = OURS_ROUND.search(line)
            if found and int(found.group(2)) == rounds:
                marks.setdefault(int(found.group(1)), t)
                replies = OURS_REPLIES.search(line)
                if replies and replies.group(1) != replies.group(2):
                    problems.append(f"round {found.group(1)}: {replies.group(0).strip(' |')}")
        for k in range(1, rounds + 1):
            if k - 1 in marks and k in marks:
                starts[k], ends[k] = marks[k - 1], marks[k]
    else:
        current, in_central = 0, False
        for t, line in lines:
            found = QS_ROUND.search(line)
            if found and int(found.group(2)) == rounds:
                current, in_central = int(found.group(1)), False
                starts.setdefault(current, t)
            elif current and "Global evaluation" in line:
                in_central = True
            elif current and in_central and "MetricRecord" in line:
                ends.setdefault(current, t)
                in_central = False
                central = QS_CENTRAL.search(line)
                if central and current == rounds:
                    accuracy = float(central.group(1))
            replies = QS_REPLIES.search(line)
            if replies and int(replies.group(3)) > 0:
                problems.append(f"round {current}: {replies.group(0)}")
            final = QS_FINAL.search(line)
            if final:
                accuracy = float(final.group(1))
    round_ids = [k for k in range(1, rounds + 1) if k in starts and k in ends]
    if len(round_ids) != rounds:
        problems.append(f"found the start and end of rounds {round_ids} of 1..{rounds} in the log")
    return {"submitted_s": submitted, "round_start_s": [starts[k] for k in round_ids],
            "round_end_s": [ends[k] for k in round_ids], "log_accuracy": accuracy,
            "problems": problems}


def ours_metrics(output_dir: Path) -> list[dict[str, Any]]:
    for path in sorted(output_dir.glob("*/metrics.json")):
        return json.loads(path.read_text())["rounds"]
    return []


def flwr_run_once(contender: str, rounds: int, clients: int, timeout: float) -> dict[str, Any]:
    """One `flwr run` against a fresh SuperLink; its wall time and where it went."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-flwr-run-{contender}-"))
    output_dir = workdir / "outputs"
    command = flwr_command(contender, rounds, clients, output_dir)
    try:
        superlink = SuperLink(workdir / "flwr-home")
    except (OSError, RuntimeError, TimeoutError) as error:
        return {"contender": contender, "command": shlex.join(command), "workdir": str(workdir),
                "ok": False, "returncode": -1, "problems": [f"the SuperLink did not start: {error}"],
                "load": common.load_text()}
    lines: list[tuple[float, str]] = []
    peak = 0.0
    timed_out = False
    try:
        argv = [str(superlink.bin / command[0]), *command[1:]]
        start = time.perf_counter()
        proc = subprocess.Popen(  # pylint: disable=consider-using-with
            argv, cwd=REPO, env=superlink.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace",
            start_new_session=True,
        )
        stop_sampling = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop_sampling.wait(1.0):
                peak = max(peak, _rss_mib(superlink.pids() + [proc.pid]))

        def kill() -> None:
            nonlocal timed_out
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append((time.perf_counter() - start, ANSI.sub("", raw.rstrip("\n"))))
        returncode = proc.wait()
        wall = time.perf_counter() - start
        watchdog.cancel()
        stop_sampling.set()
        sampler.join(timeout=5)
    finally:
        left = superlink.stop()
    (workdir / "run.log").write_text("".join(f"{t:9.3f}  {line}\n" for t, line in lines))
    parsed = parse_log(contender, lines, rounds)
    problems = list(parsed.pop("problems"))
    if timed_out:
        problems.insert(0, f"stopped after {timeout:.0f} s")
    elif returncode != 0:
        problems.insert(0, f"`flwr run` exited with {returncode}")
    if left:
        problems.append(f"processes outlived the SuperLink's stop: {left}")
    sizes = {int(m.group(1)) for _, line in lines if (m := FEDERATION.search(line))}
    if sizes != {clients}:
        problems.append(f"the simulation ran {sorted(sizes) or 'an unknown number of'} "
                        f"SuperNodes, not {clients}")
    starts, ends = parsed["round_start_s"], parsed["round_end_s"]
    round_s = [b - a for a, b in zip(starts, ends)]
    result: dict[str, Any] = {
        "contender": contender, "command": shlex.join(command), "workdir": str(workdir),
        "returncode": returncode, "wall_s": wall, "superlink_settle_s": superlink.settle_s,
        "peak_rss_mib": peak, "num_lines": len(lines), **parsed, "round_s": round_s,
        "rounds_total_s": sum(round_s),
        "setup_outside_rounds_s": wall - sum(round_s),
        "before_round1_s": starts[0] if starts else float("nan"),
        "round1_end_s": ends[0] if ends else float("nan"),
        "after_last_round_s": wall - ends[-1] if ends else float("nan"),
        "steady_round_s": round_s[1:],
        "accuracy": parsed["log_accuracy"],
    }
    if contender == "ours":
        metrics = ours_metrics(output_dir)
        trained = [r for r in metrics if r.get("round", 0) > 0]
        result["reported_round_s"] = [float(r["elapsed-s"]) for r in trained if "elapsed-s" in r]
        if trained:
            result["accuracy"] = float(trained[-1].get("central-accuracy", float("nan")))
        if len(trained) != rounds:
            problems.append(f"metrics.json has {len(trained)} of {rounds} rounds")
        for r in trained:
            if r.get("num-rejected", 0) or r.get("num-accepted", clients) != clients:
                problems.append(f"round {r['round']}: {r.get('num-accepted')} replies accepted "
                                f"of {clients}, {r.get('num-rejected')} rejected")
    if result["accuracy"] != result["accuracy"]:
        problems.append("no final central accuracy")
    result["problems"] = problems
    result["ok"] = not problems
    result["load"] = common.load_text()
    if problems:
        result["log_tail"] = "\n".join(line for _, line in lines[-60:])
    return result


# ----------------------------------------------------------------- ClientApp import and calls
def _prepare_arrays(prep_dir: Path) -> None:
    """Child: the initial model's arrays as our ServerApp sends them (named) and in order."""
    import numpy as np

    from app.config import parse_run_config
    from app.task import model_spec
    from clients.training import initial_weights
    from data.federation import load_server_split

    config = parse_run_config(app_config(REPO))
    _, test = load_server_split(config.dataset, config.data_path, config.test_fraction,
                                config.seed, config.max_classes)
    weights = initial_weights(model_spec(config, test))
    (prep_dir / "names.json").write_text(json.dumps(list(weights)))
    np.savez(prep_dir / "arrays.npz", *weights.values())


def _calls_child(contender: str, prep_dir: Path, num_partitions: int) -> None:
    """Child: import the ClientApp module, then call it: train, train, evaluate, evaluate."""
    t0 = time.perf_counter()
    import flwr.app  # noqa: F401  (loaded by every Flower runtime before the ClientApp)
    import flwr.clientapp  # noqa: F401

    t1 = time.perf_counter()
    before = set(sys.modules)
    if contender == "ours":
        import app.client_app as module
    else:
        sys.path.insert(0, str(QUICKSTART_DIR))
        import quickstart_tf.client_app as module  # type: ignore[import-not-found,no-redef]
    t2 = time.perf_counter()
    new = set(sys.modules) - before

    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    names = json.loads((prep_dir / "names.json").read_text())
    with np.load(prep_dir / "arrays.npz") as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(names))]
    defaults = app_config(REPO)
    if contender == "ours":
        from strategies.fedavg import to_arrayrecord

        run_config = defaults
        record = to_arrayrecord(dict(zip(names, arrays)))
        extra = {"run-key": "bench", "rounds-before-resume": 0}
    else:
        run_config = {**app_config(QUICKSTART_DIR), **quickstart_overrides()}
        record = ArrayRecord(arrays)
        extra = {}
    # Messages can only be built inside a task (tests/messages.py); pretend to be one.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    context = Context(run_id=7, node_id=1000, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": 0, "num-partitions": num_partitions})

    def call(kind: str, server_round: int) -> float:
        if kind == "train":
            config = {"server-round": server_round, "local-epochs": defaults["local-epochs"],
                      "batch-size": defaults["batch-size"],
                      "learning-rate": defaults["learning-rate"], **extra}
            message_type = MessageType.TRAIN
        else:
            config = {"server-round": server_round, "batch-size": defaults["batch-size"]}
            message_type = MessageType.EVALUATE
        msg = Message(content=RecordDict({"arrays": record, "config": ConfigRecord(config)}),
                      dst_node_id=1000, message_type=message_type)
        start = time.perf_counter()
        reply = module.app(msg, context)
        elapsed = time.perf_counter() - start
        if reply.has_error():
            raise RuntimeError(f"{kind} call failed: {reply.error.reason}")
        return elapsed

    timings = {"flwr_import_s": t1 - t0, "import_s": t2 - t1,
               "modules_imported": len(new),
               "heavy_modules_at_import": sorted(
                   m for m in ("tensorflow", "keras", "ray", "matplotlib", "tensorboardX",
                               "sklearn", "tensorflow_privacy", "dp_accounting", "mlflow")
                   if m in new),
               "train_1_s": call("train", 1), "train_2_s": call("train", 2),
               "evaluate_1_s": call("evaluate", 1), "evaluate_2_s": call("evaluate", 2)}
    timings["import_plus_first_train_s"] = timings["import_s"] + timings["train_1_s"]
    print("CALLS_RESULT " + json.dumps(timings), flush=True)


def calls_once(contender: str, prep_dir: Path, clients: int, timeout: float) -> dict[str, Any]:
    """One fresh interpreter: import the ClientApp, then its first and second calls."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "calls-child", contender,
             str(prep_dir), str(clients)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )
        out, returncode = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as error:
        out, returncode = f"stopped after {timeout:.0f} s\n{error.stdout or ''}", -1
    process_s = time.perf_counter() - start
    found = [line for line in out.splitlines() if line.startswith("CALLS_RESULT ")]
    if returncode != 0 or not found:
        return {"contender": contender, "ok": False, "returncode": returncode,
                "problems": [f"the child exited with {returncode}"],
                "log_tail": out[-3000:], "process_s": process_s}
    return {"contender": contender, "ok": True, "returncode": 0, "problems": [],
            "process_s": process_s, **json.loads(found[-1][len("CALLS_RESULT "):]),
            "load": common.load_text()}


# ----------------------------------------------------------------- results
def _ok(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if r.get("ok")]


def _pairs(results: dict[str, Any], section: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(ours, quickstart) runs of the same repeat, both ok."""
    runs = results[section]
    return [(o, q) for o, q in zip(runs["ours"], runs["quickstart"]) if o["ok"] and q["ok"]]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(results: dict[str, Any], args: argparse.Namespace, started: float,
           partial: bool) -> None:
    rounds, clients = results["rounds"], results["clients"]
    fmt = common.fmt_values
    rows = []
    for name in CONTENDERS:
        ok = _ok(results["runs"][name])
        rows.append([
            name, f"{len(ok)}/{len(results['runs'][name])}",
            fmt(r["wall_s"] for r in ok),
            fmt(r["setup_outside_rounds_s"] for r in ok),
            fmt(r["before_round1_s"] for r in ok),
            fmt(r["after_last_round_s"] for r in ok),
            fmt(r["submitted_s"] for r in ok),
            fmt(r["round1_end_s"] for r in ok),
            fmt(r["round_s"][0] for r in ok if r["round_s"]),
            fmt(x for r in ok for x in r["steady_round_s"]),
            fmt(r["rounds_total_s"] for r in ok),
            fmt((r["accuracy"] for r in ok), 4),
            fmt((r["peak_rss_mib"] for r in ok), 4),
        ])
    ours_ok = _ok(results["runs"]["ours"])
    reported = ""
    if any(r.get("reported_round_s") for r in ours_ok):
        reported = (
            "\n\nOurs, as its strategy times the rounds itself (`elapsed-s` in metrics.json, "
            "train to central evaluation, without the round's files): round 1 "
            + fmt(r["reported_round_s"][0] for r in ours_ok if r.get("reported_round_s"))
            + " s, rounds 2-N "
            + fmt(x for r in ours_ok for x in r.get("reported_round_s", [])[1:]) + " s.")
    pairs = _pairs(results, "runs")

    def ratio(key: str) -> common.Samples:
        return common.Samples([o[key] / q[key] for o, q in pairs if q[key]])

    ratio_rows = [
        ["wall (what the user waits for)", ratio("wall_s").fmt(digits=3)],
        ["set-up outside the rounds", ratio("setup_outside_rounds_s").fmt(digits=3)],
        ["... before round 1", ratio("before_round1_s").fmt(digits=3)],
        ["... after the last round", ratio("after_last_round_s").fmt(digits=3)],
        ["round 1", common.Samples([o["round_s"][0] / q["round_s"][0] for o, q in pairs
                                    if o["round_s"] and q["round_s"]]).fmt(digits=3)],
        ["rounds 2-N (sum)", common.Samples([sum(o["steady_round_s"]) / sum(q["steady_round_s"])
                                             for o, q in pairs if sum(q["steady_round_s"])]
                                            ).fmt(digits=3)],
        ["all rounds (sum)", ratio("rounds_total_s").fmt(digits=3)],
    ]
    wall_ratio = ratio("wall_s")
    setup_diff = common.Samples([o["setup_outside_rounds_s"] - q["setup_outside_rounds_s"]
                                 for o, q in pairs])

    def verdict(ok: bool, samples: common.Samples) -> str:
        if not samples.values:
            return "no pair ran"
        return "met" if ok else "**missed**"

    o_setup = fmt(r["setup_outside_rounds_s"] for r in ours_ok)
    q_setup = fmt(r["setup_outside_rounds_s"] for r in _ok(results["runs"]["quickstart"]))
    goals = common.table(
        ["goal (the issue)", "measured: median (min-max) over pairs", "verdict"],
        [
            ["ours wall <= 0.5 x quickstart wall, as a user runs it (`flwr run`)",
             f"{wall_ratio.fmt(digits=3)} (ours {fmt(r['wall_s'] for r in ours_ok)} s, "
             f"quickstart {fmt(r['wall_s'] for r in _ok(results['runs']['quickstart']))} s)",
             verdict(wall_ratio.median <= 0.5, wall_ratio)],
            ["ours set-up outside the rounds <= the quickstart's",
             f"ours - quickstart {setup_diff.fmt(digits=3)} s (ours {o_setup} s, quickstart "
             f"{q_setup} s)",
             verdict(setup_diff.median <= 0, setup_diff)],
        ],
    )
    call_rows = []
    for name in CONTENDERS:
        ok = _ok(results["calls"][name])
        heavy = sorted({m for r in ok for m in r.get("heavy_modules_at_import", [])})
        call_rows.append([
            name, f"{len(ok)}/{len(results['calls'][name])}",
            fmt(r["import_s"] for r in ok), fmt(r["train_1_s"] for r in ok),
            fmt(r["train_2_s"] for r in ok), fmt(r["evaluate_1_s"] for r in ok),
            fmt(r["evaluate_2_s"] for r in ok), fmt(r["import_plus_first_train_s"] for r in ok),
            fmt(r["flwr_import_s"] for r in ok), fmt(r["process_s"] for r in ok),
            ", ".join(heavy) or "none",
        ])
    call_pairs = _pairs(results, "calls")
    call_ratio_rows = [
        [label, common.Samples([o[key] / q[key] for o, q in call_pairs if q[key]]).fmt(digits=3)]
        for label, key in (("import", "import_s"), ("first train call", "train_1_s"),
                           ("second train call", "train_2_s"),
                           ("first evaluate call", "evaluate_1_s"),
                           ("import + first train call", "import_plus_first_train_s"))
    ]
    commands = {name: next((r["command"] for r in results["runs"][name]), "-")
                for name in CONTENDERS}
    body = (
        f"{clients} clients x {rounds} rounds on digits, {len(results['runs']['ours'])} pair(s) "
        "of `flwr run`, alternating (ABBA...), each against a fresh simulation SuperLink "
        "(subprocess isolation, no dependency installation, Flower's default 2 CPUs per client) "
        "started and settled before the clock starts. Seconds, median (min-max).\n\n"
        f"- ours: `{commands['ours']}`\n- quickstart: `{commands['quickstart']}`\n\n"
        "`wall`: the `flwr run` command from start to exit, what a user with a running "
        "SuperLink waits for. Rounds are delimited by the ServerApps' own log lines as they "
        "arrive through the stream (ours: `[round k-1/N]` to `[round k/N]`; quickstart: Flower's "
        "`[ROUND k/N]` to round k's central-evaluation `MetricRecord` line; both span train, "
        "federated and central evaluation; see the script's docstring); arrival lags logging by "
        "up to ~1 s. `set-up outside the rounds` = wall - sum of rounds = `before round 1` + "
        "`after last round`. `run started`: `flwr run` printed `Successfully started run` "
        "(CLI start, FAB build and upload). Peak memory: every process of the SuperLink's tree "
        "and the `flwr` CLI, sampled each second.\n\n"
        + common.table(["contender", "runs ok", "wall s", "set-up outside rounds s",
                        "before round 1 s", "after last round s", "run started s",
                        "end of round 1 s", "round 1 s", "rounds 2-N s", "all rounds s",
                        "central accuracy", "peak MiB"], rows)
        + reported
        + "\n\n## Ours / quickstart, per pair\n\n"
        + common.table(["figure", "ours / quickstart: median (min-max)"], ratio_rows)
        + "\n\n## Goals\n\n" + goals
        + f"\n\nThe issue's figures (same command, 10 clients x 5 rounds): ours "
          f"{ISSUE['ours_wall_s']} s vs quickstart {ISSUE['quickstart_wall_s']} s (0.63x); set-up "
          f"outside the rounds ~{ISSUE['ours_setup_s']:.0f} s vs ~{ISSUE['quickstart_setup_s']:.0f} s."
        + "\n\n## ClientApp: import and first calls, fresh interpreters\n\n"
        f"{len(results['calls']['ours'])} fresh process(es) per app, alternating. `import`: the "
        "ClientApp module (`app.client_app`; `quickstart_tf.client_app`) after `flwr.app` and "
        "`flwr.clientapp` (`flwr import`, loaded by every Flower runtime first). Then the "
        "module's ClientApp is called on real messages: train on digits partition 0 of "
        f"{clients} with the seeded initial model (first call, then a second one: steady), then "
        "evaluate twice. `process`: the whole child, interpreter start to exit. The last column "
        "lists the heavy packages the module's import loads.\n\n"
        + common.table(["ClientApp", "runs ok", "import s", "train call 1 s", "train call 2 s",
                        "evaluate call 1 s", "evaluate call 2 s", "import + train call 1 s",
                        "flwr import s", "process s", "heavy imports"], call_rows)
        + "\n\nOurs / quickstart, per pair:\n\n"
        + common.table(["figure", "ours / quickstart: median (min-max)"], call_ratio_rows)
        + "\n"
    )
    failed = [[section, r["contender"], i + 1, "; ".join(r["problems"])]
              for section in ("runs", "calls") for name in CONTENDERS
              for i, r in enumerate(results[section][name]) if not r["ok"]]
    text = ("**Partial: the run is still going.**\n\n" if partial else "") + body
    if failed:
        text += ("\n## Failed runs (left out of every figure above)\n\n"
                 + common.table(["part", "contender", "run", "why"], failed) + "\n")
    common.write_results(NAME, "Main job as a user runs it (`flwr run`): ours vs Flower's "
                         "quickstart pattern", text, started=started,
                         extra_header=f"- Load at start: {args.load_at_start}\n")
    common.write_json(NAME, results)


def describe(r: dict[str, Any]) -> str:
    if not r["ok"]:
        return "FAILED: " + "; ".join(r["problems"])
    if "wall_s" in r:
        return (f"wall {r['wall_s']:.1f} s, set-up outside rounds {r['setup_outside_rounds_s']:.1f}"
                f" s (before round 1 {r['before_round1_s']:.1f} s, after last round "
                f"{r['after_last_round_s']:.1f} s), rounds {[round(x, 1) for x in r['round_s']]}, "
                f"accuracy {r['accuracy']:.4f}")
    return (f"import {r['import_s']:.2f} s, train call 1 {r['train_1_s']:.2f} s, 2 "
            f"{r['train_2_s']:.2f} s, evaluate 1 {r['evaluate_1_s']:.2f} s, 2 "
            f"{r['evaluate_2_s']:.2f} s; heavy imports {r['heavy_modules_at_import']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="pairs of `flwr run`, ABBA...")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--call-repeats", type=int, default=5,
                        help="fresh interpreters per ClientApp for import and first-call times")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run is stopped")
    parser.add_argument("--skip-calls", action="store_true", help="only the `flwr run` pairs")
    parser.add_argument("--calls-only", action="store_true",
                        help="only the ClientApp import and first-call measurement")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 2 clients x 2 rounds, 1 pair, 1 call child each, "
                             "results to /tmp/bench-smoke unless --out")
    parser.add_argument("--render-only", action="store_true",
                        help="re-render the tables from the JSON of an earlier run")
    common.add_out_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.rounds, args.repeats, args.call_repeats = 2, 2, 1, 1
        args.timeout = min(args.timeout, 900)
        if args.out is None:
            args.out = Path("/tmp/bench-smoke")
    common.apply_out_option(args)
    if args.render_only:
        args.load_at_start = "(re-rendered from the JSON)"
        render(common.load_json(NAME), args, time.time(), partial=False)
        return
    if args.repeats < 1 or (args.repeats < 2 and args.out is None and not args.calls_only):
        sys.exit("--repeats must be at least 2 (never a single timing); "
                 "1 only with --out or --quick, for a smoke check")
    args.load_at_start = common.load_text()
    started = time.time()
    results: dict[str, Any] = {
        "rounds": args.rounds, "clients": args.clients,
        "quickstart_overrides": quickstart_overrides(),
        "runs": {name: [] for name in CONTENDERS}, "calls": {name: [] for name in CONTENDERS},
    }
    if results["quickstart_overrides"]:
        print(f"the quickstart app's defaults differ from ours; passing "
              f"{results['quickstart_overrides']}", flush=True)

    def alternate(section: str, repeats: int, run: Any) -> None:
        for rep in range(repeats):
            for name in (CONTENDERS if rep % 2 == 0 else CONTENDERS[::-1]):
                label = "flwr run" if section == "runs" else "ClientApp calls"
                print(f"{label} {rep + 1}/{repeats}: {name} ...", flush=True)
                result = run(name)
                results[section][name].append(result)
                print("  " + describe(result), flush=True)
                if not result["ok"] and result.get("log_tail"):
                    print(result["log_tail"][-3000:], flush=True)
                render(results, args, started, partial=True)

    if not args.calls_only:
        alternate("runs", args.repeats,
                  lambda name: flwr_run_once(name, args.rounds, args.clients, args.timeout))
    if not args.skip_calls and args.call_repeats > 0:
        prep_dir = Path(tempfile.mkdtemp(prefix="bench-calls-"))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "prepare-arrays",
                        str(prep_dir)], cwd=REPO, env=env, check=True, timeout=600)
        alternate("calls", args.call_repeats,
                  lambda name: calls_once(name, prep_dir, args.clients, args.timeout))
    render(results, args, started, partial=False)
    print((common.results_dir() / f"{NAME}.md").read_text())
    failed = sum(not r["ok"] for section in ("runs", "calls") for name in CONTENDERS
                 for r in results[section][name])
    if failed:
        sys.exit(f"[bench] {failed} run(s) failed; see 'Failed runs' in "
                 f"{common.results_dir() / (NAME + '.md')}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "calls-child":
        _calls_child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "prepare-arrays":
        _prepare_arrays(Path(sys.argv[2]))
    else:
        main()
