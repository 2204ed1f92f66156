"""Shared pieces of the benchmark scripts: machine facts, timing, tables, result files.

Every script prints a Markdown table and writes it to ``bench/results/<name>.md``
with the command that produced it, the machine, the date and the load average,
and every figure as a median over repeats with its min-max (never one timing).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MNIST_PATH = REPO.parent / "shared" / "datasets" / "mnist" / "mnist.npz"


# ----------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
            text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
            check=True,
        ).stdout.strip()
        return out + (" (working tree modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> str:
    """Python, numpy, flwr (and TF when already imported) versions."""
    import numpy as np

    parts = [f"Python {platform.python_version()}", f"numpy {np.__version__}"]
    try:
        import flwr

        parts.append(f"flwr {flwr.__version__}")
    except ImportError:  # pragma: no cover
        pass
    if "tensorflow" in sys.modules:
        parts.append(f"tensorflow {sys.modules['tensorflow'].__version__}")
    return ", ".join(parts)


def load_text() -> str:
    """The 1/5/15-minute load averages and the core count, for the results file."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def machine() -> str:
    """One line describing where the figures were measured."""
    return (
        f"{_cpu_model()}, {os.cpu_count()} cores, {_mem_total_gib():.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}; {versions()}; git {_git_commit()}"
    )


# ----------------------------------------------------------------- timing
@dataclass
class Samples:
    """Repeated measurements of one quantity."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(float(value))

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def min(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def max(self) -> float:
        return max(self.values) if self.values else float("nan")

    def fmt(self, scale: float = 1.0, digits: int = 3) -> str:
        """``median (min-max)`` scaled, e.g. ``scale=1e3`` for milliseconds."""
        if not self.values:
            return "-"
        return (
            f"{_num(self.median * scale, digits)} "
            f"({_num(self.min * scale, digits)}-{_num(self.max * scale, digits)})"
        )


def _num(value: float, digits: int) -> str:
    if value != value:  # nan
        return "nan"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def ratio_samples(numerators: Sequence[float], denominators: Sequence[float]) -> Samples:
    """Per-repeat ratios of two interleaved series (same repeat, same load)."""
    return Samples([a / b for a, b in zip(numerators, denominators, strict=True)])


def interleaved(
    contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, Samples]:
    """Time each contender ``repeats`` times, alternating them (ABAB...), after warm-up.

    The contenders run in a rotating order each repeat, so a load spike from
    the machine's other jobs hits all of them alike.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    samples = {name: Samples() for name in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            contenders[name]()
            samples[name].add(time.perf_counter() - start)
    return samples


# ----------------------------------------------------------------- tables
def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def command_line() -> str:
    """How this script was invoked, as a copy-pasteable command."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = str(script)
    return "uv run python " + " ".join([script_text, *sys.argv[1:]])


_results_dir = RESULTS


def results_dir() -> Path:
    """Where result files go: ``bench/results`` unless ``--out`` named another folder."""
    return _results_dir


def add_out_option(parser: argparse.ArgumentParser) -> None:
    """``--out DIR``: write the result files there instead of ``bench/results``.

    For smoke checks and trial runs, so that they never overwrite the
    committed measurements.
    """
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the result files (default: bench/results); use it for "
                             "smoke checks so that the committed results stay")


def apply_out_option(args: argparse.Namespace) -> Path:
    """Point :func:`results_dir` at ``args.out`` when given; return the folder."""
    global _results_dir
    if getattr(args, "out", None) is not None:
        _results_dir = Path(args.out).resolve()
    return _results_dir


def load_json(name: str) -> Any:
    """The raw figures of an earlier run (``<results>/<name>.json``), for ``--render-only``."""
    return json.loads((results_dir() / f"{name}.json").read_text())


def provenance(*, started: float | None = None, command: str | None = None) -> str:
    """The lines every result starts with: command, machine, date, load (and run time)."""
    elapsed = "" if started is None else f"- Script wall time so far: {time.time() - started:.0f} s\n"
    return (
        f"- Command: `{command or command_line()}`\n"
        f"- Machine: {machine()}\n"
        f"- Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
        f"- Load average at write: {load_text()}\n"
        f"{elapsed}"
    )


def write_results(name: str, title: str, body: str, *, started: float | None = None,
                  extra_header: str = "", command: str | None = None) -> Path:
    """Write ``<results>/<name>.md``: command, machine, date, load, then ``body``."""
    results = results_dir()
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.md"
    text = (
        f"# {title}\n\n"
        + provenance(started=started, command=command)
        + f"{extra_header}\n{body.rstrip()}\n"
    )
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def append_results(path: Path | None, title: str, body: str, *,
                   started: float | None = None) -> str:
    """Print ``body`` under a provenance header and append it to ``path`` (when given).

    For the scripts whose results file is a hand-written note that collects
    runs: each run adds a section and keeps the earlier ones.
    """
    text = f"## {title}\n\n" + provenance(started=started) + f"\n{body.rstrip()}\n"
    print(text, flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write("\n" + text)
    return text


def write_json(name: str, data: Any) -> Path:
    """Raw figures next to the Markdown, for whoever wants to re-plot."""
    results = results_dir()
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------- run config
def default_run_config() -> dict[str, Any]:
    """The app's shipped run config (``[tool.flwr.app.config]`` of pyproject.toml)."""
    with (REPO / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def run_config(**overrides: Any) -> dict[str, Any]:
    """Shipped defaults with ``overrides`` (keys with ``_`` become ``-``)."""
    config = default_run_config()
    for key, value in overrides.items():
        key = key.replace("_", "-")
        if key not in config:
            raise KeyError(f"unknown run-config key {key!r}")
        config[key] = value
    return config


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux ru_maxrss is KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mib() -> float:
    """Largest peak RSS among waited-for child processes."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# ----------------------------------------------------------------- in-process federation
def set_task_identity(run_id: int = 1, node_id: int = 1, task_id: int = 1) -> None:
    """Flower Messages can only be built inside a task; pretend to be one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


def node_contexts(num_nodes: int, config: dict[str, Any], run_id: int = 7) -> dict[int, Any]:
    """One Context per node with Flower's simulation node config (partition-id, num-partitions)."""
    from flwr.app import Context, RecordDict

    return {
        1000 + p: Context(
            run_id=run_id, node_id=1000 + p,
            node_config={"partition-id": p, "num-partitions": num_nodes},
            state=RecordDict(), run_config=config,
        )
        for p in range(num_nodes)
    }


class InProcessGrid:
    """Just enough of Flower's Grid to drive a strategy against in-process ClientApp calls.

    No Ray, no SuperLink: every message goes straight to the real ClientApp
    with that node's own Context (kept across rounds, as a SuperNode keeps it).
    ``call_s`` collects the duration of every ClientApp call by message type,
    ``errors`` every call that raised or answered an Error (see :meth:`check`).
    """

    def __init__(self, client_app: Any, contexts: dict[int, Any]) -> None:
        self.client_app = client_app
        self.contexts = contexts
        self.call_s: dict[str, list[float]] = {}
        self.errors: list[str] = []

    def check(self) -> None:
        """Raise if any client call failed since the last check: its figures would mean nothing."""
        errors, self.errors = self.errors, []
        if errors:
            raise RuntimeError(f"{len(errors)} client calls failed, e.g. {errors[0]}")

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Any], timeout: float | None = None) -> list[Any]:
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode

        replies = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            start = time.perf_counter()
            try:
                reply = self.client_app(message, context)
            except Exception as error:  # pylint: disable=broad-exception-caught
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(error)),
                    reply_to=message,
                )
            if reply.has_error():
                self.errors.append(f"node {message.metadata.dst_node_id}: {reply.error.reason}")
            self.call_s.setdefault(message.metadata.message_type, []).append(
                time.perf_counter() - start
            )
            replies.append(reply)
        return replies


# ----------------------------------------------------------------- simulation runs
# The ServerApps and ClientApps below are module attributes of ``bench.common``
# so that Ray's actors import them by name (the child process puts the repo
# root on PYTHONPATH). Flower's run_simulation passes an empty run config;
# these wrappers give every app the bench's run config from the environment.
ENV_RUN_CONFIG = "FEDPRIVACY_BENCH_RUN_CONFIG"
ENV_TIMING = "FEDPRIVACY_BENCH_TIMING"
#: Which ClientApp the run uses, so that the ServerApp sends arrays it accepts.
ENV_CLIENT = "FEDPRIVACY_BENCH_CLIENT"
#: What Flower's simulation gives each client unless told otherwise (2 CPUs).
BACKEND_CONFIG = {"client_resources": {"num_cpus": 2, "num_gpus": 0.0}}


def _bench_run_config() -> dict[str, Any]:
    """The bench's run config on top of the app's defaults as they are now.

    The app's config keys can change while a long benchmark runs (other
    developers edit ``pyproject.toml`` and ``app/config.py``); each run takes
    the current defaults and the bench's values for the keys that still exist.
    """
    config = default_run_config()
    wanted = json.loads(os.environ[ENV_RUN_CONFIG])
    config.update({key: value for key, value in wanted.items() if key in config})
    return config


def _record(kind: str, **fields: Any) -> None:
    """Append one timing event (JSON line) to the file the parent named."""
    path = os.environ.get(ENV_TIMING)
    if not path:
        return
    line = json.dumps({"kind": kind, "t": time.time(), "pid": os.getpid(), **fields})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


#: Seconds of every local training call (``train_proximal``, the ClientApp's
#: compiled SGD epochs; ``model.fit`` before) of this process, in order.
FIT_S: list[float] = []


def time_model_fit() -> list[float]:
    """Time the local training inside our ClientApp; return the list it fills.

    Patches ``app.client_app.train_proximal`` once per process; every call
    appends its duration to :data:`FIT_S` (clear it before the calls you time).
    The figures keep the name ``fit`` (the clients' own training time).
    """
    import app.client_app as client_module

    if not getattr(client_module.train_proximal, "_bench_timed", False):
        original = client_module.train_proximal

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                FIT_S.append(time.perf_counter() - start)

        timed._bench_timed = True  # type: ignore[attr-defined]
        client_module.train_proximal = timed
    return FIT_S


def _with_config(context: Any) -> Any:
    """The same Context (same state object) with the bench's run config.

    Flower forbids changing ``context.run_config`` in place, so the app gets
    a copy that shares everything else.
    """
    from flwr.app import Context

    return Context(run_id=context.run_id, node_id=context.node_id,
                   node_config=context.node_config, state=context.state,
                   run_config=_bench_run_config())


def _server_round(msg: Any) -> int:
    try:
        return int(msg.content["config"]["server-round"])
    except (KeyError, TypeError):
        return -1


from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

#: A client function of the bench: ``(msg, context) -> (reply, extra timing fields)``.
BenchCall = Callable[[Message, Any], tuple[Message, dict[str, float]]]


def _reported(kind: str, call: BenchCall) -> Callable[[Message, Any], Message]:
    """Wrap a client function: record its duration, or its failure, as a timing event.

    A call that raises or answers with an Error is recorded as ``<kind>-error``
    with the reason, so that :func:`check_run` can fail the run: a contender
    whose clients reject every message must never be reported as a result.
    """

    def handler(msg: Message, context: Any) -> Message:
        where = {"round": _server_round(msg), "node": context.node_id}
        start = time.perf_counter()
        try:
            reply, extra = call(msg, context)
        except Exception as error:
            _record(f"{kind}-error", **where, reason=repr(error)[:500])
            raise
        if reply.has_error():
            _record(f"{kind}-error", **where, reason=str(reply.error.reason)[:500])
        else:
            _record(kind, **where, call_s=time.perf_counter() - start, **extra)
        return reply

    return handler


def _ours_train(msg: Message, context: Any) -> tuple[Message, dict[str, float]]:
    import app.client_app as client_module

    fit_s = time_model_fit()
    fit_s.clear()
    reply = client_module.train(msg, _with_config(context))
    return reply, {"fit_s": sum(fit_s)}


def _ours_evaluate(msg: Message, context: Any) -> tuple[Message, dict[str, float]]:
    import app.client_app as client_module

    return client_module.evaluate(msg, _with_config(context)), {}


ours_client = ClientApp()
ours_client.train()(_reported("train", _ours_train))
ours_client.evaluate()(_reported("evaluate", _ours_evaluate))


# Flower's quickstart-tensorflow pattern: every call clears the Keras
# session, reloads the partition, rebuilds and recompiles the model. Its
# arrays travel as Flower's quickstart sends them: a list (keys "0", "1", ...).
def _quickstart_setup(msg: Message, context: Any) -> tuple[Any, Any, Any]:
    import keras

    from app.config import parse_run_config
    from app.task import federation_spec, model_spec
    from clients.models import build_model
    from data.federation import load_client_data

    keras.backend.clear_session()
    config = parse_run_config(_bench_run_config())
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    train, val = load_client_data(federation_spec(config, num_partitions), partition_id)
    spec = model_spec(config, train)
    model = build_model(spec.kind, spec.input_shape, spec.num_classes, seed=spec.seed)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=config.learning_rate),
        loss="sparse_categorical_crossentropy", metrics=["accuracy"],
    )
    model.set_weights(msg.content["arrays"].to_numpy_ndarrays())
    return model, train, val


def _quickstart_train(msg: Message, context: Any) -> tuple[Message, dict[str, float]]:
    model, train, _ = _quickstart_setup(msg, context)
    config = msg.content["config"]
    fit_start = time.perf_counter()
    history = model.fit(train.x, train.y, epochs=int(config["local-epochs"]),
                        batch_size=int(config["batch-size"]), shuffle=True, verbose=0)
    fit_s = time.perf_counter() - fit_start
    content = RecordDict({
        "arrays": ArrayRecord(model.get_weights()),
        "metrics": MetricRecord({"train-loss": float(history.history["loss"][-1]),
                                 "num-examples": len(train)}),
    })
    return Message(content=content, reply_to=msg), {"fit_s": fit_s}


def _quickstart_evaluate(msg: Message, context: Any) -> tuple[Message, dict[str, float]]:
    model, _, val = _quickstart_setup(msg, context)
    loss, accuracy = model.evaluate(val.x, val.y, verbose=0)
    return Message(content=RecordDict({"metrics": MetricRecord(
        {"eval-loss": float(loss), "eval-accuracy": float(accuracy), "num-examples": len(val)}
    )}), reply_to=msg), {}


quickstart_client = ClientApp()
quickstart_client.train()(_reported("train", _quickstart_train))
quickstart_client.evaluate()(_reported("evaluate", _quickstart_evaluate))

ours_server = ServerApp()


@ours_server.main()
def _ours_main(grid: Any, context: Any) -> None:
    from app.server_app import main

    _record("server-start")
    main(grid, _with_config(context))
    _record("server-end")


def _array_codec(client: str, model: Any) -> tuple[Callable[[], ArrayRecord],
                                                   Callable[[ArrayRecord], None]]:
    """How the ServerApp must encode and load a model's arrays for ``client``'s ClientApp.

    Our ClientApp keys arrays by Keras variable path (``to_arrayrecord`` of
    ``clients.weights.get_weights``) and refuses anything else; the quickstart
    ClientApp sends and expects a plain list, as Flower's quickstart does.
    """
    if client == "quickstart":
        return (lambda: ArrayRecord(model.get_weights()),
                lambda arrays: model.set_weights(arrays.to_numpy_ndarrays()))
    from clients.weights import get_weights, set_weights
    from strategies.fedavg import to_arrayrecord, to_numpy

    return (lambda: to_arrayrecord(get_weights(model)),
            lambda arrays: set_weights(model, to_numpy(arrays)))


# Flower's built-in FedAvg with the same settings, central evaluation on
# the same server test set every round (as our ServerApp does).
flower_server = ServerApp()


@flower_server.main()
def _flower_main(grid: Any, context: Any) -> None:
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

    from app.config import parse_run_config
    from app.task import model_spec
    from clients.training import evaluate, get_model
    from data.federation import load_server_split

    _record("server-start")
    config = parse_run_config(_bench_run_config())
    _, test = load_server_split(config.dataset, config.data_path, config.test_fraction,
                                config.seed)
    model = get_model(model_spec(config, test))
    encode, load = _array_codec(os.environ.get(ENV_CLIENT, "ours"), model)

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load(arrays)
        loss, accuracy = evaluate(model, test)
        _record("central", round=server_round, accuracy=accuracy, loss=loss)
        return MetricRecord({"central-loss": loss, "central-accuracy": accuracy})

    class TimedFedAvg(FlowerFedAvg):
        def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
            _record("round-start", round=server_round)
            return super().configure_train(server_round, arrays, config, grid)

    strategy = TimedFedAvg(
        fraction_train=config.fraction_train, fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=max(config.min_evaluate_nodes, 1),
        min_available_nodes=config.min_train_nodes,
    )
    strategy.start(
        grid=grid, initial_arrays=encode(), num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord({"local-epochs": config.local_epochs,
                                   "batch-size": config.batch_size,
                                   "learning-rate": config.learning_rate}),
        evaluate_config=ConfigRecord({"batch-size": config.batch_size}),
        evaluate_fn=central,
    )
    _record("server-end")


APPS = {"ours-client": ours_client, "quickstart-client": quickstart_client,
        "ours-server": ours_server, "flower-server": flower_server}


def check_run(events: list[dict[str, Any]], num_rounds: int) -> list[str]:
    """What makes a simulation's figures meaningless; empty when it trained as asked.

    A run fails when any client call failed (raised or answered an Error),
    when a round 1..``num_rounds`` has no train call that ran ``model.fit``,
    or when the ServerApp did not finish.
    """
    problems = []
    for kind in ("train", "evaluate"):
        errors = [e for e in events if e["kind"] == f"{kind}-error"]
        if errors:
            reasons = sorted({e["reason"] for e in errors})
            problems.append(f"{len(errors)} {kind} calls failed, e.g. {reasons[0]}"
                            + (f" (and {len(reasons) - 1} other reasons)" if len(reasons) > 1
                               else ""))
    trained = {e["round"] for e in events if e["kind"] == "train" and e.get("fit_s", 0) > 0}
    idle = [r for r in range(1, num_rounds + 1) if r not in trained]
    if idle:
        problems.append(f"no client trained (model.fit) in rounds {idle}")
    if not any(e["kind"] == "server-end" for e in events):
        problems.append("the ServerApp did not finish")
    return problems


def _tree_rss_mib(session: int) -> float:
    """Resident memory of every process in session ``session`` (the child and all it spawned)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) != session:  # field 6 of stat: session id
                continue
            total += int(Path(f"/proc/{entry}/statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    return total / 2**20


@dataclass
class SimulationRun:
    """One simulation in a child process: its wall time, memory and timing events."""

    wall_s: float
    sim_s: float
    peak_rss_mib: float
    events: list[dict[str, Any]]
    output_dir: Path
    returncode: int
    log_tail: str
    failed_attempts: list[str] = field(default_factory=list)
    #: Why the run's figures mean nothing (see :func:`check_run`); empty when it trained.
    problems: list[str] = field(default_factory=list)
    #: The simulation ran to its end but did not train: a repeat would fail the same way.
    untrained: bool = False

    def rounds_from_metrics(self) -> list[dict[str, Any]]:
        """The ``metrics.json`` rounds our ServerApp wrote (empty for Flower's ServerApp)."""
        for path in sorted(self.output_dir.glob("*/metrics.json")):
            return json.loads(path.read_text())["rounds"]
        return []


def simulate(server: str, client: str, config: dict[str, Any], num_supernodes: int,
             timeout: float = 3600, retries: int = 1) -> SimulationRun:
    """:func:`simulate_once`, run again (up to ``retries`` times) if it failed.

    On a busy machine Ray sometimes fails to start its node ("timed out during
    startup"); that says nothing about the app, so such a run is repeated.
    A run that finished but did not train (:func:`check_run`) is not: that is
    the app's or the bench's fault and would fail again.
    Failed attempts are kept in the returned run's ``failed_attempts``.
    """
    failed: list[str] = []
    for _ in range(retries + 1):
        run = simulate_once(server, client, config, num_supernodes, timeout)
        if run.returncode == 0 or run.untrained:
            break
        failed.append(run.log_tail[-500:])
    run.failed_attempts = failed
    return run


def simulate_once(server: str, client: str, config: dict[str, Any], num_supernodes: int,
                  timeout: float = 3600, workdir: Path | None = None) -> SimulationRun:
    """Run ``flwr.simulation.run_simulation`` in a fresh child process and measure it.

    ``server``: ``ours`` (the app's ServerApp) or ``flower`` (Flower's FedAvg);
    ``client``: ``ours`` (the app's ClientApp) or ``quickstart`` (rebuild per call).
    Peak memory is the largest sum of RSS over the child's whole process
    session (driver, Ray's raylet/GCS and every actor), sampled twice a second.
    """
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="fedprivacy-bench-")) if workdir is None else workdir
    output_dir = workdir / "outputs"
    config = dict(config, **{"output-dir": str(output_dir)})
    timing = workdir / "timing.jsonl"
    result_file = workdir / "child.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env[ENV_RUN_CONFIG] = json.dumps(config)
    env[ENV_TIMING] = str(timing)
    env[ENV_CLIENT] = client
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    log_path = workdir / "child.log"
    start = time.perf_counter()
    peak = 0.0
    failure = ""
    with log_path.open("wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.common", "child", server, client,
             str(num_supernodes), str(result_file)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            checked = 0
            while child.poll() is None:
                peak = max(peak, _tree_rss_mib(child.pid))
                if time.perf_counter() - start > timeout:
                    failure = f"ran over {timeout} s"
                    break
                checked += 1
                if checked % 20 == 0 and b"Simulation Runtime crashed" in log_path.read_bytes():
                    # Ray failed (e.g. its node timed out starting on a busy machine): the
                    # ServerApp thread would wait out every round's timeout for nothing.
                    failure = "the simulation engine crashed"
                    break
                time.sleep(0.5)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, 9)
                child.wait()
            # Ray daemons of this child's session that outlived it.
            try:
                os.killpg(child.pid, 9)
            except ProcessLookupError:
                pass
    wall = time.perf_counter() - start
    events = []
    if timing.exists():
        events = [json.loads(line) for line in timing.read_text().splitlines() if line.strip()]
    sim_s, child_problems = float("nan"), None
    if result_file.exists():
        result = json.loads(result_file.read_text())
        sim_s, child_problems = result["sim_s"], result.get("problems")
    tail = log_path.read_text(errors="replace")[-3000:]
    returncode = child.returncode if not failure else -1
    if failure:
        tail = f"[bench] stopped: {failure}\n" + tail
        problems = [f"stopped: {failure}"]
    elif child_problems is not None:  # the simulation ran to its end; the child checked it
        problems = child_problems
    else:  # the child died before it could check
        problems = (check_run(events, int(config["num-server-rounds"]))
                    or [f"the child process exited with {child.returncode}"])
    if problems and returncode == 0:
        returncode = 3
    return SimulationRun(wall, sim_s, peak, events, output_dir, returncode, tail,
                         problems=problems, untrained=bool(child_problems))


def _child_main(argv: list[str]) -> None:
    server, client, num_supernodes, result_file = argv
    import logging

    from flwr.simulation import run_simulation

    import bench.common as bench_common  # by module name, so Ray pickles by reference

    logging.getLogger("flwr").setLevel(logging.INFO)
    os.environ[ENV_CLIENT] = client
    start = time.perf_counter()
    run_simulation(
        server_app=bench_common.APPS[f"{server}-server"],
        client_app=bench_common.APPS[f"{client}-client"],
        num_supernodes=int(num_supernodes),
        backend_config=BACKEND_CONFIG,
    )
    sim_s = time.perf_counter() - start
    timing = Path(os.environ[ENV_TIMING])
    events = ([json.loads(line) for line in timing.read_text().splitlines() if line.strip()]
              if timing.exists() else [])
    problems = check_run(events, int(_bench_run_config()["num-server-rounds"]))
    Path(result_file).write_text(json.dumps({"sim_s": sim_s, "problems": problems}))
    if problems:
        # Loudly: Flower's engine turns every failed client call into an Error
        # reply and carries on, so without this a broken contender "finishes".
        print("[bench] this run did not train as asked:\n  " + "\n  ".join(problems),
              file=sys.stderr, flush=True)
        sys.exit(3)



def summarize(run: SimulationRun) -> dict[str, Any]:
    """Round wall time, where it went, and the final central accuracy of one simulation.

    Round 1 includes the engine's warm-up: Ray starts the actor process, which
    imports TensorFlow and builds its first model before the first client call
    (a minute or two on a busy 2-core machine), whatever the strategy. The
    ``steady_*`` figures therefore use rounds 2..N only; ``warmup_s`` is how
    much longer round 1 took than the median steady round.
    """
    train = [e for e in run.events if e["kind"] == "train"]
    evaluate = [e for e in run.events if e["kind"] == "evaluate"]
    end = [e["t"] for e in run.events if e["kind"] == "server-end"]
    metrics_rounds = run.rounds_from_metrics()
    if metrics_rounds:  # our ServerApp: metrics.json
        trained = [r for r in metrics_rounds if r["round"] > 0]
        round_ids = [r["round"] for r in trained]
        round_s = [r["elapsed-s"] for r in trained]
        accuracy = trained[-1].get("central-accuracy", float("nan")) if trained else float("nan")
    else:  # Flower's ServerApp: round-start events, central events
        starts = sorted((e["round"], e["t"]) for e in run.events if e["kind"] == "round-start")
        bounds = [t for _, t in starts] + end[:1]
        round_ids = [r for r, _ in starts][: max(len(bounds) - 1, 0)]
        round_s = [b - a for a, b in zip(bounds, bounds[1:])]
        central = [e for e in run.events if e["kind"] == "central"]
        accuracy = central[-1]["accuracy"] if central else float("nan")

    def per_round(events: list[dict[str, Any]], field: str) -> list[float]:
        return [sum(e[field] for e in events if e["round"] == r) for r in round_ids]

    fit_r, train_r, eval_r = per_round(train, "fit_s"), per_round(train, "call_s"), per_round(evaluate, "call_s")
    total = sum(round_s)
    steady = slice(1, None) if len(round_s) > 1 else slice(0, None)
    st_total = sum(round_s[steady])
    st_fit, st_train, st_eval = sum(fit_r[steady]), sum(train_r[steady]), sum(eval_r[steady])
    steady_median = statistics.median(round_s[steady]) if round_s else float("nan")

    def share(part: float, whole: float) -> float:
        return part / whole if whole else float("nan")

    first_round = [e for e in train if round_ids and e["round"] == round_ids[0]]
    steady_calls = [e for e in train if e["round"] in round_ids[steady]]
    return {
        "wall_s": run.wall_s, "sim_s": run.sim_s, "peak_rss_mib": run.peak_rss_mib,
        "returncode": run.returncode, "rounds": len(round_s), "round_ids": round_ids,
        "round_s": round_s, "rounds_total_s": total, "accuracy": accuracy,
        "num_train_calls": len(train),
        "fit_s": sum(fit_r), "train_call_s": sum(train_r), "evaluate_call_s": sum(eval_r),
        "per_round_fit_s": fit_r, "per_round_train_call_s": train_r,
        "per_round_evaluate_call_s": eval_r,
        "call_over_fit": [e["call_s"] / e["fit_s"] for e in train if e.get("fit_s")],
        "steady_call_over_fit": [e["call_s"] / e["fit_s"] for e in steady_calls if e.get("fit_s")],
        "first_call_over_fit": [e["call_s"] / e["fit_s"] for e in first_round if e.get("fit_s")],
        "fit_share": share(sum(fit_r), total),
        "client_share": share(sum(train_r) + sum(eval_r), total),
        "outside_fit_share": 1 - share(sum(fit_r), total),
        "outside_client_calls_share": 1 - share(sum(train_r) + sum(eval_r), total),
        "steady_round_s": round_s[steady], "steady_rounds_total_s": st_total,
        "steady_fit_share": share(st_fit, st_total),
        "steady_outside_fit_share": 1 - share(st_fit, st_total),
        "steady_evaluate_share": share(st_eval, st_total),
        "steady_other_train_call_share": share(st_train - st_fit, st_total),
        "steady_outside_client_calls_share": 1 - share(st_train + st_eval, st_total),
        "steady_outside_client_calls_s_per_round": (
            (st_total - st_train - st_eval) / max(len(round_s[steady]), 1)
        ),
        "warmup_s": (round_s[0] - steady_median) if round_s else float("nan"),
        "workdir": str(run.output_dir.parent),
        "failed_attempts": len(run.failed_attempts),
        "problems": run.problems,
        "events": run.events,
        "metrics_rounds": metrics_rounds,
    }


# ----------------------------------------------------------------- simulation benchmarks
# round_overhead, main_job, scale and dp_cost share this frame: a parser,
# contenders run alternating (ABBA...) each in a fresh child, a Markdown
# table re-rendered after every run, and a failed run never counted.
def simulation_parser(doc: str, *, repeats: int = 2, rounds: int = 5, clients: int | None = 10,
                      timeout: float = 1800) -> argparse.ArgumentParser:
    """The options every simulation benchmark takes (``clients=None``: the script adds its own)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="runs per contender, alternating (at least 2; 1 only with --out)")
    parser.add_argument("--rounds", type=int, default=rounds)
    if clients is not None:
        parser.add_argument("--clients", type=int, default=clients)
    parser.add_argument("--timeout", type=float, default=timeout,
                        help="seconds before one run is stopped")
    parser.add_argument("--render-only", action="store_true",
                        help="re-render the table from the JSON of an earlier run")
    add_out_option(parser)
    return parser


def prepare(args: argparse.Namespace, name: str, render: Callable[..., None]) -> bool:
    """Apply ``--out`` and ``--render-only`` and check ``--repeats``; True: nothing left to run."""
    apply_out_option(args)
    if args.render_only:
        args.load_at_start = "(re-rendered from the JSON; each run's load is in the JSON)"
        render(load_json(name), args, time.time(), partial=False)
        return True
    if args.repeats < 1 or (args.repeats < 2 and args.out is None):
        sys.exit("--repeats must be at least 2 (never a single timing); "
                 "--repeats 1 only with --out, for a smoke check")
    args.load_at_start = load_text()
    return False


def simulation_summary(server: str, client: str, config: dict[str, Any], num_supernodes: int,
                       timeout: float) -> dict[str, Any]:
    """:func:`simulate` then :func:`summarize`, with the load after the run and, if it failed, why."""
    run = simulate(server, client, config, num_supernodes, timeout=timeout)
    summary = summarize(run)
    summary["load"] = load_text()
    if run.returncode != 0:
        summary["log_tail"] = run.log_tail
        print(run.log_tail, flush=True)
        print("[bench] FAILED: " + "; ".join(run.problems), flush=True)
    return summary


def simulations(specs: dict[Any, tuple[str, str, dict[str, Any], int]],
                timeout: float) -> dict[Any, Callable[[], dict[str, Any]]]:
    """Contenders for :func:`run_alternating`: ``key -> (server, client, run config, nodes)``."""
    return {key: functools.partial(simulation_summary, *spec, timeout=timeout)
            for key, spec in specs.items()}


def ok_runs(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that trained as asked (failed ones never enter a figure)."""
    return [r for r in runs if r["returncode"] == 0]


def ok_pairs(first: list[dict[str, Any]], second: list[dict[str, Any]]
             ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Runs of two contenders paired by repeat (same load), both of which trained."""
    return [(a, b) for a, b in zip(first, second) if a["returncode"] == 0 and b["returncode"] == 0]


def fmt_values(values: Iterable[float], digits: int = 3, scale: float = 1.0) -> str:
    """``median (min-max)`` of ``values`` (``-`` when there are none)."""
    return Samples(list(values)).fmt(scale, digits)


def run_alternating(name: str, args: argparse.Namespace,
                    contenders: dict[str, Callable[[], dict[str, Any]]],
                    render: Callable[..., None],
                    describe: Callable[[dict[str, Any]], str]) -> dict[str, list[dict[str, Any]]]:
    """Run every contender ``args.repeats`` times, alternating (ABBA...), rendering after each.

    Exits with status 1 after writing the results when any run failed: its
    problems are listed in the results file and it counts in no figure.
    """
    started = time.time()
    results: dict[str, list[dict[str, Any]]] = {key: [] for key in contenders}
    names = list(contenders)
    for rep in range(args.repeats):
        for key in (names if rep % 2 == 0 else names[::-1]):
            print(f"repeat {rep + 1}: {key} ...", flush=True)
            summary = contenders[key]()
            results[key].append(summary)
            if summary["returncode"] == 0:
                print("  " + describe(summary), flush=True)
            render(results, args, started, partial=True)
    render(results, args, started, partial=False)
    print((results_dir() / f"{name}.md").read_text())
    failed = sum(len(runs) - len(ok_runs(runs)) for runs in results.values())
    if failed:
        sys.exit(f"[bench] {failed} run(s) failed; see 'Failed runs' in "
                 f"{results_dir() / (name + '.md')}")
    return results


def compare_apps(name: str, doc: str, contenders: dict[str, tuple[str, str]],
                 render: Callable[..., None], describe: Callable[[dict[str, Any]], str],
                 *, repeats: int = 2) -> None:
    """The whole ``main`` of a benchmark of ``name -> (server, client)`` on the app's defaults."""
    args = simulation_parser(doc, repeats=repeats).parse_args()
    if prepare(args, name, render):
        return
    config = run_config(num_server_rounds=args.rounds)
    run_alternating(
        name, args,
        simulations({key: (server, client, config, args.clients)
                     for key, (server, client) in contenders.items()}, args.timeout),
        render, describe,
    )


def failed_runs_section(results: dict[Any, list[dict[str, Any]]]) -> str:
    """A Markdown section listing every failed run and why; empty when none failed."""
    rows = [[key, i + 1, "; ".join(r.get("problems") or [f"exit code {r['returncode']}"])]
            for key, runs in results.items() for i, r in enumerate(runs) if r["returncode"] != 0]
    if not rows:
        return ""
    return ("\n\n## Failed runs (left out of every figure above)\n\n"
            + table(["contender", "run", "why"], rows) + "\n")


def write_simulation_results(name: str, title: str, body: str,
                             results: dict[Any, list[dict[str, Any]]],
                             args: argparse.Namespace, started: float, partial: bool) -> None:
    """The results files of a simulation benchmark: Markdown (with failed runs) and JSON."""
    text = (("**Partial: the run is still going.**\n\n" if partial else "") + body.rstrip()
            + failed_runs_section(results))
    write_results(name, title, text, started=started,
                  extra_header=f"- Load at start: {args.load_at_start}\n")
    write_json(name, results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        _child_main(sys.argv[2:])
