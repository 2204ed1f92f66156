"""A real Flower deployment on this machine: SuperLink, SuperNodes, `flwr run`, on 127.0.0.1.

What it does, in order (``--insecure`` skips the certificates and keys):

1. creates a private CA, a SuperLink certificate for ``127.0.0.1``/``localhost``
   and one ECDSA P-384 authentication key pair per SuperNode
   (:mod:`deploy.certificates`), or reuses those an earlier run left in the
   work folder when they are still valid (an invalid one is replaced, with a
   warning saying why);
2. starts ``flower-superlink`` with TLS and SuperNode authentication on;
3. registers each SuperNode's public key with ``flwr supernode register``;
4. starts N ``flower-supernode`` processes, each with its own
   ``--node-config`` (``partition-id``, ``num-partitions``, ``state-dir`` and,
   when given, ``data-path``), its own ``FLWR_HOME`` and its own state folder;
5. runs the app with ``flwr run <repo> local-deployment --stream``, after
   checking the ``--run-config`` keys against ``[tool.flwr.app.config]``;
6. asks the SuperLink for the run's status (``flwr ls --run-id RUN --format
   json``): ``flwr run`` exits with 0 whatever the run's outcome, so the exit
   code of this script is 1 when the run ended ``finished:failed`` or
   ``finished:stopped`` (or its status could not be read);
7. stops everything it started, by process group, when the run ends, on
   Ctrl-C, on SIGTERM and at interpreter exit.

A SuperNode that crashes during the run is restarted (``--restart-crashed``,
on by default); it rejoins with the same key and therefore the same node ID.

Usage (from the repository root)::

    uv run python -m deploy.local_deploy --num-supernodes 2 \\
        --run-config "num-server-rounds=3 local-epochs=1"

Everything it writes lives under ``--workdir`` (default
``~/.cache/fedprivacy/deploy``): ``certs/``, ``keys/``, one folder per
process with its log and ``FLWR_HOME``, the CLI's ``config.toml`` under
``cli/`` and the run outputs under ``outputs/``. See deploy/README.md for the
same steps on separate machines.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from deploy.certificates import ensure_auth_key_pair, ensure_tls_files

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
BIN = Path(sys.executable).parent
CONNECTION = "local-deployment"
LOOPBACK = "127.0.0.1"
DEFAULT_WORKDIR = Path("~/.cache/fedprivacy/deploy")
DEFAULT_PORT = 9093

SUPERNODE_READY = "SuperNode ID:"
"""Logged by ``flower-supernode`` once the SuperLink has accepted (activated) it."""
RUN_STARTED = re.compile(r"Successfully started run (\d+)")
"""Printed by ``flwr run`` once the SuperLink has created the run."""
RUN_CREATED = re.compile(r"Created run (\d+)")
"""Logged by ``flower-superlink`` when it creates a run (found there when ``flwr run``
prints to a terminal)."""
ACTIVATION_REFUSED = "Failed to activate SuperNode"
"""Logged by ``flower-supernode`` when the SuperLink refuses it (exit code 305):
an unregistered key, or a key whose previous process the SuperLink still
believes online (up to 2 x 30 s after that process's last heartbeat)."""

INSECURE_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  INSECURE MODE: no TLS and no SuperNode authentication.                    !!
!!  Model updates travel unencrypted and ANY process that reaches the         !!
!!  SuperLink port can join the federation as a SuperNode. Use it only        !!
!!  to debug on a machine you trust; never with real data or across a         !!
!!  network.                                                                  !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""

logger = logging.getLogger("deploy")


class DeploymentError(RuntimeError):
    """A step of the deployment failed; the message says which and why."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _toml_string(value: str) -> str:
    """``value`` as a TOML basic string (JSON escapes are valid TOML escapes)."""
    return json.dumps(value)


def _config_string(value: str) -> str:
    """``value`` quoted for Flower's ``key=value`` config syntax (a TOML literal string)."""
    if "'" in value or "\n" in value:
        raise DeploymentError(f"a node-config value cannot contain ' or a newline: {value!r}")
    return f"'{value}'"


# --------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class ProcInfo:
    """One process as /proc describes it."""

    pid: int
    ppid: int
    pgid: int
    state: str
    name: str
    sid: int = -1


def process_table() -> dict[int, ProcInfo]:
    """Every process of this (Linux) machine by pid; empty where there is no /proc."""
    table: dict[int, ProcInfo] = {}
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return table
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid pgrp session ...": comm may contain spaces and parentheses.
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3:
            table[int(entry.name)] = ProcInfo(
                int(entry.name), int(fields[1]), int(fields[2]), fields[0], name, int(fields[3])
            )
    return table


def group_members(pgid: int, table: dict[int, ProcInfo] | None = None) -> list[str]:
    """Live (non-zombie) processes of process group ``pgid``, as ``"pid:name"``.

    A killed process whose parent has not reaped it yet is a zombie: it holds
    no resources and does not count. Without /proc this falls back to
    ``killpg(pgid, 0)``, which counts zombies too.
    """
    if table is None:
        table = process_table()
    if not table:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [f"group {pgid}"]
    return [
        f"{info.pid}:{info.name}"
        for info in table.values()
        if info.pgid == pgid and info.state != "Z"
    ]


def descendants(pid: int, table: dict[int, ProcInfo]) -> list[ProcInfo]:
    """All processes below ``pid`` in the process tree (children, grandchildren, ...)."""
    children: dict[int, list[ProcInfo]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


@dataclass
class ManagedProcess:
    """One child process in its own session, with its output in a log file.

    Signals go to its process group and to the groups of any descendant that
    started a session of its own: ``flower-superlink`` starts
    ``flower-superexec`` with ``setsid``, which starts ``flwr-serverapp``.
    """

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path | None
    cwd: Path = REPO
    process: subprocess.Popen[bytes] | None = None
    groups: set[int] = field(default_factory=set)

    def start(self) -> ManagedProcess:
        """Start the process (its output appended to ``log_path``, or to ours if None)."""
        if self.running():
            raise DeploymentError(f"{self.name} is already running (pid {self.pid})")
        output = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(  # pylint: disable=consider-using-with
                self.command, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT if output else None,
                start_new_session=True,
            )
        finally:
            if output is not None:
                output.close()
        self.groups = {self.process.pid}
        logger.info("started %s (pid %d)", self.name, self.process.pid)
        return self

    @property
    def pid(self) -> int:
        """The process id, which is also its process group id."""
        if self.process is None:
            raise DeploymentError(f"{self.name} was never started")
        return self.process.pid

    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status, or None while running (or never started)."""
        return None if self.process is None else self.process.poll()

    def refresh_groups(self, table: dict[int, ProcInfo] | None = None) -> set[int]:
        """Add the groups of descendants that lead a group of their own; return all known.

        Only a group whose leader is one of our descendants is added, so an
        unrelated group is never signalled. Groups stay known after their
        parent exits, which is when they would otherwise be lost.
        """
        if self.process is None:
            return set()
        table = process_table() if table is None else table
        own = os.getpgrp()
        for info in descendants(self.pid, table):
            if info.pgid == info.pid and info.pgid != own:
                self.groups.add(info.pgid)
        return self.groups

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to every known group; a group that is gone is ignored."""
        if self.process is None:
            return
        for pgid in sorted(self.refresh_groups()):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the groups, wait up to ``timeout`` s, then SIGKILL what is left."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s ignored SIGTERM for %.0f s; killing it", self.name, timeout)
        # Children outlive their leader when it exits first: kill the groups anyway.
        self.signal_group(signal.SIGKILL)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process in D state
            logger.error("%s (pid %d) did not exit after SIGKILL", self.name, self.pid)
        self._wait_groups_gone(timeout=10)

    def _wait_groups_gone(self, timeout: float) -> None:
        """Wait until no live member of any known group is left (SIGKILL takes a moment)."""
        deadline = time.monotonic() + timeout
        while left := self.alive_members():
            if time.monotonic() >= deadline:
                logger.error("%s: processes still alive after SIGKILL: %s", self.name, left)
                return
            self.signal_group(signal.SIGKILL)
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL every group at once: a crash, with no goodbye to the SuperLink."""
        self.signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)
            self._wait_groups_gone(timeout=10)

    def alive_members(self) -> list[str]:
        """Live (non-zombie) processes left in the known groups, as ``"pid:name"``."""
        if self.process is None:
            return []
        table = process_table()
        self.refresh_groups(table)
        return [m for pgid in sorted(self.groups) for m in group_members(pgid, table or None)]

    def group_alive(self) -> bool:
        """Whether any process of the known groups is still there (zombies do not count)."""
        return bool(self.alive_members())

    def log_text(self) -> str:
        """Everything the process has written so far ('' without a log file)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_size(self) -> int:
        """Current length of the log, as a marker for :meth:`wait_for`'s ``since``."""
        return len(self.log_text())

    def wait_for(
        self, pattern: str, timeout: float, since: int = 0, fail_on_exit: bool = True
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the log after offset ``since``.

        Raises
        ------
        DeploymentError
            If the process exits first (unless ``fail_on_exit`` is false) or
            ``timeout`` seconds pass; the message ends with the log's tail.
        """
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            text = self.log_text()
            if match := regex.search(text, since):
                return match
            if fail_on_exit and not self.running():
                raise DeploymentError(
                    f"{self.name} exited with code {self.returncode} before logging "
                    f"{pattern!r}:\n{text[-3000:]}"
                )
            if time.monotonic() >= deadline:
                raise DeploymentError(
                    f"{self.name} did not log {pattern!r} within {timeout:.0f} s:\n{text[-3000:]}"
                )
            time.sleep(0.25)


# ------------------------------------------------------------------------- deployment
@dataclass
class SuperNodeSlot:
    """One SuperNode of the federation: its identity, folders and process."""

    index: int
    key_name: str
    folder: Path
    node_config: str
    process: ManagedProcess | None = None
    node_id: int | None = None
    restarts: int = 0

    @property
    def state_dir(self) -> Path:
        """Where the ClientApp keeps this node's private state (``state-dir``)."""
        return self.folder / "state"


@dataclass
class LocalDeployment:  # pylint: disable=too-many-instance-attributes
    """A SuperLink and N SuperNodes on 127.0.0.1, started and stopped as one.

    Use it as a context manager so that every process it started is stopped
    on the way out, whatever happens::

        with LocalDeployment(workdir, num_supernodes=2) as deployment:
            deployment.start()
            run = deployment.start_run("num-server-rounds=2")
            exit_code = deployment.supervise(run)
    """

    workdir: Path
    num_supernodes: int = 2
    insecure: bool = False
    port: int = 0
    data_paths: dict[int, str] = field(default_factory=dict)
    superlink_args: Sequence[str] = ()
    #: The data owners' privacy limits, ``key=value ...`` added to every
    #: SuperNode's node config (:mod:`privacy.node_limits`).
    node_limits: str = ""
    #: Start a warm client worker beside every SuperNode (:mod:`app.warm_worker`).
    warm_workers: bool = False
    processes: list[ManagedProcess] = field(default_factory=list, init=False)
    supernodes: list[SuperNodeSlot] = field(default_factory=list, init=False)
    #: Length of the SuperLink's log when each ``flwr run`` (by pid) started.
    _superlink_log_since: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).expanduser().resolve()
        if self.workdir == REPO or REPO in self.workdir.parents:
            raise DeploymentError(
                f"--workdir {self.workdir} is inside the app folder {REPO}: `flwr run` would "
                "ship its private keys to the SuperLink with the app. Use a folder outside it."
            )
        if self.num_supernodes < 1:
            raise DeploymentError("--num-supernodes must be at least 1")
        unknown = sorted(set(self.data_paths) - set(range(self.num_supernodes)))
        if unknown:
            raise DeploymentError(
                f"data path given for SuperNode(s) {unknown}, "
                f"but only 0..{self.num_supernodes - 1} exist"
            )
        if self.port == 0:
            self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.certs_dir = self.workdir / "certs"
        self.keys_dir = self.workdir / "keys"
        self.cli_home = self.workdir / "cli"
        self.outputs_dir = self.workdir / "outputs"
        self.superlink: ManagedProcess | None = None
        self.database: Path | None = None

    # ------------------------------------------------------------------ setup
    def base_env(self, flwr_home: Path) -> dict[str, str]:
        """Environment of every Flower process: its own FLWR_HOME, this venv's tools first."""
        env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_DISABLE_UPDATE_CHECK="1")
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return env

    @property
    def cli_env(self) -> dict[str, str]:
        """Environment for ``flwr`` CLI commands against this deployment."""
        return self.base_env(self.cli_home)

    def prepare(self) -> None:
        """Create folders, certificates and keys, and the CLI connection (once).

        Certificates and keys an earlier deployment left in the work folder
        are reused when still valid (:func:`deploy.certificates.ensure_tls_files`,
        :func:`~deploy.certificates.ensure_auth_key_pair`); an invalid set
        (incomplete, mismatched, expired, readable by others) is replaced, and
        the log says why. Nothing else ever replaces them.
        """
        if self.supernodes:
            raise DeploymentError("this deployment is already prepared")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.insecure:
            _, action = ensure_tls_files(self.certs_dir)
            _log_key_action(f"CA and SuperLink certificate in {self.certs_dir}", action)
        for index in range(self.num_supernodes):
            folder = self.workdir / f"supernode-{index}"
            key_name = f"supernode-{index}"
            if not self.insecure:
                _, action = ensure_auth_key_pair(self.keys_dir, key_name)
                _log_key_action(f"key pair {self.keys_dir / key_name}", action)
            slot = SuperNodeSlot(index=index, key_name=key_name, folder=folder, node_config="")
            slot.state_dir.mkdir(parents=True, exist_ok=True)
            slot.node_config = self.node_config(index, slot.state_dir)
            self.supernodes.append(slot)
        self.write_cli_config()

    def node_config(self, index: int, state_dir: Path) -> str:
        """The ``--node-config`` of SuperNode ``index``.

        ``partition-id``/``num-partitions`` pick its part of a partitioned
        dataset (the same keys Flower's simulation sets); ``state-dir`` is its
        own folder for state that must survive a restart; ``data-path``, when
        given, points at this institution's own file: the ClientApp then reads
        that file alone and ``partition-id`` only names the node
        (:mod:`data.node_files`).
        """
        parts = [
            f"partition-id={index}",
            f"num-partitions={self.num_supernodes}",
            f"state-dir={_config_string(str(state_dir))}",
        ]
        if index in self.data_paths:
            parts.append(f"data-path={_config_string(self.data_paths[index])}")
        if self.warm_workers:
            parts.append(f"worker-socket={_config_string(str(self.worker_socket(index)))}")
        if self.node_limits.strip():
            parts.append(self.node_limits.strip())
        return " ".join(parts)

    def worker_socket(self, index: int) -> Path:
        """SuperNode ``index``'s warm-worker socket (its folder is made 0700 by the worker)."""
        return self.workdir / f"supernode-{index}" / "worker" / "worker.sock"

    def start_worker(self, index: int, timeout: float = 120.0) -> ManagedProcess:
        """Start SuperNode ``index``'s warm worker and wait until it listens."""
        folder = self.workdir / f"supernode-{index}"
        process = self._track(
            ManagedProcess(
                f"worker-{index}",
                [str(BIN / "python"), "-m", "app.warm_worker", "--preload",
                 "--socket", str(self.worker_socket(index))],
                self.base_env(folder / "home"), folder / "worker.log",
            ).start()
        )
        process.wait_for("warm worker listening", timeout)
        return process

    def write_cli_config(self) -> Path:
        """``$FLWR_HOME/config.toml`` of the CLI with the ``local-deployment`` connection."""
        self.cli_home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            f"default = {_toml_string(CONNECTION)}",
            "",
            f"[superlink.{CONNECTION}]",
            f"address = {_toml_string(self.address)}",
        ]
        if self.insecure:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {_toml_string(str(self.certs_dir / 'ca.crt'))}")
        path = self.cli_home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _track(self, process: ManagedProcess) -> ManagedProcess:
        self.processes.append(process)
        return process

    # -------------------------------------------------------------- SuperLink
    def superlink_command(self) -> list[str]:
        """The ``flower-superlink`` command line."""
        command = [str(BIN / "flower-superlink")]
        if self.insecure:
            command.append("--insecure")
        else:
            command += [
                "--ssl-certfile", str(self.certs_dir / "server.pem"),
                "--ssl-keyfile", str(self.certs_dir / "server.key"),
                "--ssl-ca-certfile", str(self.certs_dir / "ca.crt"),
                "--enable-supernode-auth",
            ]
        if self.database is not None:
            # The SuperLink's state (registered nodes, runs) in a file, so that a
            # restarted SuperLink keeps its nodes (restart_superlink).
            command += ["--database", str(self.database)]
        command += [
            "--isolation", "subprocess",
            "--host", LOOPBACK, "--port", str(self.port),
            # The ServerApp runs in this virtual environment; no `uv sync` per run.
            "--disable-runtime-dependency-installation",
            *self.superlink_args,
        ]
        return command

    def start_superlink(self, timeout: float = 60.0) -> ManagedProcess:
        """Start the SuperLink and wait until its port accepts connections.

        Each deployment gets a new state database (``superlink/state-<time>.db``;
        earlier ones are left as they are); :meth:`restart_superlink` reopens it.
        """
        if self.database is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.database = self.workdir / "superlink" / f"state-{stamp}-{os.getpid()}.db"
            self.database.parent.mkdir(parents=True, exist_ok=True)
        return self._start_superlink_process(timeout)

    def restart_superlink(self, timeout: float = 60.0) -> ManagedProcess:
        """Start the SuperLink again on the same state database (after a crash or a stop).

        Its registered nodes and runs are in the database; the SuperNodes,
        which keep retrying, reconnect under their node IDs. A run whose
        ServerApp died with the SuperLink is continued with ``resume``.
        """
        if self.database is None:
            raise DeploymentError("the SuperLink was never started")
        if self.superlink is not None and self.superlink.running():
            self.superlink.stop()
        return self._start_superlink_process(timeout)

    def _start_superlink_process(self, timeout: float) -> ManagedProcess:
        folder = self.workdir / "superlink"
        process = self._track(
            ManagedProcess(
                "superlink", self.superlink_command(), self.base_env(folder / "home"),
                folder / "superlink.log",
            ).start()
        )
        self.superlink = process
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.running():
                raise DeploymentError(
                    f"flower-superlink exited with code {process.returncode}:\n"
                    f"{process.log_text()[-3000:]}"
                )
            with socket.socket() as sock:
                if sock.connect_ex((LOOPBACK, self.port)) == 0:
                    logger.info("SuperLink listening on %s (%s)", self.address,
                                "insecure" if self.insecure else "TLS + SuperNode auth")
                    return process
            time.sleep(0.2)
        raise DeploymentError(
            f"flower-superlink did not listen on {self.address} in {timeout:.0f} s"
        )

    # ------------------------------------------------------------ registration
    def register_keys(self, public_keys: Sequence[Path], timeout: float = 120.0) -> list[int]:
        """Register public keys with ``flwr supernode register`` (in parallel); return node IDs."""
        commands = [
            [str(BIN / "flwr"), "supernode", "register", str(key), CONNECTION,
             "--name", key.stem, "--format", "json"]
            for key in public_keys
        ]
        running = [
            subprocess.Popen(  # pylint: disable=consider-using-with
                command, env=self.cli_env, cwd=self.workdir, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )
            for command in commands
        ]
        node_ids = []
        try:
            for key, process in zip(public_keys, running, strict=True):
                output, _ = process.communicate(timeout=timeout)
                node_ids.append(_parse_node_id(key, process.returncode, output))
        finally:
            for process in running:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        return node_ids

    def register_supernodes(self) -> None:
        """Register every SuperNode's public key (not needed, and skipped, when insecure)."""
        if self.insecure:
            return
        keys = [self.keys_dir / f"{slot.key_name}.pub" for slot in self.supernodes]
        for slot, node_id in zip(self.supernodes, self.register_keys(keys), strict=True):
            slot.node_id = node_id
            logger.info("registered %s as node %d", slot.key_name, node_id)

    # -------------------------------------------------------------- SuperNodes
    def supernode_command(
        self, node_config: str, runtime_port: int, private_key: Path | None
    ) -> list[str]:
        """The ``flower-supernode`` command line."""
        command = [str(BIN / "flower-supernode"), "--superlink", self.address]
        if self.insecure:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(self.certs_dir / "ca.crt")]
            if private_key is not None:
                command += ["--auth-supernode-private-key", str(private_key)]
        command += [
            "--node-config", node_config,
            "--isolation", "subprocess",
            # Each SuperNode serves its ClientApps on its own local port.
            "--host", LOOPBACK, "--port", str(runtime_port),
        ]
        return command

    def launch_supernode(
        self, name: str, folder: Path, node_config: str, private_key: Path | None
    ) -> ManagedProcess:
        """Start one ``flower-supernode`` (no waiting) with its own FLWR_HOME and log."""
        command = self.supernode_command(node_config, free_port(), private_key)
        return self._track(
            ManagedProcess(name, command, self.base_env(folder / "home"), folder / "supernode.log")
            .start()
        )

    def start_supernode(
        self, index: int, wait: bool = True, timeout: float = 90.0
    ) -> ManagedProcess:
        """Start SuperNode ``index``; with ``wait``, until the SuperLink has accepted it."""
        slot = self.supernodes[index]
        if slot.process is not None and slot.process.running():
            raise DeploymentError(f"supernode-{index} is already running")
        private_key = None if self.insecure else self.keys_dir / slot.key_name
        since = slot.process.log_size() if slot.process else 0
        slot.process = self.launch_supernode(
            f"supernode-{index}", slot.folder, slot.node_config, private_key
        )
        if wait:
            match = slot.process.wait_for(SUPERNODE_READY + r" (\d+)", timeout, since=since)
            slot.node_id = int(match.group(1))
            logger.info("supernode-%d online as node %d", index, slot.node_id)
        return slot.process

    def restart_supernode(self, index: int, timeout: float = 120.0, retry_s: float = 5.0) -> int:
        """(Re)start SuperNode ``index`` until the SuperLink accepts it; return its node ID.

        After a crash the SuperLink keeps the node online until two heartbeat
        intervals (2 x 30 s) have passed since its last heartbeat and refuses
        a second activation of the same key until then; this retries every
        ``retry_s`` seconds for up to ``timeout`` seconds.
        """
        slot = self.supernodes[index]
        if slot.process is not None:
            slot.process.stop()
        deadline = time.monotonic() + timeout
        while True:
            since = slot.process.log_size() if slot.process else 0
            self.start_supernode(index, wait=False)
            assert slot.process is not None
            try:
                match = slot.process.wait_for(
                    SUPERNODE_READY + r" (\d+)|" + ACTIVATION_REFUSED,
                    max(1.0, deadline - time.monotonic()), since=since, fail_on_exit=False,
                )
            except DeploymentError as error:
                raise DeploymentError(
                    f"supernode-{index} was not accepted within {timeout:.0f} s"
                ) from error
            if match.group(1):
                slot.node_id = int(match.group(1))
                slot.restarts += 1
                logger.info("supernode-%d rejoined as node %d", index, slot.node_id)
                return slot.node_id
            slot.process.stop()
            if time.monotonic() + retry_s >= deadline:
                raise DeploymentError(
                    f"supernode-{index} was still refused after {timeout:.0f} s:\n"
                    f"{slot.process.log_text()[-2000:]}"
                )
            logger.info("supernode-%d not accepted yet (still online after its crash?); "
                        "retrying in %.0f s", index, retry_s)
            time.sleep(retry_s)

    def start(self) -> None:
        """Prepare, start the SuperLink, register the keys and start every SuperNode."""
        if self.insecure:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)
            logger.warning("insecure mode: no TLS, no SuperNode authentication")
        self.prepare()
        if self.warm_workers:
            for slot in self.supernodes:
                self.start_worker(slot.index)
        self.start_superlink()
        self.register_supernodes()
        for slot in self.supernodes:
            self.start_supernode(slot.index, wait=False)
        for slot in self.supernodes:
            assert slot.process is not None
            match = slot.process.wait_for(SUPERNODE_READY + r" (\d+)", 90.0)
            slot.node_id = int(match.group(1))
            logger.info("supernode-%d online as node %d", slot.index, slot.node_id)

    # --------------------------------------------------------------------- run
    def run_command(self, run_config: str = "") -> list[str]:
        """``flwr run <repo> local-deployment --stream --run-config ...``."""
        command = [str(BIN / "flwr"), "run", str(REPO), CONNECTION, "--stream"]
        if run_config.strip():
            command += ["--run-config", run_config]
        if "output-dir" not in run_config:
            command += ["--run-config", f"output-dir={_config_string(str(self.outputs_dir))}"]
        return command

    def start_run(self, run_config: str = "", log_path: Path | None = None) -> ManagedProcess:
        """Start ``flwr run`` (its output to ``log_path``, or to this terminal).

        Raises
        ------
        DeploymentError
            When ``run_config`` names a key the app's pyproject.toml does not
            have (:func:`check_run_config`): Flower would refuse the run
            without naming it.
        """
        try:
            check_run_config(run_config)
        except ValueError as error:
            raise DeploymentError(str(error)) from None
        since = self.superlink.log_size() if self.superlink is not None else 0
        run = self._track(
            ManagedProcess("flwr-run", self.run_command(run_config), self.cli_env, log_path).start()
        )
        self._superlink_log_since[run.pid] = since
        return run

    def run_id_of(self, run: ManagedProcess) -> int | None:
        """The run ID ``run`` (a ``flwr run``) started: from its log, else the SuperLink's.

        The SuperLink's log is read from where it stood when ``run`` started,
        so with several runs started at once it may name another one; give
        :meth:`start_run` a ``log_path`` to be sure.
        """
        if match := RUN_STARTED.search(run.log_text()):
            return int(match.group(1))
        if self.superlink is not None and run.process is not None:
            since = self._superlink_log_since.get(run.pid, 0)
            if match := RUN_CREATED.search(self.superlink.log_text(), since):
                return int(match.group(1))
        return None

    def list_run_command(self, run_id: int) -> list[str]:
        """``flwr ls local-deployment --run-id RUN --format json``."""
        return [str(BIN / "flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"]

    def run_status(self, run_id: int, settle_s: float = 15.0, timeout: float = 60.0) -> RunStatus:
        """Run ``run_id``'s status on the SuperLink, waiting up to ``settle_s`` for it to finish.

        Raises
        ------
        DeploymentError
            When ``flwr ls`` fails, times out or does not list the run.
        """
        deadline = time.monotonic() + settle_s
        while True:
            try:
                listing = subprocess.run(
                    self.list_run_command(run_id), env=self.cli_env, cwd=self.workdir,
                    capture_output=True, text=True, timeout=timeout, check=False,
                )
            except subprocess.TimeoutExpired:
                raise DeploymentError(f"`flwr ls` did not answer within {timeout:.0f} s") from None
            status = parse_run_status(listing.stdout, run_id, listing.returncode, listing.stderr)
            if status.finished or time.monotonic() >= deadline:
                return status
            time.sleep(1.0)

    def run_outcome(self, run: ManagedProcess, settle_s: float = 15.0) -> tuple[int, str]:
        """The exit code and message for a ``flwr run`` that has exited: see :func:`run_verdict`.

        ``flwr run`` exits with 0 even when the run failed, so its exit code
        alone says nothing; the run's status on the SuperLink does.
        """
        if run.running():
            raise DeploymentError("flwr run is still running")
        flwr_code = int(run.returncode or 0)
        run_id = self.run_id_of(run)
        if flwr_code != 0 or run_id is None:
            return run_verdict(flwr_code, run_id, None)
        try:
            status = self.run_status(run_id, settle_s)
        except DeploymentError as error:
            return run_verdict(flwr_code, run_id, None, str(error))
        return run_verdict(flwr_code, run_id, status)

    def supervise(
        self,
        run: ManagedProcess,
        timeout: float | None = None,
        restart_crashed: bool = True,
        max_restarts: int = 10,
        on_tick: Callable[[], None] | None = None,
    ) -> int:
        """Wait for ``run`` to end; restart crashed SuperNodes meanwhile; return its exit code."""
        deadline = None if timeout is None else time.monotonic() + timeout
        retry_at: dict[int, float] = {}
        while run.running():
            if deadline is not None and time.monotonic() > deadline:
                run.stop()
                raise DeploymentError(f"flwr run did not finish within {timeout:.0f} s")
            for slot in self.supernodes:
                process = slot.process
                if not restart_crashed or process is None or process.running():
                    continue
                if slot.restarts >= max_restarts:
                    continue
                now = time.monotonic()
                if now < retry_at.get(slot.index, 0.0):
                    continue
                logger.warning("supernode-%d exited with code %s; restarting it",
                               slot.index, process.returncode)
                process.stop()
                self.start_supernode(slot.index, wait=False)
                slot.restarts += 1
                retry_at[slot.index] = now + 10.0
            table = process_table()
            for process in self.processes:
                if process.running():
                    process.refresh_groups(table)
            if on_tick is not None:
                on_tick()
            time.sleep(1.0)
        return int(run.returncode or 0)

    # -------------------------------------------------------------------- stop
    def stop_all(self) -> None:
        """Stop every process started, newest first (the run, SuperNodes, SuperLink)."""
        for process in reversed(self.processes):
            if process.process is not None and (process.running() or process.group_alive()):
                logger.info("stopping %s (pid %d)", process.name, process.pid)
            process.stop()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


def _parse_node_id(key: Path, returncode: int | None, output: str) -> int:
    """The node ID in ``flwr supernode register --format json`` output."""
    start, end = output.find("{"), output.rfind("}")
    try:
        reply = json.loads(output[start : end + 1]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    if returncode != 0 or not reply.get("success") or "node-id" not in reply:
        raise DeploymentError(
            f"registering {key} failed (exit code {returncode}):\n{output[-2000:]}"
        )
    return int(reply["node-id"])


def _log_key_action(what: str, action: str) -> None:
    """Log what :func:`deploy.certificates.ensure_tls_files` (or a key pair) did."""
    if action.startswith("replaced"):
        logger.warning("%s %s; created anew", what, action)
    else:
        logger.info("%s %s", what, action)


# --------------------------------------------------------------------------- run outcome
@dataclass(frozen=True)
class RunStatus:
    """A run's status as ``flwr ls --format json`` reports it."""

    run_id: int
    #: ``pending``, ``starting``, ``running`` or ``finished:<completed|failed|stopped>``.
    status: str
    #: Flower's ``status-details``, e.g. "ServerApp failed with exception: ..." ("" when none).
    details: str = ""

    @property
    def finished(self) -> bool:
        """Whether the run has ended, however."""
        return self.status.split(":", 1)[0] == "finished"

    @property
    def completed(self) -> bool:
        """Whether the run ended without error (``finished:completed``)."""
        return self.status == "finished:completed"


def parse_run_status(
    output: str, run_id: int, returncode: int = 0, stderr: str = ""
) -> RunStatus:
    """Run ``run_id``'s status in the output of ``flwr ls --run-id RUN --format json``.

    Flower 1.42 prints ``{"success": true, "runs": [{"run-id": "RUN", "status":
    "finished:failed", "status-details": "...", ...}]}`` and, on an error (an
    unreachable SuperLink, an unknown run), ``{"success": false,
    "error-message": "..."}`` with exit code 0.

    Raises
    ------
    DeploymentError
        On an error reply, output that is not that JSON, or no entry for the run.
    """
    start, end = output.find("{"), output.rfind("}")
    try:
        reply = json.loads(output[start : end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
        reply = None
    if not isinstance(reply, dict):
        raise DeploymentError(
            f"`flwr ls` (exit code {returncode}) printed no JSON:\n{(output + stderr)[-2000:]}"
        )
    if not reply.get("success"):
        # Flower puts what the command printed before the error first: keep the error.
        lines = [line.strip() for line in str(reply.get("error-message", "")).splitlines()]
        message = next((line for line in reversed(lines) if line), "no error message")
        raise DeploymentError(f"`flwr ls` failed: {message}")
    for entry in reply.get("runs") or []:
        if isinstance(entry, dict) and str(entry.get("run-id")) == str(run_id):
            details = str(entry.get("status-details") or "")
            return RunStatus(
                run_id, str(entry.get("status", "")), "" if details == "N/A" else details
            )
    raise DeploymentError(f"`flwr ls` does not list run {run_id}")


def run_verdict(
    flwr_code: int, run_id: int | None, status: RunStatus | None, problem: str = ""
) -> tuple[int, str]:
    """This script's exit code for a run, and the message saying why.

    ``flwr run`` exits with 0 whatever becomes of the run once it is
    created, so 0 comes only from a run whose status is
    ``finished:completed``; a non-zero code of ``flwr run`` itself (the run
    was never created, the SuperLink unreachable) is passed on; anything else
    (failed, stopped, unfinished, unknown) gives 1.
    """
    if flwr_code != 0:
        where = f" (run {run_id})" if run_id is not None else ""
        return flwr_code, f"flwr run exited with code {flwr_code}{where}"
    if run_id is None:
        return 1, (
            "flwr run exited with code 0, but neither its output nor the SuperLink's log "
            "names the run it started; see `flwr ls`"
        )
    if status is None:
        return 1, (
            f"could not read the status of run {run_id} from the SuperLink: {problem} "
            "(flwr run's exit code 0 says nothing about the run)"
        )
    if status.completed:
        return 0, f"run {run_id} ended with status {status.status}"
    details = f". Flower says: {status.details}" if status.details else ""
    if status.finished:
        return 1, (
            f"run {run_id} ended with status {status.status} (flwr run exited with code 0, "
            f"as it does whatever the outcome){details}"
        )
    return 1, f"run {run_id} still has status {status.status} although flwr run exited{details}"


# --------------------------------------------------------------------------- run config
def check_run_config(run_config: str, pyproject: Path = PYPROJECT) -> dict[str, object]:
    """Parse ``--run-config`` as Flower does and check every key is the app's.

    Flower's SuperLink refuses a run whose overrides name a key missing from
    ``[tool.flwr.app.config]`` with only ``[code: 15] Invalid run
    configuration.``; this names the key, close matches and the known keys.
    Returns the parsed overrides.

    Raises
    ------
    ValueError
        On a key the app does not have, a .toml file, or a string Flower
        cannot parse.
    """
    # pylint: disable=import-outside-toplevel
    import click
    from flwr.common.config import flatten_dict, parse_config_args

    if not run_config.strip():
        return {}
    if run_config.strip().endswith(".toml"):
        raise ValueError(
            "--run-config takes \"key=value ...\" pairs here, not a .toml file (this script "
            "adds output-dir, and Flower does not combine a file with pairs)"
        )
    try:
        overrides = parse_config_args([run_config])
    except click.ClickException as error:
        raise ValueError(f"--run-config {run_config!r}: {error.message}") from None
    with pyproject.open("rb") as handle:
        known = flatten_dict(tomllib.load(handle)["tool"]["flwr"]["app"].get("config"))
    unknown = [key for key in overrides if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(known), n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ValueError(
            f"--run-config: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: "
            f"[tool.flwr.app.config] in {pyproject} does not have "
            f"{'them' if len(unknown) > 1 else 'it'}, and the SuperLink would refuse the run "
            "saying only \"[code: 15] Invalid run configuration.\". Known keys: "
            + ", ".join(sorted(known))
        )
    return dict(overrides)


# --------------------------------------------------------------------------- command line
class _Interrupted(Exception):
    """Raised from the signal handler so that the cleanup code runs."""


@contextmanager
def _signals_stop_everything() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into an exception (cleanup runs in ``finally``)."""

    received: list[str] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if received:  # already stopping: let the cleanup finish
            logger.warning("%s received again; still stopping", name)
            return
        received.append(name)
        raise _Interrupted(name)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _parse_data_path(text: str) -> tuple[int | None, str]:
    """``INDEX=PATH`` (SuperNode INDEX) or ``PATH`` (the next SuperNode in order)."""
    head, sep, rest = text.partition("=")
    index, path = (int(head), rest) if sep and head.strip().isdigit() else (None, text)
    if not path.strip():
        raise argparse.ArgumentTypeError(
            f"expected PATH or INDEX=PATH, e.g. 0=/data/processed.cleveland.data; got {text!r}"
        )
    return index, path


def resolve_data_paths(entries: Sequence[tuple[int | None, str]]) -> dict[int, str]:
    """SuperNode index -> absolute ``data-path`` for the ``--data-path`` options given.

    ``PATH`` options go to SuperNodes 0, 1, 2, ... in order; ``INDEX=PATH``
    options name their SuperNode; the two forms do not mix. A relative path
    is made absolute (the ClientApp does not run in this folder) and must
    exist here; a ``?query`` (``?label=num&classes=2`` for a CSV) is kept.

    Raises
    ------
    DeploymentError
        On mixed forms, a SuperNode named twice or a file that does not exist.
    """
    indexed = [index is not None for index, _ in entries]
    if any(indexed) and not all(indexed):
        raise DeploymentError(
            "--data-path: give every SuperNode's file as INDEX=PATH, or all of them as "
            "PATH (SuperNodes 0, 1, ... in order), not both"
        )
    paths: dict[int, str] = {}
    for position, (index, path) in enumerate(entries):
        node = position if index is None else index
        if node in paths:
            raise DeploymentError(f"--data-path: SuperNode {node} is given two files")
        file_part, sep, query = path.partition("?")
        file = Path(file_part.strip()).expanduser().resolve()
        if not file.exists():
            raise DeploymentError(f"--data-path for SuperNode {node}: {file} does not exist")
        paths[node] = f"{file}{sep}{query}"
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m deploy.local_deploy``."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local_deploy",
        description="Run the app on a local SuperLink with N SuperNodes (TLS + SuperNode "
        "authentication on 127.0.0.1), then stop everything.",
    )
    parser.add_argument("--num-supernodes", type=int, default=None,
                        help="SuperNodes to start (default: one per --data-path "
                        "(the largest INDEX + 1), else 2)")
    parser.add_argument("--run-config", default="",
                        help="run-config overrides for `flwr run`, e.g. \"num-server-rounds=3\" "
                        "(output-dir defaults to WORKDIR/outputs)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="certificates, keys, logs, state and outputs "
                        f"(default {DEFAULT_WORKDIR}); "
                        "must be outside the app folder")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"SuperLink port on 127.0.0.1 (default {DEFAULT_PORT}; "
                        "0 picks a free one)")
    parser.add_argument("--data-path", type=_parse_data_path, action="append", default=[],
                        metavar="[INDEX=]PATH",
                        help="this SuperNode's own data file, put in its node config as "
                        "data-path (read in the format of the run config's dataset: heart, "
                        "mnist, csv, npz); repeat once per SuperNode: PATH for SuperNodes "
                        "0, 1, ... in order, or INDEX=PATH. SuperNodes without one take "
                        "their partition of the run's dataset")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no SuperNode authentication "
                        "(loud warning; debugging only)")
    parser.add_argument("--serve", action="store_true",
                        help="start the federation and keep it up until Ctrl-C "
                        "instead of running the app")
    parser.add_argument("--no-restart-crashed", dest="restart_crashed", action="store_false",
                        help="do not restart a SuperNode that exits during the run")
    parser.add_argument("--node-limits", default="",
                        help="privacy limits every SuperNode pins whatever the server asks, "
                        "as node-config 'key=value ...' (e.g. \"private-layers='head' "
                        "require-dp-sgd=true max-sample-epsilon=8.0\"); see deploy/README.md")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop everything if the run takes longer than this many seconds")
    parser.add_argument("--warm-workers", action="store_true",
                        help="start a warm client worker beside every SuperNode (TensorFlow, "
                        "the model and the data stay loaded; a private Unix socket named in "
                        "the node config as worker-socket); see deploy/README.md")
    args = parser.parse_args(argv)
    if args.port < 0 or args.port > 65535:
        parser.error("--port must be in 0..65535")
    try:
        args.data_paths = resolve_data_paths(args.data_path)
    except DeploymentError as error:
        parser.error(str(error))
    if args.num_supernodes is None:
        args.num_supernodes = max(args.data_paths) + 1 if args.data_paths else 2
    try:
        check_node_limits(args.node_limits)
    except ValueError as error:
        parser.error(f"--node-limits: {error}")
    try:
        check_run_config(args.run_config)
    except ValueError as error:
        parser.error(str(error))
    return args


def check_node_limits(node_limits: str) -> None:
    """Parse ``--node-limits`` as Flower parses node config, then as the ClientApp will.

    Raises
    ------
    ValueError
        Naming the bad key and the allowed values, before anything starts.
    """
    if not node_limits.strip():
        return
    from flwr.common.config import parse_config_args  # pylint: disable=import-outside-toplevel

    from privacy.node_limits import parse_node_limits  # pylint: disable=import-outside-toplevel

    parse_node_limits(parse_config_args([node_limits]))


def main(argv: Sequence[str] | None = None) -> int:
    """Deploy, run the app (or serve until Ctrl-C), stop everything; return an exit code."""
    logging.basicConfig(level=logging.INFO, format="[deploy] %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        deployment = LocalDeployment(
            args.workdir, num_supernodes=args.num_supernodes, insecure=args.insecure,
            port=args.port, data_paths=args.data_paths, node_limits=args.node_limits,
            warm_workers=args.warm_workers,
        )
    except DeploymentError as error:
        logger.error("%s", error)
        return 2
    atexit.register(deployment.stop_all)  # a last resort; stop_all is idempotent
    started = time.monotonic()
    try:
        with _signals_stop_everything(), deployment:
            deployment.start()
            logger.info("workdir %s (logs: superlink/superlink.log, supernode-*/supernode.log)",
                        deployment.workdir)
            if args.serve:
                logger.info(
                    "federation up; in another terminal:\n"
                    "  FLWR_HOME=%s flwr run . %s --stream\nCtrl-C stops everything",
                    shlex.quote(str(deployment.cli_home)), CONNECTION,
                )
                while True:
                    time.sleep(3600)
            run = deployment.start_run(args.run_config)
            code = deployment.supervise(
                run, timeout=args.timeout, restart_crashed=args.restart_crashed
            )
            logger.info("flwr run exited with code %d after %.1f s (deployment start included)",
                        code, time.monotonic() - started)
            code, message = deployment.run_outcome(run)
            if code == 0:
                logger.info("%s", message)
            else:
                logger.error("%s", message)
            return code
    except _Interrupted as signame:
        logger.warning("%s received: stopping everything", signame)
        return 130
    except DeploymentError as error:
        logger.error("%s", error)
        return 1
    finally:
        deployment.stop_all()
        logger.info("all processes stopped")


if __name__ == "__main__":
    sys.exit(main())
