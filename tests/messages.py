"""Real Flower Messages for tests, outside a running app."""

from __future__ import annotations

from flwr.app import Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity


def set_task_identity(run_id: int = 1, node_id: int = 1, task_id: int = 1) -> None:
    """Messages can only be created inside a task; tests pretend to be one."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


def instruction(content: RecordDict, node_id: int, kind: str = MessageType.TRAIN) -> Message:
    """A server-to-client message, as the strategy sends it."""
    set_task_identity()
    return Message(content=content, dst_node_id=node_id, message_type=kind)


def reply(content: RecordDict, node_id: int, kind: str = MessageType.TRAIN) -> Message:
    """A client's reply from ``node_id`` carrying ``content``."""
    return Message(content=content, reply_to=instruction(RecordDict(), node_id, kind))


def error_reply(reason: str, node_id: int, kind: str = MessageType.TRAIN) -> Message:
    """A client's error reply, as Flower sends when a ClientApp raised."""
    return Message(Error(code=0, reason=reason), reply_to=instruction(RecordDict(), node_id, kind))
