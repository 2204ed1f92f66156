"""SecAgg+ rounds in this process without TensorFlow: clients whose 'training' returns fixed arrays.

``SecureGrid`` plays Flower's grid; each node's stand-in ClientApp answers the
key stages with the real client code (:mod:`clients.secure_aggregation`) and
the collect stage by masking a given local model. Nodes can be made to drop
(no reply) from a named stage on, and every message either way is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients import secure_aggregation as client
from strategies import protocol
from strategies.fedavg import to_arrayrecord
from tests.messages import set_task_identity

#: Stages in protocol order.
ORDER = list(protocol.SECAGG_STAGES)


class SecureGrid:
    """Delivers messages to stand-in clients; drops nodes from chosen stages on."""

    def __init__(
        self,
        local: Mapping[int, Mapping[str, np.ndarray]],
        num_examples: Mapping[int, int],
        drop_from: Mapping[int, str] | None = None,
        tamper: Callable[[int, str, Message], Message] | None = None,
    ) -> None:
        set_task_identity()
        self.local = local
        self.num_examples = num_examples
        self.drop_from = dict(drop_from or {})
        self.tamper = tamper
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
            for node in local
        }
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def _dropped(self, node: int, stage: str) -> bool:
        start = self.drop_from.get(node)
        return start is not None and ORDER.index(stage) >= ORDER.index(start)

    def handle(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        context = self.contexts[node]
        stage = client.is_secure_stage(msg)
        assert stage is not None
        if stage != protocol.SECAGG_COLLECT:
            return client.handle_key_stage(stage, msg, context)
        try:
            plan = client.receive_shares(msg, context)
            global_arrays = {k: v.numpy() for k, v in msg.content[protocol.ARRAYS].items()}
            return client.masked_reply(
                msg, context, plan, self.local[node], global_arrays, self.num_examples[node]
            )
        except client.SecAggRefused as error:
            return client.refusal(msg, str(error))

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            stage = str(msg.content[protocol.CONFIG][protocol.SECAGG_STAGE])
            if self._dropped(node, stage):
                continue
            reply = self.handle(msg)
            if self.tamper is not None:
                reply = self.tamper(node, stage, reply)
            replies.append(reply)
        self.received.extend(replies)
        return replies


def train_content(global_arrays: Mapping[str, np.ndarray]) -> RecordDict:
    """The content FedAvg would send: arrays and a train config."""
    return RecordDict(
        {
            protocol.ARRAYS: to_arrayrecord(dict(global_arrays)),
            protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1}),
        }
    )


def masked_vectors(grid: SecureGrid) -> dict[int, np.ndarray]:
    """Every masked vector the server received, by node."""
    out = {}
    for reply in grid.received:
        if reply.has_content() and protocol.SECAGG_MASKED in reply.content:
            record = reply.content[protocol.SECAGG_MASKED]
            assert isinstance(record, ArrayRecord)
            out[reply.metadata.src_node_id] = record[protocol.SECAGG_MASKED].numpy()
    return out
