"""Which connected nodes take part in a round, with a bounded wait for them."""

from __future__ import annotations

import time
from logging import INFO

import numpy as np

from flwr.common.logger import log
from flwr.serverapp import Grid


class NotEnoughNodes(RuntimeError):
    """Fewer nodes connected than a round needs, within the allowed wait."""


def sample_size(num_connected: int, fraction: float, min_nodes: int) -> int:
    """Nodes to sample: ``int(fraction * N)``, at least ``min_nodes`` (as Flower's FedAvg)."""
    return max(int(num_connected * fraction), min_nodes)


def wait_for_nodes(
    grid: Grid, min_nodes: int, timeout: float, poll_interval: float = 1.0
) -> list[int]:
    """Return the sorted connected node ids once at least ``min_nodes`` are there.

    Unlike Flower's ``sample_nodes``, which waits forever, this gives up after
    ``timeout`` seconds so that a federation that never fills ends the run
    with a clear message instead of hanging.

    Raises
    ------
    NotEnoughNodes
        If fewer than ``min_nodes`` are connected after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() >= deadline:
            raise NotEnoughNodes(
                f"only {len(nodes)} node(s) connected after waiting {timeout:.0f} s; "
                f"this round needs {min_nodes} (see min-train-nodes, "
                "min-evaluate-nodes and node-wait-timeout)"
            )
        log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), min_nodes)
        time.sleep(poll_interval)
    return nodes


def sample_without_replacement(
    node_ids: list[int], size: int, rng: np.random.Generator
) -> list[int]:
    """``size`` distinct nodes drawn uniformly with ``rng`` (sorted input keeps it seeded)."""
    if size > len(node_ids):
        raise ValueError(f"cannot sample {size} of {len(node_ids)} nodes")
    picked = rng.choice(len(node_ids), size=size, replace=False)
    return [node_ids[i] for i in sorted(picked)]
