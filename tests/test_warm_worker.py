"""The warm client worker: same results as in-process, a private socket, a clean fallback."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from app import warm_worker
from tests.inprocess import node_contexts, run_config, run_federation


@contextmanager
def worker_thread(path: Path) -> Iterator[None]:
    """The real worker loop with the real handlers, in a thread of this process."""
    stop = threading.Event()
    thread = threading.Thread(
        target=warm_worker.serve, args=(path, warm_worker.client_handlers(), stop), daemon=True
    )
    thread.start()
    for _ in range(100):
        if path.exists():
            break
        threading.Event().wait(0.05)
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _run(tmp_path: Path, name: str, socket_path: Path | None, **overrides: object) -> dict:
    out = tmp_path / name
    config = run_config(**{"num-server-rounds": 2, "local-epochs": 1, "output-dir": str(out),
                           **overrides})
    contexts = node_contexts(2, config, state_dir=tmp_path / f"state-{name}")
    if socket_path is not None:
        for context in contexts.values():
            context.node_config[warm_worker.WORKER_SOCKET_KEY] = str(socket_path)
    run_federation(config, contexts)
    return json.loads(next(out.glob("*/metrics.json")).read_text())


def _accuracies(metrics: dict) -> list[float]:
    return [r.get("central-accuracy") for r in metrics["rounds"]]


@pytest.mark.parametrize("private_layers", ["none", "head"])
def test_a_run_through_the_worker_equals_the_run_in_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, private_layers: str
) -> None:
    """Same seeds, same data order: the warm path must not change a single figure.

    With a private head, each node's private weights live in its Context.state
    between rounds: they go to the worker and come back with every call.
    """
    sock = tmp_path / "w" / "node.sock"
    with worker_thread(sock), caplog.at_level(logging.INFO, logger="flwr"):
        warm = _run(tmp_path, "warm", sock, **{"private-layers": private_layers})
    here = _run(tmp_path, "here", None, **{"private-layers": private_layers})
    assert _accuracies(warm) == _accuracies(here)
    personal = [r.get("personalized-accuracy") for r in warm["rounds"]]
    assert personal == [r.get("personalized-accuracy") for r in here["rounds"]]
    compared = personal if private_layers == "head" else _accuracies(warm)
    assert all(value is not None for value in compared[1:])  # the figures exist
    assert [r.get("train-loss") for r in warm["rounds"]] == [
        r.get("train-loss") for r in here["rounds"]
    ]
    handled = [r for r in caplog.records if "handled by the warm worker" in r.getMessage()]
    assert len(handled) == 2 * 2 * 2  # 2 nodes x 2 rounds x (train + evaluate)
    assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"


def test_the_socket_is_created_private(tmp_path: Path) -> None:
    sock = tmp_path / "w" / "node.sock"
    with worker_thread(sock):
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        warm_worker.check_socket_is_ours(sock)  # the shim accepts it


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_connect(tmp_path: Path) -> None:
    sock = tmp_path / "w" / "node.sock"
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({str(sock)!r}); print('connected')\n"
        "except PermissionError:\n"
        "    print('refused')\n"
    )
    with worker_thread(sock):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, check=True)
    assert out.stdout.strip() == "refused"


def test_the_shim_refuses_a_socket_others_could_have_planted(tmp_path: Path) -> None:
    sock = tmp_path / "w" / "node.sock"
    with worker_thread(sock):
        os.chmod(sock, 0o666)
        with pytest.raises(warm_worker.WorkerUnavailable, match="0600 is required"):
            warm_worker.check_socket_is_ours(sock)
        if os.getuid() == 0:
            os.chmod(sock, 0o600)
            os.chown(sock, 65534, 65534)
            with pytest.raises(warm_worker.WorkerUnavailable, match="belongs to uid 65534"):
                warm_worker.check_socket_is_ours(sock)


def test_a_worker_that_dies_mid_message_falls_back_and_the_run_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 'worker' that reads the request and dies: each node handles its messages itself."""
    sock = tmp_path / "w" / "node.sock"
    server = warm_worker.bind_private_socket(sock)
    stop = threading.Event()

    def die_on_every_request() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(1024)  # then the connection drops, as a killed worker's would

    thread = threading.Thread(target=die_on_every_request, daemon=True)
    thread.start()
    try:
        with caplog.at_level(logging.WARNING, logger="flwr"):
            metrics = _run(tmp_path, "dies", sock)
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    fell_back = [r for r in caplog.records if "warm worker unavailable" in r.getMessage()]
    assert len(fell_back) == 2 * 2 * 2


def test_no_worker_at_the_path_falls_back(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="flwr"):
        metrics = _run(tmp_path, "absent", tmp_path / "nowhere" / "node.sock")
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert any("no worker socket" in r.getMessage() for r in caplog.records)


def test_a_stale_socket_is_replaced_but_a_file_is_never(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    folder.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(folder / "node.sock"))
    stale.close()  # a socket file nobody listens on, as a crashed worker leaves
    warm_worker.bind_private_socket(folder / "node.sock").close()
    (folder / "data.csv").write_text("precious")
    with pytest.raises(SystemExit, match="not a socket"):
        warm_worker.bind_private_socket(folder / "data.csv")
    assert (folder / "data.csv").read_text() == "precious"


def test_a_worker_running_other_code_is_refused_and_the_node_trains_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = tmp_path / "w" / "node.sock"
    with worker_thread(sock):
        # The shim's code (as the FAB ships it) differs from the worker's checkout.
        monkeypatch.setattr(warm_worker, "_encode", _encode_with_fingerprint("0" * 64))
        with caplog.at_level(logging.WARNING, logger="flwr"):
            metrics = _run(tmp_path, "stale", sock)
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    refused = [r for r in caplog.records if "code differs" in r.getMessage()]
    assert len(refused) >= 2 * 2 * 2  # the worker says why; every message fell back


def _encode_with_fingerprint(fingerprint: str):
    original = warm_worker._encode

    def encode(kind, msg, context):  # type: ignore[no-untyped-def]
        payload = original(kind, msg, context)
        head, rest = payload.split(b"\0", 1)
        return head.split(b":")[0] + b":" + fingerprint.encode() + b"\0" + rest

    return encode


# ------------------------------------------------------------------ in a real deployment
@pytest.mark.e2e
def test_a_deployed_run_uses_the_warm_workers_and_survives_one_killed_mid_run(
    tmp_path: Path,
) -> None:
    """TLS + auth deployment, 2 SuperNodes each with a worker; worker 0 dies after round 1.

    Node 1 stays warm throughout; node 0's later messages fall back to its own
    flwr-clientapp process and the run completes, without waiting for any timeout.
    """
    import time

    from tests.deploy_harness import finish, loopback_deployment, only_run_metrics, wait_for_log

    outputs = tmp_path / "outputs"
    with loopback_deployment(tmp_path / "deployment", num_supernodes=2,
                             warm_workers=True) as deployment:
        workers = {p.name: p for p in deployment.processes if p.name.startswith("worker-")}
        assert set(workers) == {"worker-0", "worker-1"}
        for index in (0, 1):
            sock = deployment.worker_socket(index)
            assert oct(sock.stat().st_mode & 0o777) == "0o600"
            config = deployment.supernodes[index].process.command  # type: ignore[union-attr]
            assert f"worker-socket='{sock}'" in config[config.index("--node-config") + 1]
        started = time.monotonic()
        run = deployment.start_run(
            "num-server-rounds=3 local-epochs=1 fraction-evaluate=0.0 min-evaluate-nodes=0 "
            f"round-timeout=120 output-dir='{outputs}'",
            log_path=tmp_path / "run.log",
        )
        wait_for_log(run, r"\[round 1/3\]", 400)
        workers["worker-0"].kill()
        code = finish(run, timeout=400)
        elapsed = time.monotonic() - started
        logs = [slot.process.log_text() for slot in deployment.supernodes]  # type: ignore[union-attr]
    log = run.log_text()
    assert code == 0, log[-4000:]
    rounds = only_run_metrics(outputs, log)["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(r["num-accepted"] == 2 for r in rounds[1:]), rounds
    assert logs[1].count("handled by the warm worker") == 3  # every train message of node 1
    assert logs[0].count("handled by the warm worker") >= 1  # round 1, before the kill
    assert "warm worker unavailable" in logs[0]
    assert elapsed < 400
    print(f"\n[warm worker deployment] 3 rounds in {elapsed:.1f} s")
