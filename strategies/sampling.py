"""Which connected nodes take part in a round, with a bounded wait for them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO
from typing import Any

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


# ---------------------------------------------------- the sampler's generator
_BIT_GENERATORS: dict[str, type[np.random.BitGenerator]] = {
    "PCG64": np.random.PCG64,
    "PCG64DXSM": np.random.PCG64DXSM,
    "Philox": np.random.Philox,
    "SFC64": np.random.SFC64,
    "MT19937": np.random.MT19937,
}


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"ndarray", "dtype"}:
            dtype = np.dtype(value["dtype"])
            if dtype.hasobject:
                raise ValueError("generator state with an object array")
            return np.asarray(value["ndarray"], dtype=dtype)
        return {key: _from_json(item) for key, item in value.items()}
    return value


def generator_state(rng: np.random.Generator) -> dict[str, Any]:
    """The JSON form of a numpy ``Generator``'s ``bit_generator.state``.

    For the seeded, non-private generators only (FedAvg's sampler): the
    privacy-relevant ones (:mod:`privacy.randomness`) are never saved.
    Integers stay integers (PCG64's 128-bit state is exact in Python's
    ``json``); arrays (Philox, SFC64, MT19937) become ``{"ndarray", "dtype"}``.
    """
    return _to_json(rng.bit_generator.state)


def restore_generator(rng: np.random.Generator, state: Mapping[str, Any]) -> None:
    """Set ``rng`` to a state from :func:`generator_state`; later draws are bit-identical.

    Raises
    ------
    ValueError
        If the state is of another bit generator or malformed.
    """
    name = type(rng.bit_generator).__name__
    if state.get("bit_generator") != name:
        raise ValueError(
            f"generator state is for {state.get('bit_generator')!r}, this generator is {name}"
        )
    try:
        rng.bit_generator.state = _from_json(dict(state))
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"malformed {name} generator state: {error}") from error


def generator_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    """A new ``Generator`` in the state from :func:`generator_state`."""
    name = state.get("bit_generator")
    if name not in _BIT_GENERATORS:
        raise ValueError(f"unknown bit generator {name!r}")
    rng = np.random.Generator(_BIT_GENERATORS[name]())
    restore_generator(rng, state)
    return rng
