"""A warm client worker per SuperNode: TensorFlow, the compiled model and the data stay loaded.

Flower 1.42's SuperNode starts a fresh ``flwr-clientapp`` process for every
message, so each train and evaluate call would import TensorFlow and build and
trace the model again. The node's operator starts one long-lived worker beside
the SuperNode::

    uv run python -m app.warm_worker --socket /run/fedprivacy/node-0.sock

and names it in the SuperNode's node config (``worker-socket='/run/...sock'``).
The ClientApp (a thin shim then) hands each message and its Context to the
worker over that Unix socket and returns the worker's reply; the worker runs
exactly the in-process handler (:func:`app.client_app.train_here`,
:func:`app.client_app.evaluate_here`), so every check and every privacy
property is the same. State keeps its homes: ``Context.state`` travels with
each call and comes back updated, ``state-dir`` is on disk; a worker restart
loses nothing. When the worker is absent, dies or times out, the shim logs a
WARNING and handles the message in its own process.

Who can reach it: the socket is created 0600 in a directory the worker makes
0700, only the node's user can connect (the worker also checks the peer's uid
with ``SO_PEERCRED``), and the shim refuses a socket that another user owns
or that others could write to (a planted socket would receive the model and
the private layers' state). No network port is opened.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.logger import log

#: Node-config key naming the worker's socket (set by the node's operator).
WORKER_SOCKET_KEY = "worker-socket"
#: Seconds the shim waits for the worker's reply before handling the message itself.
DEFAULT_TIMEOUT_S = 600.0
_HEADER = struct.Struct("!Q")
_MAX_FRAME = 8 << 30  # 8 GiB: a model far beyond any here; a corrupt length is refused

Handler = Callable[[Message, Context], Message]


class WorkerUnavailable(RuntimeError):
    """The worker could not handle the message (absent, refused, died, timed out)."""


# ------------------------------------------------------------------ framing
def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise WorkerUnavailable("the connection closed mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> bytes:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if size > _MAX_FRAME:
        raise WorkerUnavailable(f"frame of {size} bytes refused")
    return _recv_exact(sock, size)


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 of this app's source (app, clients, data, privacy, strategies).

    The ClientApp runs from the FAB the SuperLink shipped, the worker from the
    node's checkout: a request whose fingerprint differs from the worker's is
    refused, and the shim handles it itself, so a stale worker never answers
    for code it does not run.
    """
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in ("app", "clients", "data", "privacy", "strategies"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _encode(kind: str, msg: Message, context: Context) -> bytes:
    from flwr.common.serde import context_to_proto, message_to_proto

    message = message_to_proto(msg).SerializeToString()
    ctx = context_to_proto(context).SerializeToString()
    head = f"{kind}:{code_fingerprint()}".encode()
    return head + b"\0" + _HEADER.pack(len(message)) + message + ctx


def _decode(payload: bytes) -> tuple[str, Message, Context]:
    from flwr.common.serde import context_from_proto, message_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=no-name-in-module
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module

    head, rest = payload.split(b"\0", 1)
    kind, _, fingerprint = head.decode().partition(":")
    if fingerprint != code_fingerprint():
        raise ValueError(
            "the ClientApp's code differs from this worker's (restart the worker after "
            "updating the app)"
        )
    (size,) = _HEADER.unpack(rest[: _HEADER.size])
    message = ProtoMessage.FromString(rest[_HEADER.size : _HEADER.size + size])
    ctx = ProtoContext.FromString(rest[_HEADER.size + size :])
    return kind, message_from_proto(message), context_from_proto(ctx)


def _encode_reply(reply: Message, context: Context) -> bytes:
    from flwr.common.serde import context_to_proto, message_to_proto

    message = message_to_proto(reply).SerializeToString()
    return _HEADER.pack(len(message)) + message + context_to_proto(context).SerializeToString()


def _decode_reply(payload: bytes) -> tuple[Message, Context]:
    from flwr.common.serde import context_from_proto, message_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=no-name-in-module
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module

    (size,) = _HEADER.unpack(payload[: _HEADER.size])
    message = ProtoMessage.FromString(payload[_HEADER.size : _HEADER.size + size])
    return message_from_proto(message), context_from_proto(
        ProtoContext.FromString(payload[_HEADER.size + size :])
    )


# ------------------------------------------------------------------ the shim's side
def check_socket_is_ours(path: Path) -> None:
    """Refuse a socket another user owns or others may write to (a planted worker)."""
    try:
        info = path.lstat()
    except FileNotFoundError as error:
        raise WorkerUnavailable(f"no worker socket at {path}") from error
    if not stat.S_ISSOCK(info.st_mode):
        raise WorkerUnavailable(f"{path} is not a socket")
    if info.st_uid != os.getuid():
        raise WorkerUnavailable(f"{path} belongs to uid {info.st_uid}, not to this node's user")
    if info.st_mode & 0o077:
        raise WorkerUnavailable(f"{path} has mode {oct(info.st_mode & 0o777)}; 0600 is required")


def forward(
    kind: str, msg: Message, context: Context, path: Path, timeout: float = DEFAULT_TIMEOUT_S
) -> Message:
    """Have the worker at ``path`` handle ``msg``; copy its updated state into ``context``.

    Raises
    ------
    WorkerUnavailable
        Whatever went wrong: the caller handles the message itself.
    """
    check_socket_is_ours(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            _send(sock, _encode(kind, msg, context))
            payload = _recv(sock)
    except (OSError, struct.error) as error:
        raise WorkerUnavailable(f"worker at {path}: {error!r}") from error
    if payload.startswith(b"ERROR\0"):
        raise WorkerUnavailable(payload[6:].decode(errors="replace"))
    reply, returned = _decode_reply(payload)
    # The state comes back whole: replace ours key by key (the same RecordDict object
    # stays in the Context that Flower hands back to the SuperNode).
    for key in list(context.state.keys()):
        del context.state[key]
    for key, value in returned.state.items():
        context.state[key] = value
    return reply


def handle(kind: str, msg: Message, context: Context, here: Handler) -> Message:
    """The ClientApp's entry: the warm worker when the node names one, else ``here``."""
    path = context.node_config.get(WORKER_SOCKET_KEY)
    if not path:
        return here(msg, context)
    try:
        reply = forward(kind, msg, context, Path(str(path)))
    except WorkerUnavailable as error:
        log(WARNING, "Node %d: warm worker unavailable (%s); handling the %s message in "
            "this process", context.node_id, error, kind)
        return here(msg, context)
    log(INFO, "Node %d: %s message handled by the warm worker at %s", context.node_id, kind, path)
    return reply


# ------------------------------------------------------------------ the worker's side
def bind_private_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600, in a directory of mode 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    parent = path.parent.stat()
    if parent.st_uid != os.getuid() or parent.st_mode & 0o022:
        raise SystemExit(
            f"{path.parent} must belong to this user and not be writable by others "
            f"(mode {oct(parent.st_mode & 0o777)})"
        )
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SystemExit(f"{path} exists and is not a socket: refusing to replace it")
        path.unlink()  # a stale socket of an earlier worker
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: no window in which others may connect
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.listen(8)
    return server


def peer_uid(conn: socket.socket) -> int:
    """The connecting process's uid (Linux ``SO_PEERCRED``)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _set_task_identity(msg: Message) -> None:
    """Messages can only be built inside a Flower task: the worker acts for the shim's task."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = msg.metadata.run_id
    TaskIdentity.node_id = msg.metadata.dst_node_id
    TaskIdentity.task_id = 1


def serve_one(conn: socket.socket, handlers: dict[str, Handler]) -> None:
    """Read one request, run its handler in this process, send the reply (or an error)."""
    with conn:
        if peer_uid(conn) != os.getuid():
            return  # only the node's own user; close without a word
        try:
            kind, msg, context = _decode(_recv(conn))
            _set_task_identity(msg)
            reply = handlers[kind](msg, context)
            _send(conn, _encode_reply(reply, context))
        except Exception as error:  # pylint: disable=broad-exception-caught
            # The shim then handles the message itself; the worker stays up.
            log(WARNING, "warm worker: %r", error)
            try:
                _send(conn, b"ERROR\0" + repr(error).encode())
            except OSError:
                pass


def serve(path: Path, handlers: dict[str, Handler], stop: threading.Event | None = None) -> None:
    """Serve requests one at a time until ``stop`` is set (or forever).

    The handlers are the in-process ones, never :func:`handle`: a worker
    does not forward.
    """
    server = bind_private_socket(path)
    server.settimeout(0.5)
    log(INFO, "warm worker listening on %s (mode 0600)", path)
    try:
        while stop is None or not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            serve_one(conn, handlers)
    finally:
        server.close()
        path.unlink(missing_ok=True)


def client_handlers() -> dict[str, Handler]:
    """The ClientApp's own in-process handlers (imports TensorFlow on first use)."""
    from app.client_app import evaluate_here, train_here

    return {"train": train_here, "evaluate": evaluate_here}


def main(argv: list[str] | None = None) -> None:
    """``python -m app.warm_worker --socket PATH``: serve until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, type=Path,
                        help="the socket path to create (its folder is made 0700)")
    parser.add_argument("--preload", action="store_true",
                        help="import TensorFlow before the first message")
    args = parser.parse_args(argv)
    from app.logs import configure

    configure()
    handlers = client_handlers()
    if args.preload:
        import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    try:
        serve(args.socket, handlers)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
