"""Run the app with `flwr run` against a SuperLink this test starts and stops itself.

The SuperLink gets its own FLWR_HOME and free loopback ports, so a test never
touches the user's ~/.flwr or a SuperLink they have running, and every process
it starts is stopped afterwards: its process group, and every session and
group its descendants started (found through /proc), never anything else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deploy.local_deploy import ProcInfo, descendants, process_table

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"flower-superlink did not listen on {port} within {timeout} s")


class SpawnedProcesses:
    """Every process that a started process spawned, found by walking /proc.

    Ours are: the root (started in a session of its own), its descendants, and
    every member of a session or process group that one of them led or
    belonged to. ``flower-superlink`` starts ``flower-superexec`` with
    ``setsid``, a session of its own, and superexec starts
    ``flwr-simulation``/``flwr-serverapp``; if superexec dies first, those are
    re-parented away from our tree but keep its session, so the session (seen
    while they were still descendants) identifies them. A background thread
    refreshes what is known every ``interval`` seconds while the root runs.

    The pytest process's own session and group are never included, and a
    process is only ever taken as ours through the root's tree, so an
    unrelated Flower process on the machine is never signalled.
    """

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self.root = root
        self.sessions = {root}
        self.groups = {root}
        self._own = {os.getsid(0), os.getpgrp()}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._watcher = threading.Thread(
            target=self._watch, args=(interval,), name=f"watch-{root}", daemon=True
        )
        self._watcher.start()

    def _watch(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            self.refresh()

    def refresh(self) -> list[ProcInfo]:
        """Learn the sessions and groups of the tree now; return our live processes."""
        table = process_table()
        with self._lock:
            tree = descendants(self.root, table)
            if self.root in table:
                tree.append(table[self.root])
            for info in tree:
                if info.sid not in self._own:
                    self.sessions.add(info.sid)
                if info.pgid not in self._own:
                    self.groups.add(info.pgid)
            return [
                info for info in table.values()
                if info.state != "Z" and info.pid != os.getpid()
                and info.sid not in self._own and info.pgid not in self._own
                and (info.sid in self.sessions or info.pgid in self.groups)
            ]

    def kill(self, sig: int) -> list[ProcInfo]:
        """Send ``sig`` to every known group and every process of ours; return those."""
        members = self.refresh()
        with self._lock:
            groups = sorted(self.groups)
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for info in members:
            try:
                os.kill(info.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return members

    def close(self) -> None:
        """Stop the background refresh."""
        self._stopped.set()
        self._watcher.join(timeout=5)


def _stop(process: subprocess.Popen, spawned: SpawnedProcesses | None = None) -> list[str]:
    """Stop the SuperLink and everything it spawned; return what outlived SIGKILL.

    SIGTERM goes to the SuperLink's process group first (a clean shutdown);
    then SIGKILL to every group and session it spawned, including
    flower-superexec's (a session of its own) and the ``flwr-simulation``
    processes that would otherwise be orphaned.
    """
    spawned = spawned or SpawnedProcesses(process.pid)
    spawned.refresh()
    try:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        spawned.kill(signal.SIGKILL)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process in D state
            pass
        deadline = time.monotonic() + 10
        while left := spawned.kill(signal.SIGKILL):
            if time.monotonic() > deadline:
                return [f"{info.pid}:{info.name}" for info in left]
            time.sleep(0.1)
        return []
    finally:
        spawned.close()


@contextmanager
def simulation_superlink(
    flwr_home: Path,
    num_supernodes: int,
    dependency_install: bool = False,
    extra_env: dict[str, str] | None = None,
    client_cpus: float | None = None,
) -> Iterator[dict[str, str]]:
    """Start a simulation SuperLink; yield the environment for `flwr` commands.

    ``extra_env`` goes to the SuperLink's environment only (e.g. ``RAY_ADDRESS``,
    which the simulation runtime's ``ray.init()`` follows); ``client_cpus`` sets
    the simulation backend's ``client-resources.num-cpus``.
    """
    # Flower 1.42 serves the Control, Runtime and Fleet APIs on one HTTP port.
    port = free_port()
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        "[superlink]\n"
        'default = "test"\n\n'
        "[superlink.test]\n"
        f'address = "127.0.0.1:{port}"\n'
        "insecure = true\n\n"
        "[superlink.test.options]\n"
        f"num-supernodes = {num_supernodes}\n"
        + (
            ""
            if client_cpus is None
            else f"\n[superlink.test.options.backend.client-resources]\nnum-cpus = {client_cpus}\n"
        )
    )
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_DISABLE_UPDATE_CHECK="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    command = [
        str(BIN / "flower-superlink"), "--insecure", "--simulation",
        "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(port),
        "--log-file", str(flwr_home / "superlink.log"),
    ]
    command.append(
        "--allow-runtime-dependency-installation"
        if dependency_install
        else "--disable-runtime-dependency-installation"
    )
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        command, env=dict(env, **(extra_env or {})), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    spawned = SpawnedProcesses(process.pid)
    try:
        _wait_for_port(port, process, timeout=60)
        yield env
    finally:
        left = _stop(process, spawned)
        if left:
            warnings.warn(f"processes the SuperLink spawned outlived SIGKILL: {left}",
                          RuntimeWarning, stacklevel=1)


def flwr_run(env: dict[str, str], run_config: str, timeout: float) -> subprocess.CompletedProcess:
    """`flwr run . --stream` with run-config overrides; output captured."""
    return subprocess.run(
        [str(BIN / "flwr"), "run", str(REPO), "--stream", "--run-config", run_config],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )
