"""A whole federation in this process: the real ServerApp and ClientApp, no Ray, no SuperLink.

``InProcessGrid`` delivers each message to the ClientApp with that node's own
Context (kept across rounds, as a SuperNode keeps it) and records every reply,
so tests can inspect everything a client ever sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from tests.messages import set_task_identity
from tests.test_config import defaults


class InProcessGrid:
    """Just enough of Flower's Grid to run a strategy against in-process clients."""

    def __init__(self, client_app: ClientApp, contexts: dict[int, Context]) -> None:
        self.client_app = client_app
        self.contexts = contexts
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            try:
                reply = self.client_app(message, context)
            except Exception as error:  # pylint: disable=broad-exception-caught
                # What Flower does when a ClientApp raises.
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(error)),
                    reply_to=message,
                )
            replies.append(reply)
        self.replies.extend(replies)
        return replies


def run_config(**overrides: Any) -> dict[str, Any]:
    config = defaults()
    config.update(overrides)
    return config


def node_contexts(
    num_nodes: int, config: dict[str, Any], state_dir: Path | None = None, run_id: int = 7
) -> dict[int, Context]:
    """One Context per node, as the simulation engine would create them."""
    contexts = {}
    for partition in range(num_nodes):
        node_id = 1000 + partition
        node_config: dict[str, Any] = {"partition-id": partition, "num-partitions": num_nodes}
        if state_dir is not None:
            node_config["state-dir"] = str(state_dir / f"node-{partition}")
        contexts[node_id] = Context(
            run_id=run_id, node_id=node_id, node_config=node_config,
            state=RecordDict(), run_config=config,
        )
    return contexts


def run_federation(config: dict[str, Any], contexts: dict[int, Context]) -> InProcessGrid:
    """Run the real ServerApp main over ``contexts``; return the grid with every reply."""
    from app.client_app import app as client_app
    from app.server_app import main

    set_task_identity(run_id=next(iter(contexts.values())).run_id, node_id=1)
    grid = InProcessGrid(client_app, contexts)
    server_context = Context(
        run_id=next(iter(contexts.values())).run_id, node_id=1, node_config={},
        state=RecordDict(), run_config=config,
    )
    main(grid, server_context)
    return grid
