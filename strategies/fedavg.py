"""Federated Averaging, our own Flower strategy."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from .aggregation import weighted_mean, weighted_metrics
from .sampling import sample_size, sample_without_replacement, wait_for_nodes
from .server_optimizers import ServerOptimizer
from .validation import (
    ArraySpec,
    EvaluateReply,
    InvalidReply,
    TrainReply,
    array_specs,
    check_evaluate_reply,
    check_train_reply,
)

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
#: ``(server_round, arrays) -> arrays``: a server-side step after aggregation
#: (e.g. fine-tuning on the server's public data, :mod:`clients.server_training`).
ServerUpdateFn = Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class RoundReport:
    """What happened in one round, handed to ``on_round_end`` listeners."""

    server_round: int
    num_rounds: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    federated_metrics: dict[str, float] = field(default_factory=dict)
    central_metrics: dict[str, float] = field(default_factory=dict)
    num_sampled: int = 0
    num_accepted: int = 0
    num_rejected: int = 0
    elapsed_s: float = 0.0
    arrays: ArrayRecord | None = None


RoundListener = Callable[[RoundReport], None]


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as a dict of numpy arrays, keys kept."""
    return {key: array.numpy() for key, array in record.items()}


def to_arrayrecord(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A dict of numpy arrays as an ArrayRecord keyed by the same names."""
    return ArrayRecord({key: Array(np.ascontiguousarray(v)) for key, v in arrays.items()})


# pylint: disable=too-many-instance-attributes
class FedAvg(Strategy):
    """Federated Averaging with reply validation and bounded waits.

    Implementation of Algorithm 1 of McMahan et al. (2017), "Communication-
    Efficient Learning of Deep Networks from Decentralized Data",
    https://arxiv.org/abs/1602.05629: each round a fraction of the nodes
    trains locally from the global model, and the new global model is the mean
    of their models weighted by their number of training examples.

    Every reply is validated before it is averaged (error replies, missing or
    extra array keys, wrong shapes or dtypes, NaN/Inf values, missing or
    non-positive ``num-examples``); a bad reply is dropped with its reason in
    the log and the round goes on with the rest. When no reply is left the
    global model stays as it was.

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of connected nodes sampled for training each round.
    fraction_evaluate : float (default: 1.0)
        Fraction of connected nodes sampled for federated evaluation (0 skips it).
    min_train_nodes : int (default: 2)
        Least number of nodes sampled for training.
    min_evaluate_nodes : int (default: 2)
        Least number of nodes sampled for evaluation.
    node_wait_timeout : float (default: 120.0)
        Seconds to wait for enough nodes to connect before ending the run.
    seed : int (default: 0)
        Seed of the node sampler.
    server_optimizer : ServerOptimizer | None (default: None)
        A server optimiser (:mod:`strategies.server_optimizers`; FedAvgM,
        FedAdam, FedYogi of Reddi et al. 2021, https://arxiv.org/abs/2003.00295)
        applied to the aggregate relative to the arrays sent this round:
        ``x_{t+1} = opt.step(x_t, aggregate)``. ``None`` keeps the aggregate.
    server_update_fn : ServerUpdateFn | None (default: None)
        Called as ``server_update_fn(server_round, arrays)`` on the new global
        arrays after aggregation and the server optimiser, before central
        evaluation; its result is the new global model (server-side training
        on the server's own data). ``None`` skips it.
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        node_wait_timeout: float = 120.0,
        seed: int = 0,
        server_optimizer: ServerOptimizer | None = None,
        server_update_fn: ServerUpdateFn | None = None,
    ) -> None:
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes if fraction_evaluate > 0 else 0
        self.node_wait_timeout = node_wait_timeout
        self.rng = np.random.default_rng(seed)
        self._sent_specs: dict[str, ArraySpec] = {}
        self._sent_arrays: dict[str, np.ndarray] = {}
        self.last_num_sampled = 0
        self.last_num_rejected = 0
        self.stop_reason: str | None = None
        self.server_optimizer = server_optimizer
        self.server_update_fn = server_update_fn

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(
            INFO,
            "%s: fraction-train %.2f (min %d nodes), fraction-evaluate %.2f (min %d), "
            "node wait %.0f s",
            self.__class__.__name__,
            self.fraction_train,
            self.min_train_nodes,
            self.fraction_evaluate,
            self.min_evaluate_nodes,
            self.node_wait_timeout,
        )
        if self.server_optimizer is not None:
            log(INFO, "%s: server optimiser %r", self.__class__.__name__, self.server_optimizer)
        if self.server_update_fn is not None:
            log(
                INFO,
                "%s: server-side update after aggregation: %r",
                self.__class__.__name__,
                self.server_update_fn,
            )

    def should_stop(self, server_round: int, grid: Grid | None = None) -> str | None:
        """Why round ``server_round`` must not start, or ``None`` to run it.

        Plain FedAvg always runs; DP-FedAvg stops before a round that would
        exceed its privacy budget. Checked at the top of every round.
        """
        return None

    # ------------------------------------------------------------------ sampling
    def sample_train_nodes(self, grid: Grid) -> list[int]:
        """The nodes that train this round."""
        nodes = wait_for_nodes(grid, self.min_train_nodes, self.node_wait_timeout)
        size = sample_size(len(nodes), self.fraction_train, self.min_train_nodes)
        if size > len(nodes):
            nodes = wait_for_nodes(grid, size, self.node_wait_timeout)
        return sample_without_replacement(nodes, size, self.rng)

    def _messages(
        self, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], kind: str
    ) -> list[Message]:
        content = RecordDict({"arrays": arrays, "config": config})
        return [
            Message(content=content, message_type=kind, dst_node_id=node)
            for node in nodes
        ]

    # ------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the global arrays and the train config."""
        nodes = self.sample_train_nodes(grid)
        self.last_num_sampled = len(nodes)
        self._sent_specs = array_specs(arrays)
        self._sent_arrays = to_numpy(arrays)
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        log(INFO, "configure_train: sampled %d nodes", len(nodes))
        return self._messages(arrays, config, nodes, MessageType.TRAIN)

    def accept_train_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> list[TrainReply]:
        """Validate every reply; log and drop the bad ones."""
        accepted: list[TrainReply] = []
        rejected = 0
        for message in replies:
            try:
                accepted.append(check_train_reply(message, self._sent_specs))
            except InvalidReply as reason:
                rejected += 1
                log(
                    WARNING,
                    "Round %d: rejected train reply from node %d: %s",
                    server_round,
                    message.metadata.src_node_id,
                    reason,
                )
        self.last_num_rejected = rejected
        return accepted

    def aggregate_arrays(
        self, server_round: int, replies: list[TrainReply]
    ) -> dict[str, np.ndarray]:
        """The new global arrays: the example-weighted mean of the replies."""
        return weighted_mean(
            [reply.arrays for reply in replies],
            [reply.num_examples for reply in replies],
        )

    def server_step(
        self, server_round: int, arrays: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The server's own step on the aggregate: optimiser, then ``server_update_fn``.

        ``arrays`` is what :meth:`aggregate_arrays` returned; the optimiser
        takes the pseudo-gradient ``x_t - arrays`` with ``x_t`` the arrays
        sent this round. Without an optimiser and an update function the
        aggregate is returned as it is.
        """
        if self.server_optimizer is not None:
            arrays = self.server_optimizer.step(self._sent_arrays, arrays)
        if self.server_update_fn is not None:
            arrays = self.server_update_fn(server_round, arrays)
        return arrays

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the valid replies' arrays and metrics, weighted by num-examples.

        The average then goes through :meth:`server_step` (server optimiser,
        server-side update) when either is set.
        """
        accepted = self.accept_train_replies(server_round, replies)
        if not accepted:
            log(
                WARNING,
                "Round %d: no valid train reply; the global model stays unchanged",
                server_round,
            )
            return None, None
        arrays = self.server_step(server_round, self.aggregate_arrays(server_round, accepted))
        metrics = weighted_metrics(
            [reply.metrics for reply in accepted],
            [reply.num_examples for reply in accepted],
        )
        return to_arrayrecord(arrays), MetricRecord(metrics)

    # ---------------------------------------------------------------- evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes for federated evaluation of the global arrays."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = wait_for_nodes(grid, self.min_evaluate_nodes, self.node_wait_timeout)
        size = min(
            sample_size(len(nodes), self.fraction_evaluate, self.min_evaluate_nodes),
            len(nodes),
        )
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        chosen = sample_without_replacement(nodes, size, self.rng)
        return self._messages(arrays, config, chosen, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the valid evaluation replies' metrics."""
        accepted: list[EvaluateReply] = []
        for message in replies:
            try:
                accepted.append(check_evaluate_reply(message))
            except InvalidReply as reason:
                log(
                    WARNING,
                    "Round %d: rejected evaluate reply from node %d: %s",
                    server_round,
                    message.metadata.src_node_id,
                    reason,
                )
        if not accepted:
            return None
        return MetricRecord(
            weighted_metrics(
                [reply.metrics for reply in accepted],
                [reply.num_examples for reply in accepted],
            )
        )

    # ---------------------------------------------------------------------- loop
    # pylint: disable=too-many-arguments,too-many-locals
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        on_round_end: Iterable[RoundListener] = (),
        start_round: int = 1,
    ) -> Result:
        """Run rounds ``start_round..num_rounds`` of train, federated and central evaluation.

        ``start_round`` > 1 continues a checkpointed run (``initial_arrays``
        are then the checkpoint's arrays): round 0's evaluation is skipped.

        The loop is Flower's ``Strategy.start`` with one addition: after round
        0 (the initial model's central evaluation) and after every round, a
        :class:`RoundReport` goes to each ``on_round_end`` listener, which is
        how run outputs are written as the run goes, not only at the end.
        """
        listeners = list(on_round_end)
        log(INFO, "Starting %s for %d rounds", self.__class__.__name__, num_rounds)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        arrays = initial_arrays
        result.arrays = arrays
        t_start = time.monotonic()

        if start_round <= 1:
            report = RoundReport(server_round=0, num_rounds=num_rounds, arrays=arrays)
            if evaluate_fn:
                central = evaluate_fn(0, arrays)
                if central is not None:
                    result.evaluate_metrics_serverapp[0] = central
                    report.central_metrics = dict(central)
            report.elapsed_s = time.monotonic() - t_start
            for listener in listeners:
                listener(report)

        for server_round in range(max(start_round, 1), num_rounds + 1):
            reason = self.should_stop(server_round, grid)
            if reason is not None:
                log(WARNING, "Stopping before round %d: %s", server_round, reason)
                self.stop_reason = reason
                break
            t_round = time.monotonic()
            report = RoundReport(server_round=server_round, num_rounds=num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(server_round, arrays, train_config, grid),
                timeout=timeout,
            )
            replies = list(replies)
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            report.num_sampled = self.last_num_sampled
            report.num_rejected = self.last_num_rejected
            report.num_accepted = len(replies) - self.last_num_rejected
            if len(replies) < report.num_sampled:
                log(
                    WARNING,
                    "Round %d: %d of %d sampled nodes did not reply in time",
                    server_round,
                    report.num_sampled - len(replies),
                    report.num_sampled,
                )
            if new_arrays is not None:
                arrays = new_arrays
                result.arrays = arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
                report.train_metrics = dict(train_metrics)

            evaluate_messages = list(
                self.configure_evaluate(server_round, arrays, evaluate_config, grid)
            )
            if evaluate_messages:
                evaluate_replies = grid.send_and_receive(
                    messages=evaluate_messages, timeout=timeout
                )
                federated = self.aggregate_evaluate(server_round, evaluate_replies)
                if federated is not None:
                    result.evaluate_metrics_clientapp[server_round] = federated
                    report.federated_metrics = dict(federated)

            if evaluate_fn:
                central = evaluate_fn(server_round, arrays)
                if central is not None:
                    result.evaluate_metrics_serverapp[server_round] = central
                    report.central_metrics = dict(central)

            report.elapsed_s = time.monotonic() - t_round
            report.arrays = arrays
            for listener in listeners:
                listener(report)

        log(INFO, "%s finished in %.1f s", self.__class__.__name__, time.monotonic() - t_start)
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.rstrip("\n"))
        return result
