"""Issue #9: a failed or missing client is named in the log by its node id, not the SuperLink's.

When a SuperNode dies mid-round, the SuperLink answers the pending message
itself: an Error reply whose ``src_node_id`` is the SuperLink's (1) and whose
``reply_to_message_id`` is the id the grid gave the message when it pushed it.
The strategies map message ids back to the nodes they were sent to.
"""

from __future__ import annotations

import logging
import uuid

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from strategies.dp_fedavg import DPFedAvg
from strategies.fedavg import NO_REPLY, FedAvg, message_destinations, reply_node, to_arrayrecord
from tests.messages import set_task_identity

DEAD, SILENT, ALIVE = 1234, 5678, 42


pytestmark = pytest.mark.usefixtures("task_identity")


def model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


class Grid:
    """A grid that pushes like Flower's (it writes a message id into every message sent).

    ``ALIVE`` trains (+1 on every weight), ``DEAD`` is answered by the SuperLink
    with Flower's own "Node Unavailable" error, ``SILENT`` never answers.
    """

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as push_messages does
            node = message.metadata.dst_node_id
            if node == DEAD:
                replies.append(
                    create_message_error_unavailable_res_message(message.metadata, "node_unavail")
                )
            elif node != SILENT:
                replies.append(Message(self._content(message), reply_to=message))
        return replies

    @staticmethod
    def _content(message: Message) -> RecordDict:
        metrics = MetricRecord({"num-examples": 10, "train-loss": 0.5, "eval-loss": 0.5})
        if message.metadata.message_type != MessageType.TRAIN:
            return RecordDict({"metrics": metrics})
        arrays = message.content.array_records["arrays"]
        updated = {k: v.numpy() + 1.0 for k, v in arrays.items()}
        return RecordDict({"arrays": to_arrayrecord(updated), "metrics": metrics})


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def train_round(strategy: FedAvg, nodes: list[int], server_round: int = 3):
    grid = Grid(nodes)
    arrays = to_arrayrecord(model())
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    return strategy.aggregate_train(server_round, replies), replies


def test_a_superlink_error_reply_is_mapped_to_the_dead_node() -> None:
    sent = Message(RecordDict(), dst_node_id=DEAD, message_type=MessageType.TRAIN)
    sent.metadata.__dict__["_message_id"] = "m-1"
    error = create_message_error_unavailable_res_message(sent.metadata, "node_unavail")
    assert error.metadata.src_node_id == SUPERLINK_NODE_ID  # what the logs used to name
    assert message_destinations([sent]) == {"m-1": DEAD}
    assert reply_node(error, message_destinations([sent])) == DEAD
    assert reply_node(error, {}) == SUPERLINK_NODE_ID  # no id known: the sender, as before


def test_error_reply_from_the_superlink_names_the_node_and_the_round(caplog) -> None:
    strategy = FedAvg(min_train_nodes=2, fraction_evaluate=0.0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        (arrays, _), replies = train_round(strategy, [ALIVE, DEAD])
    assert any(r.metadata.src_node_id == SUPERLINK_NODE_ID for r in replies)
    (line,) = [w for w in warnings(caplog) if "no valid train reply from" in w]
    assert line.startswith(f"Round 3: no valid train reply from node(s) {DEAD} (error reply: ")
    assert "Node Unavailable" in line and line.endswith("going on with 1 of 2 replies")
    assert f" {SUPERLINK_NODE_ID} (" not in line
    assert set(strategy.last_failures) == {DEAD} and strategy.last_num_rejected == 1
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0)  # the round went on with the live node


def test_a_node_that_never_replies_is_named(caplog) -> None:
    strategy = FedAvg(min_train_nodes=3, fraction_evaluate=0.0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        (arrays, _), _ = train_round(strategy, [ALIVE, DEAD, SILENT], server_round=2)
    (line,) = [w for w in warnings(caplog) if "no valid train reply from" in w]
    assert line.startswith("Round 2: no valid train reply from node(s) ")
    assert f"{DEAD} (error reply: " in line and f"{SILENT} ({NO_REPLY})" in line
    assert line.endswith("going on with 1 of 3 replies")
    assert strategy.last_failures[SILENT] == NO_REPLY
    assert strategy.last_num_rejected == 1  # a missing reply is not a rejected one
    np.testing.assert_allclose(arrays["b"].numpy(), 1.0)


def test_a_reply_holding_nan_is_named_after_the_fused_check(caplog) -> None:
    strategy = FedAvg(min_train_nodes=2, fraction_evaluate=0.0)
    grid = Grid([ALIVE, 7])
    messages = list(strategy.configure_train(1, to_arrayrecord(model()), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    bad = next(r for r in replies if r.metadata.src_node_id == 7)
    bad.content["arrays"] = to_arrayrecord({"w": np.full((3, 2), np.nan, np.float32),
                                            "b": np.zeros(2, np.float32)})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert "Round 1: no valid train reply from node(s) 7 (arrays hold NaN or Inf); going on " \
           "with 1 of 2 replies" in warnings(caplog)
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0)
    assert strategy.last_num_rejected == 1 and metrics["train-loss"] == 0.5


def test_nothing_is_logged_when_every_node_replies(caplog) -> None:
    strategy = FedAvg(min_train_nodes=2, fraction_evaluate=0.0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        train_round(strategy, [ALIVE, 43])
    assert warnings(caplog) == [] and strategy.last_failures == {}


def test_whole_run_names_failed_nodes_in_training_and_evaluation(caplog) -> None:
    strategy = FedAvg(min_train_nodes=3, min_evaluate_nodes=3)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.start(Grid([ALIVE, DEAD, SILENT]), to_arrayrecord(model()), num_rounds=2)
    lines = warnings(caplog)
    for server_round in (1, 2):
        for kind in ("train", "evaluate"):
            (line,) = [w for w in lines if w.startswith(f"Round {server_round}: no valid {kind}")]
            assert f"{DEAD} (error reply: " in line and f"{SILENT} ({NO_REPLY})" in line, line
            assert line.endswith("going on with 1 of 3 replies"), line


def test_dp_fedavg_inherits_the_naming(caplog) -> None:
    strategy = DPFedAvg(
        noise_multiplier=0.0,
        clipping_norm=100.0,
        client_sampling="fixed",
        fraction_train=1.0,
        min_train_nodes=3,
        fraction_evaluate=0.0,
    )
    with caplog.at_level(logging.WARNING, logger="flwr"):
        (arrays, _), _ = train_round(strategy, [ALIVE, DEAD, SILENT], server_round=4)
    (line,) = [w for w in warnings(caplog) if "no valid train reply from" in w]
    assert line.startswith("Round 4: no valid train reply from node(s) ")
    assert f"{DEAD} (error reply: " in line and f"{SILENT} ({NO_REPLY})" in line
    assert line.endswith("going on with 1 of 3 replies")
    # DP semantics are untouched: the two missing clients count as zero over m = 3.
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0 / 3, rtol=1e-6)
    assert strategy.last_round_privacy["num-contributing"] == 1


def test_dp_fedavg_names_updates_it_rejects(caplog) -> None:
    strategy = DPFedAvg(
        noise_multiplier=0.0,
        clipping_norm=1.0,
        clipping_side="client",
        client_sampling="fixed",
        fraction_train=1.0,
        min_train_nodes=2,
        fraction_evaluate=0.0,
    )
    with caplog.at_level(logging.WARNING, logger="flwr"):
        train_round(strategy, [ALIVE, DEAD], server_round=5)  # ALIVE's update (norm 2.8) > C
    (line,) = [w for w in warnings(caplog) if "no valid train reply from" in w]
    assert f"{ALIVE} (update rejected, counts as zero: update norm" in line
    assert f"{DEAD} (error reply: " in line
    assert line.endswith("going on with 0 of 2 replies")
