"""Run the app with `flwr run` against a SuperLink this test starts and stops itself.

The SuperLink gets its own FLWR_HOME and free loopback ports, so a test never
touches the user's ~/.flwr or a SuperLink they have running, and every process
it starts is stopped by PID afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


def _stop(process: subprocess.Popen) -> None:
    """Stop the SuperLink and everything it spawned (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
    # Children (flwr-serverapp, flwr-simulation, Ray) share the group.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def simulation_superlink(
    flwr_home: Path, num_supernodes: int, dependency_install: bool = False
) -> Iterator[dict[str, str]]:
    """Start a simulation SuperLink; yield the environment for `flwr` commands."""
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
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_port(port, process, timeout=60)
        yield env
    finally:
        _stop(process)


def flwr_run(env: dict[str, str], run_config: str, timeout: float) -> subprocess.CompletedProcess:
    """`flwr run . --stream` with run-config overrides; output captured."""
    return subprocess.run(
        [str(BIN / "flwr"), "run", str(REPO), "--stream", "--run-config", run_config],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )
