"""Federated Averaging, our own Flower strategy."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import DEBUG, INFO, WARNING
from typing import Any, TypeVar

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

from secagg.vectors import decode

from . import protocol
from .aggregation import weighted_metrics
from .anomaly import ClientFigures, client_figures, summary_line
from .sampling import (
    generator_state,
    restore_generator,
    sample_size,
    sample_without_replacement,
    wait_for_nodes,
)
from .secure_aggregation import SecAggPlus, SecureSum, secure_round_metrics
from .server_optimizers import ServerOptimizer
from .stages import AggregationStage, SecureAggregationStage, WeightedMean
from .validation import (
    ArraySpec,
    EvaluateReply,
    InvalidReply,
    TrainReply,
    array_specs,
    check_evaluate_reply,
    check_train_reply,
    encode_array,
)

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
#: ``(server_round, arrays) -> arrays``: a server-side step after aggregation
#: (e.g. fine-tuning on the server's public data, :mod:`clients.server_training`).
ServerUpdateFn = Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]
ReplyT = TypeVar("ReplyT", TrainReply, EvaluateReply)


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
    #: The aggregation stage's figures of the round (DP-FedAvg: epsilon, noise ...).
    aggregation_metrics: dict[str, float] = field(default_factory=dict)
    #: Per reply: node, update norm, cosine to the aggregate, status (report_clients).
    client_figures: list[dict[str, float | int | str]] = field(default_factory=list)


RoundListener = Callable[[RoundReport], None]


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as a dict of numpy arrays, keys kept."""
    return {key: array.numpy() for key, array in record.items()}


def to_arrayrecord(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A dict of numpy arrays as an ArrayRecord keyed by the same names.

    Each array is serialised with one copy (:func:`~strategies.validation.encode_array`),
    to the same bytes as Flower's ``Array(ndarray)``.
    """
    return ArrayRecord(
        {key: encode_array(np.ascontiguousarray(v)) for key, v in arrays.items()}
    )


#: Why a sampled node is in :attr:`FedAvg.last_failures` when nothing came back from it.
NO_REPLY = "no reply before the timeout"


def message_destinations(messages: Iterable[Message]) -> dict[str, int]:
    """``message_id -> dst_node_id`` of the messages sent this round.

    Flower's grids give a message its id when they push it
    (``Grid.push_messages``: a UUID in the in-memory grid of the simulation,
    the message's object id in the SuperLink's), writing it into the very
    Message objects the strategy returned; so the map is read from those
    objects once ``send_and_receive`` has pushed them. Messages without an id
    (a grid that assigns none, as test grids) are left out.
    """
    return {
        message.metadata.message_id: message.metadata.dst_node_id
        for message in messages
        if message.metadata.message_id
    }


def reply_node(reply: Message, destinations: Mapping[str, int]) -> int:
    """The node a reply stands for: the destination of the message it answers.

    A reply the SuperLink makes itself (an Error when the node died or its
    reply was lost mid-round) carries the SuperLink's id as ``src_node_id``,
    not the node's; its ``reply_to_message_id`` still names the message that
    was sent, hence the node. Without a known message id the reply's
    ``src_node_id`` is taken.
    """
    return destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def triage_replies(
    replies: Iterable[Message], sent: Sequence[Message], check: Callable[[Message], ReplyT]
) -> tuple[list[ReplyT], dict[int, str], int]:
    """Check every reply; name the node behind each bad one and each message left unanswered.

    Parameters
    ----------
    replies : iterable of Message
        What ``send_and_receive`` returned.
    sent : sequence of Message
        The messages of the round, as pushed by the grid (with their ids).
    check : callable
        Validates one reply, raising :class:`~strategies.validation.InvalidReply`.

    Returns
    -------
    tuple
        ``(accepted, failures, num_rejected)``: the checked replies, the reason
        per failed node id (:func:`reply_node`; :data:`NO_REPLY` for a node sent
        a message that did not answer) and the number of replies rejected.
    """
    destinations = message_destinations(sent)
    accepted: list[ReplyT] = []
    failures: dict[int, str] = {}
    answered: set[int] = set()
    rejected = 0
    for message in replies:
        node = reply_node(message, destinations)
        answered.add(node)
        try:
            accepted.append(check(message))
        except InvalidReply as reason:
            rejected += 1
            failures[node] = str(reason)
    for message in sent:
        if message.metadata.dst_node_id not in answered:
            failures[message.metadata.dst_node_id] = NO_REPLY
    return accepted, failures, rejected


def log_failures(
    server_round: int, kind: str, failures: Mapping[int, str], num_used: int, num_sent: int
) -> None:
    """One WARNING naming every failed node and why, e.g.

    ``Round 3: no valid train reply from node(s) 1234 (error reply: ...); going on
    with 1 of 2 replies``. Nothing when there is no failure.
    """
    if not failures:
        return
    log(
        WARNING,
        "Round %d: no valid %s reply from node(s) %s; going on with %d of %d replies",
        server_round,
        kind,
        ", ".join(f"{node} ({reason})" for node, reason in failures.items()),
        num_used,
        max(num_sent, num_used + len(failures)),
    )


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
    non-positive ``num-examples``); a bad reply is dropped and the round goes
    on with the rest. Each round, one WARNING names every sampled node whose
    reply was not used, with the reason (an error reply, the check it failed,
    or no reply before the timeout), e.g. ``Round 3: no valid train reply from
    node(s) 1234 (error reply: ...); going on with 1 of 2 replies``; replies are
    matched to the nodes they were sent to by message id, so an error made by
    the SuperLink for a dead node still names that node (:func:`reply_node`).
    The same failures are in :attr:`last_failures`. When no reply is left the
    global model stays as it was.

    The NaN/Inf check runs inside the averaging pass
    (:func:`~strategies.aggregation.finite_weighted_mean`): each reply byte is
    read from memory once per round.

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
    aggregator : AggregationStage | None (default: None)
        How the round's valid replies become the averaged model
        (:mod:`strategies.stages`); ``None`` is FedAvg's example-weighted mean
        (:class:`~strategies.stages.WeightedMean`). DP-FedAvg is this loop
        with :class:`~strategies.dp_aggregation.DPAggregation`; robust
        aggregators are in :mod:`strategies.robust`.
    report_clients : bool (default: False)
        Measure every valid reply's update norm and cosine similarity to the
        aggregate (:mod:`strategies.anomaly`; one more pass over the replies),
        into :attr:`last_client_figures` and the round report. Never done
        for a stage whose per-client figures must not be released (DP-FedAvg).
    secure_aggregation : SecAggPlus | None (default: None)
        Run each round's training through SecAgg+
        (:mod:`strategies.secure_aggregation`): the server receives masked
        vectors and learns only their sum, which the stage turns into the
        averaged model (:meth:`WeightedMean.aggregate_secure`,
        DP-FedAvg's noise on the sum). Needs a stage that works on a sum
        (not the robust ones) and no per-client report.
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
        aggregator: AggregationStage | None = None,
        report_clients: bool = False,
        secure_aggregation: SecAggPlus | None = None,
    ) -> None:
        self.aggregator: AggregationStage = WeightedMean() if aggregator is None else aggregator
        if secure_aggregation is not None and not isinstance(
            self.aggregator, SecureAggregationStage
        ):
            raise ValueError(
                f"{self.aggregator!r} needs each client's update; secure aggregation gives "
                "the server only their sum"
            )
        self.secure_aggregation = secure_aggregation
        #: The last secure round's outcome (secure aggregation only).
        self.last_secure_round: SecureSum | None = None
        self.report_clients = report_clients and self.aggregator.per_client_report
        #: Every valid reply's norm and cosine to the aggregate, last round (report_clients).
        self.last_client_figures: list[ClientFigures] = []
        #: The stage's figures of the last aggregated round (DP: epsilon ...).
        self.last_aggregation_metrics: dict[str, float] = {}
        # (server_round, connected nodes): one listing per round for the stop
        # check and the sample, so both see the same N.
        self._round_nodes: tuple[int, list[int]] | None = None
        self._round_skipped = False
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes if fraction_evaluate > 0 else 0
        self.node_wait_timeout = node_wait_timeout
        # Seeds what is not privacy-relevant: FedAvg's sampling, evaluation
        # sampling. A DP stage draws its sample from secret randomness instead.
        self.rng = np.random.default_rng(seed)
        self._sent_specs: dict[str, ArraySpec] = {}
        self._sent_arrays: dict[str, np.ndarray] = {}
        self.last_num_sampled = 0
        self.last_num_rejected = 0
        #: node id -> why its train reply of the last round was not used.
        self.last_failures: dict[int, str] = {}
        # The messages of the current round, whose ids the grid fills in when it pushes them.
        self._train_messages: list[Message] = []
        self._evaluate_messages: list[Message] = []
        self.stop_reason: str | None = None
        self.server_optimizer = server_optimizer
        self.server_update_fn = server_update_fn

    def summary(self, num_rounds: int | None = None) -> None:
        """Log the strategy's settings (one line, then the aggregator's)."""
        log(
            INFO,
            "%s%s: fraction-train %.2f (min %d nodes), fraction-evaluate %.2f (min %d), "
            "node wait %.0f s",
            self.__class__.__name__,
            "" if num_rounds is None else f" for {num_rounds} rounds",
            self.fraction_train,
            self.min_train_nodes,
            self.fraction_evaluate,
            self.min_evaluate_nodes,
            self.node_wait_timeout,
        )
        self.aggregator.summary()
        if self.secure_aggregation is not None:
            self.secure_aggregation.summary()
        if self.server_optimizer is not None:
            log(INFO, "%s: server optimiser %r", self.__class__.__name__, self.server_optimizer)
        if self.server_update_fn is not None:
            log(
                INFO,
                "%s: server-side update after aggregation: %r",
                self.__class__.__name__,
                self.server_update_fn,
            )

    def connected_nodes(self, server_round: int, grid: Grid | None) -> list[int]:
        """The nodes connected for round ``server_round`` (listed once per round).

        Without a grid, the nodes listed last.
        """
        if self._round_nodes is not None and self._round_nodes[0] == server_round:
            return self._round_nodes[1]
        if grid is None:
            if self._round_nodes is None:
                raise RuntimeError("no grid to count the connected nodes")
            return self._round_nodes[1]
        nodes = wait_for_nodes(grid, self.min_train_nodes, self.node_wait_timeout)
        self._round_nodes = (server_round, nodes)
        return nodes

    def should_stop(self, server_round: int, grid: Grid | None = None) -> str | None:
        """Why round ``server_round`` must not start, or ``None`` to run it.

        The aggregation stage decides (DP-FedAvg stops before a round that
        would exceed its privacy budget); plain FedAvg always runs. Checked at
        the top of every round and again by :meth:`configure_train`.
        """
        return self.aggregator.stop_reason(server_round, self.connected_nodes(server_round, grid))

    # ------------------------------------------------------------------ sampling
    def sample_train_nodes(self, grid: Grid, server_round: int = 0) -> list[int]:
        """The nodes that train this round: the stage's sample, or a uniform one."""
        nodes = self.connected_nodes(server_round, grid)
        chosen = self.aggregator.sample(server_round, nodes, self.rng)
        if chosen is not None:
            return chosen
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
        """Sample nodes and send each the global arrays and the train config.

        Sends nothing for a round the stage stops (a privacy budget).
        """
        reason = self.should_stop(server_round, grid)
        self._round_skipped = reason is not None
        if reason is not None:
            self.stop_reason = reason
            self.last_num_sampled = 0
            self._train_messages = []
            self._round_nodes = None
            log(WARNING, "Round %d not run: %s", server_round, reason)
            return []
        nodes = self.sample_train_nodes(grid, server_round)
        self._round_nodes = None  # the next round lists the nodes afresh
        self.last_num_sampled = len(nodes)
        self._sent_specs = array_specs(arrays)
        self._sent_arrays = to_numpy(arrays)
        config = ConfigRecord(dict(config))
        config.update(self.aggregator.client_config(server_round))
        config[protocol.SERVER_ROUND] = server_round
        log(DEBUG, "configure_train: sampled %d nodes", len(nodes))
        self._train_messages = self._messages(arrays, config, nodes, MessageType.TRAIN)
        return self._train_messages

    def accept_train_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> list[TrainReply]:
        """Validate every reply (all but NaN/Inf, checked while averaging); drop the bad ones.

        Starts the round's :attr:`last_failures`: the node of every bad reply
        (found by message id, :func:`reply_node`) and every node sent a message
        this round that did not reply.
        """
        accepted, self.last_failures, self.last_num_rejected = triage_replies(
            replies,
            self._train_messages,
            lambda message: check_train_reply(message, self._sent_specs, check_finite=False),
        )
        return accepted

    def aggregate_replies(
        self, server_round: int, replies: Sequence[TrainReply]
    ) -> tuple[dict[str, np.ndarray] | None, list[TrainReply]]:
        """The stage's averaged model of the replies, and the replies in it.

        Replies the stage leaves out are counted in :attr:`last_num_rejected`
        and recorded in :attr:`last_failures`; the stage's figures go to
        :attr:`last_aggregation_metrics`.
        """
        result = self.aggregator.aggregate(server_round, replies, self._sent_arrays)
        for node, reason in result.rejected.items():
            self.last_num_rejected += 1
            self.last_failures[node] = reason
        self.last_aggregation_metrics = dict(result.metrics)
        self.last_client_figures = []
        if self.report_clients and result.arrays is not None:
            valid = [reply for reply in replies if reply.node_id not in result.rejected]
            self.last_client_figures = (
                result.client_figures
                if result.client_figures is not None
                else client_figures(valid, self._sent_arrays, result.arrays, result.down_weighted)
            )
            log(DEBUG, "Round %d clients: %s", server_round,
                summary_line(self.last_client_figures))
        return result.arrays, result.used

    def aggregate_arrays(
        self, server_round: int, replies: list[TrainReply]
    ) -> dict[str, np.ndarray] | None:
        """The new global arrays: the stage's aggregate after the server step.

        ``None`` if the stage keeps the global model (no usable reply).
        """
        averaged, _ = self.aggregate_replies(server_round, replies)
        return None if averaged is None else self.server_step(server_round, averaged)

    def log_train_failures(self, server_round: int, num_used: int) -> None:
        """One WARNING naming every node of :attr:`last_failures` and why (:func:`log_failures`).

        ``num_used`` is how many replies the round goes on with.
        """
        log_failures(
            server_round, "train", self.last_failures, num_used, len(self._train_messages)
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
        elif any(
            key in self._sent_arrays and value.dtype != self._sent_arrays[key].dtype
            for key, value in arrays.items()
        ):  # a stage that averages in float64 (DP) releases in the model's dtypes
            arrays = {
                key: value.astype(self._sent_arrays[key].dtype)
                if key in self._sent_arrays
                else value
                for key, value in arrays.items()
            }
        if self.server_update_fn is not None:
            arrays = self.server_update_fn(server_round, arrays)
        return arrays

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the valid replies (the stage), then the server step; average the metrics.

        The stage's aggregate goes through :meth:`server_step` (server
        optimiser, server-side update). A round :meth:`configure_train` did
        not run returns nothing.
        """
        replies = list(replies)
        if self._round_skipped:
            self.last_num_rejected = 0
            self.last_aggregation_metrics = {}
            self.last_client_figures = []
            return None, None
        accepted = self.accept_train_replies(server_round, replies)
        mean, accepted = self.aggregate_replies(server_round, accepted)
        self.log_train_failures(server_round, len(accepted))
        if mean is None:
            log(
                WARNING,
                "Round %d: no valid train reply; the global model stays unchanged",
                server_round,
            )
            return None, None
        arrays = self.server_step(server_round, mean)
        metrics = (
            weighted_metrics(
                [reply.metrics for reply in accepted],
                [reply.num_examples for reply in accepted],
            )
            if accepted
            else {}
        )
        return to_arrayrecord(arrays), MetricRecord(metrics)

    def secure_train(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        timeout: float,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Train through SecAgg+: sample, run the protocol, let the stage turn the sum into a model.

        A voided secure round (too few survivors) leaves the model unchanged
        and releases nothing; its figures (``secagg-voided`` 1) still go to
        :attr:`last_aggregation_metrics`.
        """
        assert self.secure_aggregation is not None
        stage = self.aggregator
        assert isinstance(stage, SecureAggregationStage)
        self.last_secure_round = None
        self.last_client_figures = []
        self.last_aggregation_metrics = {}
        messages = list(self.configure_train(server_round, arrays, config, grid))
        if self._round_skipped or not messages:
            self.last_num_rejected = 0
            self.last_failures = {}
            return None, None
        nodes = [message.metadata.dst_node_id for message in messages]
        num_parameters = sum(int(value.size) for value in self._sent_arrays.values())
        spec = stage.secure_vector_spec(
            server_round, self.secure_aggregation.parameters, num_parameters, len(nodes)
        )
        result = self.secure_aggregation.run(
            grid, server_round, messages[0].content, nodes, spec,
            spec.length(num_parameters), timeout,
            min_survivors=stage.min_survivors(self.secure_aggregation.parameters, len(nodes)),
        )
        self.last_secure_round = result
        self.last_failures = dict(result.failures)
        self.last_num_rejected = sum(
            1 for reason in result.failures.values() if "no reply" not in reason
        )
        log_failures(server_round, "secure-aggregation", self.last_failures,
                     len(result.contributors), len(nodes))
        if result.total is None:
            self.last_aggregation_metrics = secure_round_metrics(result)
            stage.void_secure(server_round)
            return None, None
        aggregate = stage.aggregate_secure(
            server_round, decode(result.total, spec, num_parameters), spec,
            len(result.contributors), self._sent_arrays,
        )
        self.last_aggregation_metrics = {**aggregate.metrics, **secure_round_metrics(result)}
        if aggregate.arrays is None:
            return None, None
        new_arrays = self.server_step(server_round, aggregate.arrays)
        return to_arrayrecord(new_arrays), MetricRecord(aggregate.train_metrics)

    # ---------------------------------------------------------------- evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes for federated evaluation of the global arrays."""
        if self.fraction_evaluate == 0.0:
            self._evaluate_messages = []
            return []
        nodes = wait_for_nodes(grid, self.min_evaluate_nodes, self.node_wait_timeout)
        size = min(
            sample_size(len(nodes), self.fraction_evaluate, self.min_evaluate_nodes),
            len(nodes),
        )
        config = ConfigRecord(dict(config))
        config[protocol.SERVER_ROUND] = server_round
        chosen = sample_without_replacement(nodes, size, self.rng)
        self._evaluate_messages = self._messages(arrays, config, chosen, MessageType.EVALUATE)
        return self._evaluate_messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the valid evaluation replies' metrics.

        Failed and missing nodes are named as for training (:func:`log_failures`).
        """
        accepted, failures, _ = triage_replies(
            replies, self._evaluate_messages, check_evaluate_reply
        )
        log_failures(
            server_round, "evaluate", failures, len(accepted), len(self._evaluate_messages)
        )
        if not accepted:
            return None
        return MetricRecord(
            weighted_metrics(
                [reply.metrics for reply in accepted],
                [reply.num_examples for reply in accepted],
            )
        )

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What must survive a restart: the sampler's generator, the stage, the optimiser.

        JSON-ready values, except the optimiser's moments (numpy arrays under
        ``"server-optimizer"``). No privacy-relevant random state is in it: a
        DP stage has none to give.
        """
        state: dict[str, Any] = {
            "strategy": type(self).__name__,
            "rng": generator_state(self.rng),
            "aggregator": self.aggregator.state_dict(),
        }
        if self.server_optimizer is not None:
            state["server-optimizer"] = self.server_optimizer.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into a freshly built strategy of the same settings.

        Raises
        ------
        ValueError
            If the state is of another strategy, or the optimiser presence differs.
        """
        name = type(self).__name__
        if state.get("strategy") != name:
            raise ValueError(f"state was written by {state.get('strategy')!r}, this is {name}")
        if (self.server_optimizer is None) != ("server-optimizer" not in state):
            raise ValueError(
                "state and strategy differ in having a server optimiser (state: "
                f"{state.get('server-optimizer', {}).get('name')!r}, strategy: "
                f"{getattr(self.server_optimizer, 'name', None)!r})"
            )
        restore_generator(self.rng, state["rng"])
        self.aggregator.load_state_dict(state.get("aggregator", {}))
        if self.server_optimizer is not None:
            self.server_optimizer.load_state_dict(state["server-optimizer"])

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
        self.summary(num_rounds)
        first = max(start_round, 1)
        self.aggregator.on_start(self.connected_nodes(first, grid), first, num_rounds)
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
            if self.secure_aggregation is None:
                replies = grid.send_and_receive(
                    messages=self.configure_train(server_round, arrays, train_config, grid),
                    timeout=timeout,
                )
                replies = list(replies)
                new_arrays, train_metrics = self.aggregate_train(server_round, replies)
                report.num_accepted = len(replies) - self.last_num_rejected
            else:
                new_arrays, train_metrics = self.secure_train(
                    server_round, arrays, train_config, grid, timeout
                )
                secure = self.last_secure_round
                report.num_accepted = 0 if secure is None else len(secure.contributors)
            report.num_sampled = self.last_num_sampled
            report.num_rejected = self.last_num_rejected
            report.aggregation_metrics = dict(self.last_aggregation_metrics)
            report.client_figures = [f.as_dict() for f in self.last_client_figures]
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
            log(DEBUG, "\t%s", line.rstrip("\n"))
        return result
