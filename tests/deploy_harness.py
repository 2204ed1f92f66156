"""Helpers for tests that run the app on a real (loopback) SuperLink with SuperNodes.

The deployment itself is :class:`deploy.local_deploy.LocalDeployment`, the same
code the deployment script runs; these helpers add what a test needs on top:
a check that every process group it started is gone, a way to follow a run's
output as it is written, and the run's ``metrics.json``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deploy.local_deploy import DeploymentError, LocalDeployment, ManagedProcess

# Flower's SuperLink log when an unregistered key tries to join.
UNKNOWN_KEY_REFUSED = "No SuperNode found with the given public key"


def leftover_process_groups(deployment: LocalDeployment) -> list[str]:
    """Names and PIDs of the processes (groups) the deployment started that are still there."""
    return [
        f"{process.name} (pgid {process.pid})"
        for process in deployment.processes
        if process.group_alive()
    ]


@contextmanager
def loopback_deployment(
    workdir: Path, num_supernodes: int, data_paths: dict[int, str] | None = None,
    warm_workers: bool = False,
) -> Iterator[LocalDeployment]:
    """A started TLS + SuperNode-auth deployment on 127.0.0.1 with a free port.

    ``data_paths`` gives SuperNodes their own files (node-config ``data-path``).
    On the way out every process it started is stopped, and it is an error
    if any of their process groups is still there.
    """
    deployment = LocalDeployment(
        workdir, num_supernodes=num_supernodes, port=0, data_paths=dict(data_paths or {}),
        warm_workers=warm_workers,
    )
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop_all()
        left = leftover_process_groups(deployment)
        if left:
            raise AssertionError(f"processes left running after the test: {left}")


def wait_for_log(
    process: ManagedProcess, pattern: str, timeout: float, since: int = 0
) -> float:
    """Wait for ``pattern`` in ``process``'s log; return the time (monotonic) it was seen.

    Raises ``AssertionError`` with the log's tail when the process exits first
    or ``timeout`` passes, so a test failure shows what happened.
    """
    try:
        process.wait_for(pattern, timeout, since=since)
    except DeploymentError as error:
        raise AssertionError(str(error)) from None
    return time.monotonic()


def finish(process: ManagedProcess, timeout: float) -> int:
    """Wait for ``process`` to exit; stop it and fail if it takes longer than ``timeout``."""
    assert process.process is not None
    deadline = time.monotonic() + timeout
    while process.running() and time.monotonic() < deadline:
        time.sleep(0.5)
    if process.running():
        process.stop()
        raise AssertionError(
            f"{process.name} still running after {timeout:.0f} s:\n{process.log_text()[-4000:]}"
        )
    return int(process.returncode or 0)


def only_run_metrics(outputs: Path, log: str) -> dict[str, Any]:
    """``metrics.json`` of the single run folder under ``outputs``."""
    runs = sorted(outputs.glob("*/metrics.json")) if outputs.exists() else []
    assert len(runs) == 1, f"expected one run folder with metrics.json in {outputs}:\n{log[-4000:]}"
    return json.loads(runs[0].read_text())


def count(pattern: str, text: str) -> int:
    """Occurrences of regex ``pattern`` in ``text``."""
    return len(re.findall(pattern, text))
