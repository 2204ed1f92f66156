"""Secure aggregation (SecAgg+) vs plain FedAvg: the cost of one training round's aggregation.

Both paths run through the entry points of the app's round loop
(``FedAvg.start``), in this process, with stand-in clients that do everything
a client does for the round except train:

- ``plain``: ``FedAvg.configure_train`` (sample, global arrays into the train
  messages), an in-process grid whose clients decode the global arrays and
  answer with their local model (an ArrayRecord) and ``num-examples``, then
  ``FedAvg.aggregate_train`` (every reply validated by ``check_train_reply``,
  ``finite_weighted_mean``, the new model's ArrayRecord);
- ``secure``: ``FedAvg(secure_aggregation=SecAggPlus(SecAggParameters()))``
  ``.secure_train``: ``configure_train``, then ``SecAggPlus.run``'s four
  exchanges with ``tests.secagg_harness.SecureGrid``, whose clients run the
  real client code (``clients.secure_aggregation``: key pairs, Shamir shares,
  share encryption, the masked vector of a given local model), mask
  reconstruction, then ``WeightedMean.aggregate_secure`` (decode the sum, the
  new model); the app's default SecAgg+ settings (every pair masks,
  threshold 0.6, 22-bit quantisation in Z_2^32);
- ``secure, 2 drop``: the same with two clients that share their keys and
  then drop (no masked vector): the server rebuilds their mask keys and
  removes their pair masks from the sum (10-client cells only).

Per round: wall time; server CPU (process CPU time of the round minus the CPU
time spent inside the stand-in clients' calls); client CPU per client; bytes
per client up and down (message content: array bytes, config values;
``SecureSum.bytes_from_clients`` / ``bytes_to_clients`` for the secure path,
the same ``content_bytes`` of the train message and the reply for the plain
one); the server CPU split by part. The contenders alternate (rotating order)
in every repeat; medians with min-max; ratios per repeat.

    uv run python bench/secure_aggregation.py --quick   # smoke check, 1 repeat, ~20 s
    uv run python bench/secure_aggregation.py           # the full run, ~10-15 min on 2 cores
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import (  # noqa: E402
    Samples,
    add_out_option,
    apply_out_option,
    load_text,
    ratio_samples,
    results_dir,
    set_task_identity,
    table,
    write_json,
    write_results,
)

NAME = "secure_aggregation"

MODELS: dict[str, dict[str, tuple[int, ...]]] = {
    # clients.models.build_cnn((8, 8, 1), 10): the app's CNN on digits (13,706 parameters)
    "13.7k": {"cnn/conv-1/kernel": (3, 3, 1, 16), "cnn/conv-1/bias": (16,),
              "cnn/conv-2/kernel": (3, 3, 16, 32), "cnn/conv-2/bias": (32,),
              "cnn/dense-1/kernel": (128, 64), "cnn/dense-1/bias": (64,),
              "cnn/head/kernel": (64, 10), "cnn/head/bias": (10,)},
    # build_cnn((28, 28, 1), 10): the app's default on MNIST, the FedAvg paper's CNN (1,663,370)
    "1.66M": {"cnn/conv-1/kernel": (5, 5, 1, 32), "cnn/conv-1/bias": (32,),
              "cnn/conv-2/kernel": (5, 5, 32, 64), "cnn/conv-2/bias": (64,),
              "cnn/dense-1/kernel": (3136, 512), "cnn/dense-1/bias": (512,),
              "cnn/head/kernel": (512, 10), "cnn/head/bias": (10,)},
}
PLAIN, SECURE, DROP = "plain", "secure", "secure, 2 drop"
#: The secure round with Flower's combine_shares per secret (what SecAggPlus did before
#: secagg/shamir.py): before/after of the reconstruction, side by side.
FLOWER_SHAMIR = "secure, Flower's Shamir"
ORDER_LETTER = {PLAIN: "p", SECURE: "s", FLOWER_SHAMIR: "f", DROP: "d"}
#: Clients that drop after sharing keys in the DROP contender.
NUM_DROPPED = 2

#: Server-side parts timed separately (outside the clients' calls), in table order.
PARTS = (
    "validate replies", "weighted mean",
    "public-key checks", "masked-vector checks", "self-mask PRG", "Shamir combine",
    "dropped: key + ECDH", "dropped: pair-mask PRG", "decode sum + mean", "model to ArrayRecord",
    "byte counting",
)


def num_params(model: str) -> int:
    return sum(math.prod(shape) for shape in MODELS[model].values())


# ------------------------------------------------------------------ clocks
class Clock:
    """CPU and wall time of the stand-in clients' calls, and of named server-side parts.

    ``client(stage)`` brackets one client call; ``part(label)`` wraps a
    server-side function so that its time counts only when it runs outside
    a client call (the clients call some of the same functions) and outside
    another timed part.
    """

    def __init__(self) -> None:
        self.reset()
        self.inside_client = False
        self._inside_part = False

    def reset(self) -> None:
        self.client_cpu = 0.0
        self.client_wall = 0.0
        #: stage -> per-call (cpu, wall) of the clients this round.
        self.stage_calls: dict[str, list[tuple[float, float]]] = {}
        self.parts: dict[str, float] = {}
        #: Set once the server starts rebuilding a dropped node's pair masks.
        self.dropped_phase = False

    def client_call(self, stage: str, fn: Callable[[], Any]) -> Any:
        self.inside_client = True
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            return fn()
        finally:
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            self.inside_client = False
            self.client_cpu += cpu
            self.client_wall += wall
            self.stage_calls.setdefault(stage, []).append((cpu, wall))

    def part(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.inside_client or self._inside_part:
                return fn(*args, **kwargs)
            self._inside_part = True
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.parts[label] = self.parts.get(label, 0.0) + time.process_time() - start
                self._inside_part = False

        timed.__wrapped_by_bench__ = True  # type: ignore[attr-defined]
        return timed


CLOCK = Clock()


def instrument() -> None:
    """Wrap the server-side functions of both paths in :data:`CLOCK` (this process only).

    Module attributes are replaced where the server code looks them up at
    call time; the source files are untouched.
    """
    from secagg import keys
    from strategies import fedavg, secure_aggregation, stages

    if getattr(secure_aggregation.prg_mask, "__wrapped_by_bench__", False):
        return
    # plain: FedAvg.accept_train_replies -> check_train_reply; WeightedMean -> finite_weighted_mean
    fedavg.check_train_reply = CLOCK.part("validate replies", fedavg.check_train_reply)
    stages.finite_weighted_mean = CLOCK.part("weighted mean", stages.finite_weighted_mean)
    fedavg.to_arrayrecord = CLOCK.part("model to ArrayRecord", fedavg.to_arrayrecord)
    # secure: SecAggPlus.run
    load_key = keys.load_public_key

    def server_load_key(data: bytes) -> Any:
        # The advertised keys are checked at setup; a dropped node's survivors' keys
        # are loaded again for its pair masks.
        label = "dropped: key + ECDH" if CLOCK.dropped_phase else "public-key checks"
        return CLOCK.part(label, load_key)(data)

    keys.load_public_key = server_load_key
    secure_aggregation.decode_array = CLOCK.part("masked-vector checks",
                                                 secure_aggregation.decode_array)
    secure_aggregation.content_bytes = CLOCK.part("byte counting",
                                                  secure_aggregation.content_bytes)
    rebuild = secure_aggregation.SecAggPlus._rebuild  # pylint: disable=protected-access
    secure_aggregation.SecAggPlus._rebuild = staticmethod(  # pylint: disable=protected-access
        CLOCK.part("Shamir combine", rebuild))
    prg = secure_aggregation.prg_mask

    def server_prg(seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
        # run() calls prg_mask for the survivors' self masks first, then (after a
        # dropped node's key is rebuilt) for that node's pair masks.
        label = "dropped: pair-mask PRG" if CLOCK.dropped_phase else "self-mask PRG"
        return CLOCK.part(label, prg)(seed, length, modulus_bits)

    secure_aggregation.prg_mask = server_prg
    server_prg.__wrapped_by_bench__ = True  # type: ignore[attr-defined]
    keys.mask_seed = CLOCK.part("dropped: key + ECDH", keys.mask_seed)
    from_bytes = CLOCK.part("dropped: key + ECDH", keys.private_key_from_bytes)

    def server_key_from_bytes(data: bytes) -> Any:
        if not CLOCK.inside_client:
            CLOCK.dropped_phase = True  # only the dropped nodes' keys are rebuilt by the server
        return from_bytes(data)

    keys.private_key_from_bytes = server_key_from_bytes
    keys.public_key_to_bytes = CLOCK.part("dropped: key + ECDH", keys.public_key_to_bytes)
    fedavg.decode = CLOCK.part("decode sum + mean", fedavg.decode)
    stages.WeightedMean.aggregate_secure = CLOCK.part("decode sum + mean",
                                                      stages.WeightedMean.aggregate_secure)


# ------------------------------------------------------------------ federation
def federation(model: str, num_clients: int, seed: int = 0):
    """Global arrays, each client's local model (global + small Gaussian noise), example counts."""
    rng = np.random.default_rng([seed, num_clients, num_params(model)])
    shapes = MODELS[model]
    global_arrays = {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.05)
                     for k, s in shapes.items()}
    nodes = [1000 + i for i in range(num_clients)]
    local = {
        node: {k: g + rng.standard_normal(g.shape, dtype=np.float32) * np.float32(1e-3)
               for k, g in global_arrays.items()}
        for node in nodes
    }
    examples = {node: int(n) for node, n in zip(nodes, rng.integers(100, 1000, num_clients))}
    return global_arrays, local, examples


class PlainGrid:
    """In-process grid of stand-in FedAvg clients: read the global arrays, send the local model."""

    def __init__(self, local: Mapping[int, Mapping[str, np.ndarray]],
                 num_examples: Mapping[int, int]) -> None:
        set_task_identity()
        self.local = local
        self.num_examples = num_examples
        self.sent: list[Any] = []
        self.received: list[Any] = []

    def get_node_ids(self) -> list[int]:
        return list(self.local)

    def handle(self, msg: Any) -> Any:
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

        from strategies import protocol
        from strategies.validation import encode_array

        node = msg.metadata.dst_node_id
        # What the ClientApp does before and after training (training left out):
        # read the global arrays, serialise its local model.
        _ = {k: v.numpy() for k, v in msg.content[protocol.ARRAYS].items()}
        arrays = ArrayRecord({k: encode_array(np.ascontiguousarray(v))
                              for k, v in self.local[node].items()})
        content = RecordDict({
            protocol.ARRAYS: arrays,
            "metrics": MetricRecord({"num-examples": self.num_examples[node],
                                     "train-loss": 0.5}),
        })
        return Message(content, reply_to=msg)

    def send_and_receive(self, messages: Iterable[Any], timeout: float | None = None) -> list[Any]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            replies.append(CLOCK.client_call("train", functools.partial(self.handle, msg)))
        self.received.extend(replies)
        return replies


def timed_secure_grid(*args: Any, **kwargs: Any):
    """A :class:`tests.secagg_harness.SecureGrid` whose client calls run under :data:`CLOCK`."""
    from strategies import protocol
    from tests.secagg_harness import SecureGrid

    class TimedSecureGrid(SecureGrid):
        def handle(self, msg: Any) -> Any:
            stage = str(msg.content[protocol.CONFIG][protocol.SECAGG_STAGE])
            return CLOCK.client_call(stage, functools.partial(super().handle, msg))

    return TimedSecureGrid(*args, **kwargs)


# ------------------------------------------------------------------ one round
def run_round(kind: str, model: str, fed: tuple, check: bool = False) -> dict[str, Any]:
    """One round of ``kind``; its figures (and, with ``check``, the new model)."""
    from flwr.app import ConfigRecord

    from secagg.parameters import SecAggParameters
    from strategies import protocol
    from strategies.fedavg import FedAvg
    from strategies.secure_aggregation import SecAggPlus, content_bytes
    from strategies.validation import encode_array

    global_arrays, local, examples = fed
    nodes = sorted(local)
    n = len(nodes)
    arrays = _global_record(global_arrays, encode_array)
    config = ConfigRecord({protocol.SERVER_ROUND: 1})
    if kind == PLAIN:
        strategy = FedAvg(min_train_nodes=n, fraction_evaluate=0.0)
        grid: Any = PlainGrid(local, examples)
    else:
        strategy = FedAvg(min_train_nodes=n, fraction_evaluate=0.0,
                          secure_aggregation=SecAggPlus(SecAggParameters()))
        drop = ({node: protocol.SECAGG_COLLECT for node in nodes[:NUM_DROPPED]}
                if kind == DROP else {})
        grid = timed_secure_grid(local, examples, drop_from=drop)
    gc.collect()
    gc.disable()
    CLOCK.reset()
    cpu, wall = time.process_time(), time.perf_counter()
    from secagg import keys

    ours = keys.combine_shares_batch
    if kind == FLOWER_SHAMIR:
        keys.combine_shares_batch = lambda lists: [keys.combine_shares(s) for s in lists]
    try:
        if kind == PLAIN:
            replies = grid.send_and_receive(strategy.configure_train(1, arrays, config, grid),
                                            timeout=600)
            new_arrays, _ = strategy.aggregate_train(1, replies)
        else:
            new_arrays, _ = strategy.secure_train(1, arrays, config, grid, timeout=600)
    finally:
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        gc.enable()
        keys.combine_shares_batch = ours
    if new_arrays is None:
        raise RuntimeError(f"{kind} round released no model: {strategy.last_failures}")
    # Bytes per client: the train message(s) down, the reply(ies) up, content only.
    if kind == PLAIN:
        if strategy.last_num_rejected or len(grid.received) != n:
            raise RuntimeError(f"plain round rejected replies: {strategy.last_failures}")
        down = [content_bytes(m.content) for m in grid.sent]
        up = [content_bytes(m.content) for m in grid.received]
        counted = nodes
    else:
        result = strategy.last_secure_round
        survivors = nodes[NUM_DROPPED:] if kind == DROP else nodes
        if result is None or result.voided or result.contributors != survivors:
            raise RuntimeError(f"{kind} round: contributors "
                               f"{None if result is None else result.contributors}, "
                               f"voided {None if result is None else result.voided}")
        counted = survivors  # the dropped nodes never sent a masked vector
        down = [result.bytes_to_clients[node] for node in counted]
        up = [result.bytes_from_clients[node] for node in counted]
    # The round's client-side critical path if the clients ran in parallel:
    # the slowest client of each exchange.
    stage_max_wall = sum(max(w for _, w in calls) for calls in CLOCK.stage_calls.values())
    figures = {
        "wall_s": wall,
        "cpu_s": cpu,
        "server_cpu_s": cpu - CLOCK.client_cpu,
        "server_wall_s": wall - CLOCK.client_wall,
        "client_cpu_total_s": CLOCK.client_cpu,
        "client_cpu_per_client_s": CLOCK.client_cpu / n,
        "parallel_wall_s": wall - CLOCK.client_wall + stage_max_wall,
        "client_stage_cpu_s": {stage: float(np.median([c for c, _ in calls]))
                               for stage, calls in CLOCK.stage_calls.items()},
        "client_stage_calls": {stage: len(calls) for stage, calls in CLOCK.stage_calls.items()},
        "parts_s": dict(CLOCK.parts),
        "upload_bytes_per_client": float(np.mean(up)),
        "download_bytes_per_client": float(np.mean(down)),
        "messages_per_client": (1 if kind == PLAIN else len(protocol.SECAGG_STAGES)),
        "clients_counted_for_bytes": len(counted),
    }
    if check:
        figures["new_arrays"] = {k: v.numpy() for k, v in new_arrays.items()}
    return figures


def _global_record(global_arrays: Mapping[str, np.ndarray], encode: Callable) -> Any:
    """The global ArrayRecord the server would hold (built outside the timing, once per cell)."""
    from flwr.app import ArrayRecord

    cached = _RECORDS.get(id(global_arrays))
    if cached is None or cached[0] is not global_arrays:
        _RECORDS.clear()
        cached = (global_arrays, ArrayRecord({k: encode(np.ascontiguousarray(v))
                                              for k, v in global_arrays.items()}))
        _RECORDS[id(global_arrays)] = cached
    return cached[1]


_RECORDS: dict[int, tuple[Mapping[str, np.ndarray], Any]] = {}


def check_cell(model: str, fed: tuple, contenders: list[str]) -> dict[str, float]:
    """Run each contender once and check that the secure model is the plain one within rounding.

    The plain reference for the 2-drop round is the plain mean of its survivors.
    """
    from secagg.parameters import SecAggParameters
    from secagg.vectors import rounding_bound
    from strategies.stages import WeightedMean

    global_arrays, local, examples = fed
    nodes = sorted(local)
    params = SecAggParameters()
    spec = WeightedMean().secure_vector_spec(1, params, num_params(model), len(nodes))
    out = {}
    for kind in contenders:
        if kind == PLAIN:
            continue
        survivors = nodes[NUM_DROPPED:] if kind == DROP else nodes
        sub = (global_arrays, {n: local[n] for n in survivors}, {n: examples[n] for n in survivors})
        plain = run_round(PLAIN, model, sub, check=True)["new_arrays"]
        secure = run_round(kind, model, fed, check=True)["new_arrays"]
        weight = sum(examples[n] for n in survivors)
        # Rounding of the quantised sum, scaled back by W / sum(w), plus float32 rounding.
        bound = rounding_bound(spec, len(survivors)) * spec.max_weight / weight + 1e-6
        diff = max(float(np.max(np.abs(secure[k].astype(np.float64) - plain[k]))) for k in plain)
        if not diff <= bound:
            raise RuntimeError(f"{kind}: secure model differs from the plain mean by {diff:.3g} "
                               f"> bound {bound:.3g}")
        out[kind] = diff
        out[f"{kind} bound"] = bound
    return out


# ------------------------------------------------------------------ cells
def run_cell(model: str, num_clients: int, repeats: int, warmup: int, with_drop: bool
             ) -> dict[str, Any]:
    contenders = [PLAIN, SECURE, FLOWER_SHAMIR] + ([DROP] if with_drop else [])
    fed = federation(model, num_clients)
    cell: dict[str, Any] = {"model": model, "params": num_params(model), "clients": num_clients,
                            "repeats": repeats, "warmup": warmup, "contenders": contenders,
                            "load_before": load_text()}
    cell["max_abs_diff_vs_plain"] = check_cell(model, fed, contenders)
    for _ in range(warmup):
        for kind in contenders:
            run_round(kind, model, fed)
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in contenders}
    orders = []
    for rep in range(repeats):
        order = contenders[rep % len(contenders):] + contenders[: rep % len(contenders)]
        orders.append(order)
        for kind in order:
            figures = run_round(kind, model, fed)
            runs[kind].append(figures)
            print(f"  rep {rep + 1} {kind:>15}: wall {figures['wall_s']:.3f} s, server CPU "
                  f"{figures['server_cpu_s']:.3f} s, client CPU/client "
                  f"{1e3 * figures['client_cpu_per_client_s']:.1f} ms", flush=True)
    cell["runs"] = runs
    cell["orders"] = orders
    cell["load_after"] = load_text()
    return cell


#: The figures compared as ratios, in the ratio table's column order.
RATIO_KEYS = ("wall_s", "server_cpu_s", "parallel_wall_s", "client_cpu_per_client_s",
              "upload_bytes_per_client", "download_bytes_per_client")


def series(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in runs]


# ------------------------------------------------------------------ rendering
def kib(value: float) -> str:
    return f"{value / 1024:.1f}"


def render(cells: list[dict[str, Any]], args: argparse.Namespace, started: float,
           partial: bool, notes: list[str]) -> None:
    main_rows, ratio_rows, part_rows, stage_rows, cell_rows = [], [], [], [], []
    for c in cells:
        label = f"{c['model']} x {c['clients']}"
        runs = c["runs"]
        for kind in c["contenders"]:
            r = runs[kind]
            if not r:
                continue
            main_rows.append([
                label, kind,
                Samples(series(r, "wall_s")).fmt(1, 3),
                Samples(series(r, "server_cpu_s")).fmt(1, 3),
                Samples(series(r, "client_cpu_per_client_s")).fmt(1e3, 3),
                Samples(series(r, "parallel_wall_s")).fmt(1, 3),
                kib(float(np.median(series(r, "upload_bytes_per_client")))),
                kib(float(np.median(series(r, "download_bytes_per_client")))),
                r[0]["messages_per_client"],
            ])
            parts = {p: Samples([x["parts_s"].get(p, 0.0) for x in r]) for p in PARTS}
            rest = Samples([x["server_cpu_s"] - sum(x["parts_s"].values()) for x in r])
            shares = {p: parts[p].median / Samples(series(r, "server_cpu_s")).median
                      for p in PARTS}
            largest = max(shares, key=shares.__getitem__)
            part_rows.append([label, kind, Samples(series(r, "server_cpu_s")).fmt(1e3, 3),
                              f"{largest} ({100 * shares[largest]:.0f}%)"]
                             + [parts[p].fmt(1e3, 3) if any(parts[p].values) else "-"
                                for p in PARTS]
                             + [rest.fmt(1e3, 3)])
            if kind != PLAIN:
                stages = list(r[0]["client_stage_cpu_s"])
                stage_rows.append([label, kind] + [
                    Samples([x["client_stage_cpu_s"].get(s, float("nan")) for x in r]).fmt(1e3, 3)
                    for s in ("setup", "share-keys", "collect-masked", "unmask")
                ] + [", ".join(f"{s} {r[0]['client_stage_calls'][s]}" for s in stages)])
            else:
                train = Samples([x["client_stage_cpu_s"]["train"] for x in r]).fmt(1e3, 3)
                stage_rows.append([label, kind, "-", "-", "-", "-", f"train {train} ms"])
        plain = runs[PLAIN]
        for kind in c["contenders"][1:]:
            bases = [("plain", plain)] + (
                [("secure", runs[SECURE])] if kind in (DROP, FLOWER_SHAMIR) else [])
            for base_name, base in bases:
                m = min(len(runs[kind]), len(base))
                if m:
                    ratio_rows.append([label, f"{kind} / {base_name}"] + [
                        ratio_samples(series(runs[kind][:m], key), series(base[:m], key)).fmt(1, 3)
                        for key in RATIO_KEYS
                    ])
        diffs = c.get("max_abs_diff_vs_plain", {})
        cell_rows.append([
            label, c["repeats"], c["warmup"],
            "; ".join(f"{k}: {diffs[k]:.2g} (bound {diffs[k + ' bound']:.2g})"
                      for k in c["contenders"][1:] if k in diffs) or "-",
            " / ".join("".join(ORDER_LETTER[k] for k in o) for o in c["orders"]),
            f"{c['load_before']} -> {c.get('load_after', '(running)')}",
        ])

    body = (
        ("**Partial: the run is still going.**\n\n" if partial else "")
        + ("**Smoke check (--quick): one repeat, not a result.**\n\n" if args.quick else "")
        + "One training round's aggregation with and without secure aggregation (SecAgg+), "
        "side by side in one process: median (min-max) over the repeats; the contenders "
        "alternate in a rotating order every repeat. Models: the shared arrays of the app's "
        "CNN on digits (`13.7k`: 13,706 float32 parameters, `build_cnn((8, 8, 1), 10)`) and "
        "on MNIST, the app's default (`1.66M`: 1,663,370, `build_cnn((28, 28, 1), 10)`), "
        "shapes hard-coded (no TensorFlow); random global arrays (N(0, 0.05^2)), every "
        "client's local model = global + N(0, 0.001^2) noise (float32), num-examples uniform "
        "in [100, 1000).\n\n"
        "## Per round\n\n"
        + table(["cell", "path", "round wall s", "server CPU s", "client CPU / client ms",
                 "wall, clients in parallel (est.) s", "upload / client KiB",
                 "download / client KiB", "messages / client"], main_rows)
        + "\n\n- **round wall**: the whole round in this process, the stand-in clients called "
        "one after another (their time included).\n"
        "- **server CPU**: the process CPU time of the round minus the CPU time spent inside "
        "the stand-in clients' calls: what the server itself computes (sampling, messages, "
        "reply checks, aggregation or mask reconstruction, the new model).\n"
        "- **client CPU / client**: all clients' CPU time in the round over the number of "
        "sampled clients (for `2 drop` the two that drop did only the first two exchanges): "
        "the client's protocol work without training (plain: decode the global "
        "arrays and serialise the local model; secure: two key pairs, Shamir shares of its "
        "self-mask seed and mask key, one authenticated encryption per peer, decrypting its "
        "peers' shares, one ECDH and one AES-CTR mask per peer plus its self mask over the "
        "whole vector, quantisation, and the unmask answer).\n"
        "- **wall, clients in parallel (est.)**: round wall minus the clients' wall time plus "
        "the slowest client of each exchange (1 for plain, 4 for secure): the round's length "
        "if the clients ran at once and the network were free. Derived, not measured.\n"
        "- **upload / download per client**: message content (array bytes, config values; "
        "`strategies.secure_aggregation.content_bytes`), mean over the clients (for `2 drop`: "
        "over the survivors), all messages of the round; the plain download is the global "
        "model and the train config, the plain upload the local model and two metrics. The "
        "secure upload is the masked vector (uint32, d + 2 coordinates) plus two public keys, "
        "n - 1 encrypted shares and n shares back at unmasking; the download adds every "
        "peer's two public keys and the n - 1 encrypted shares addressed to the client.\n\n"
        "## Ratios secure / plain (per repeat, then median (min-max))\n\n"
        + table(["cell", "ratio", "round wall", "server CPU", "wall, clients in parallel (est.)",
                 "client CPU / client", "upload / client", "download / client"], ratio_rows)
        + "\n\n## Server CPU by part, ms\n\n"
        "Timed by wrapping the server-side functions in this process (only their calls "
        "outside the clients' count): `validate replies` = `check_train_reply` (plain), "
        "`weighted mean` = `finite_weighted_mean`, `public-key checks` = "
        "`keys.load_public_key` on the advertised keys, `masked-vector checks` = "
        "`decode_array` of every masked vector, `self-mask PRG` = the AES-256-CTR expansion "
        "of every survivor's rebuilt self-mask seed (`prg_mask`), `Shamir combine` = "
        "`SecAggPlus._rebuild` for every survivor's seed and every dropped node's key "
        "(`secagg.shamir.combine_shares_batch`: the Lagrange weights once per index set; in "
        "the `secure, Flower's Shamir` contender, Flower's `combine_shares` per secret, "
        "Lagrange interpolation in GF(2^128) with t inversions per 16-byte chunk), "
        "`dropped: key + ECDH` = rebuilding a dropped node's private key, checking it "
        "against its public key and agreeing its pair-mask seed with each survivor, "
        "`dropped: pair-mask PRG` = expanding those pair masks, `decode sum + mean` = "
        "`secagg.vectors.decode` and `WeightedMean.aggregate_secure`, `model to ArrayRecord` "
        "= serialising the new model, `byte counting` = the bench's byte figures that "
        "`SecAggPlus` keeps. `rest` = server CPU minus those: messages, summing the masked "
        "vectors in uint64 and reducing mod 2^32, sampling, bookkeeping.\n\n"
        + table(["cell", "path", "server CPU", "largest part (median share)"] + list(PARTS)
                + ["rest"], part_rows)
        + "\n\n## Client CPU per call by exchange, ms (secure)\n\n"
        + table(["cell", "path", "setup", "share-keys", "collect-masked", "unmask",
                 "calls (plain: one train call)"], stage_rows)
        + "\n\n## What this measures, what it leaves out\n\n"
        "Everything runs in one process with no network: messages are handed over as Python "
        "objects, so Flower's transport cost per message (serialisation to protobuf, gRPC, "
        "the SuperLink's store) is not included; a secure round makes 4 message exchanges "
        "per client where a plain round makes 1, so in a deployment its latency also grows "
        "by 3 round trips and 3 more waits for the slowest client. The training itself is "
        "not included (neither path trains; the secure clients mask a given local model). "
        "The clients run one after another in this process, so the round wall time adds up "
        "all clients' work; the `clients in parallel` column estimates the deployed "
        "critical path instead. Bytes are message content, not wire bytes (no protobuf or "
        "TLS framing). The dropout contender drops 2 clients after they shared their keys "
        "(`drop_from=collect-masked`), the case that costs the server most: their pair "
        "masks with every survivor must be rebuilt (dropping before sharing keys costs "
        "nothing extra). Flower's Shamir reconstruction (`secure, Flower's Shamir`: one "
        "`combine_shares` per survivor's self-mask seed, t of its shares, t = 0.6 n with "
        "every pair masking) is Lagrange interpolation in GF(2^128) in pure Python "
        "(pycryptodome, 3 chunks of 16 bytes per padded 32-byte seed, run in a thread pool "
        "under the GIL): about t^2 field multiplications and t inversions per chunk, so "
        "n t^2 per round, independent of the model size; cProfile, which sees only the main "
        "thread, shows it as lock waits, which is why the parts above are timed with the "
        "process CPU clock. Ours (`secure`) computes the weights once per index set (one "
        "batched inversion) and multiplies by each weight through byte tables. Under load the wall "
        "time of a 50-client secure round varies far more than its CPU time (the other "
        "jobs on the 2 cores take turns with this process and its pool threads); compare "
        "the CPU columns first. Both paths use the app's code as shipped; the server-side "
        "functions are wrapped in this process for the per-part timing (a few hundred "
        "calls per round, microseconds each).\n\n"
        "## Cells: repeats, checks, order, load\n\n"
        "Each cell first runs every secure contender once and checks its new model against "
        "the plain mean of the same clients (the survivors for `2 drop`): the largest "
        "absolute difference must be within the quantisation bound (`rounding_bound`, "
        "scaled by W / sum of weights). Order: p = plain, s = secure, f = secure, Flower's Shamir, d = secure, 2 drop. "
        "That check (one untimed round of every contender, the plain one with all clients "
        "and with the survivors) is the cell's warm-up; `warm-up` counts further untimed "
        "rounds of each. Before the first cell one round of each contender runs at "
        "13.7k x 10 (imports, first calls).\n\n"
        + table(["cell", "repeats", "warm-up", "max abs diff vs plain", "order per repeat",
                 "load before -> after (1/5/15 min)"], cell_rows)
        + ("\n\n" + "\n".join(f"- {note}" for note in notes) if notes else "")
        + "\n"
    )
    write_results(NAME, "Secure aggregation (SecAgg+) vs plain FedAvg: one round", body,
                  started=started, command=args.command,
                  extra_header=f"- Load at start: {args.load_at_start}\n")
    clean = [{k: v for k, v in c.items()} for c in cells]
    write_json(NAME, {"cells": clean, "notes": notes, "partial": partial})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 13.7k x 10 clients, 1 repeat (results to --out, "
                             "default /tmp/bench-smoke)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--repeats", type=int, default=0,
                        help="0: 5 per cell (at least 3; 1 only with --quick)")
    parser.add_argument("--max-secure-s", type=float, default=180.0,
                        help="skip a 50-client cell of the large model when one secure round "
                             "of it is projected above this many seconds")
    add_out_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.models, args.clients = ["13.7k"], [10]
        args.repeats = args.repeats or 1
        if args.out is None:
            args.out = Path("/tmp/bench-smoke")
    elif args.repeats and args.repeats < 3:
        sys.exit("--repeats must be at least 3 (1 only with --quick)")
    apply_out_option(args)
    args.command = "uv run python bench/secure_aggregation.py" + (
        " " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    args.load_at_start = load_text()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    set_task_identity()
    instrument()
    started = time.time()
    notes: list[str] = []

    print("warm-up: 13.7k x 10, one round of each contender ...", flush=True)
    warm = federation("13.7k", 10, seed=99)
    for kind in (PLAIN, SECURE, DROP):
        run_round(kind, "13.7k", warm)

    cells: list[dict[str, Any]] = []
    secure_s: dict[tuple[str, int], float] = {}
    for model in args.models:
        for num_clients in sorted(args.clients):
            repeats = args.repeats or 5
            warmup = 0  # the untimed check round of every contender warms the cell up
            # Project a secure round from the last cell of this model: per-client work
            # grows with n (one mask per peer), the round with n^2.
            smaller = [(n, s) for (m, n), s in secure_s.items() if m == model]
            if smaller:
                n0, s0 = max(smaller)
                projected = s0 * (num_clients / n0) ** 2
                if projected > args.max_secure_s:
                    note = (f"{model} x {num_clients} not run: one secure round projected at "
                            f"{projected:.0f} s (from {s0:.1f} s at {n0} clients, x n^2), over "
                            f"--max-secure-s {args.max_secure_s:g}")
                    print(note, flush=True)
                    notes.append(note)
                    continue
            print(f"cell {model} x {num_clients}: {repeats} repeats ...", flush=True)
            cell = run_cell(model, num_clients, repeats, warmup,
                            with_drop=num_clients <= 10)
            cells.append(cell)
            secure_s[(model, num_clients)] = float(np.median(series(cell["runs"][SECURE],
                                                                    "wall_s")))
            render(cells, args, started, partial=True, notes=notes)
    render(cells, args, started, partial=False, notes=notes)
    print((results_dir() / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
