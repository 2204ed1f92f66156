"""A client's private weights between rounds: in its node state and in its state folder.

``Context.state`` lives as long as the SuperNode process; a node whose config
names a ``state-dir`` also keeps them on disk, so a restarted SuperNode
resumes with the same private weights. Files are written atomically and read
with numpy's safe loading (never unpickled); each run has its own file, so a
new run never overwrites an earlier run's weights.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.common.logger import log

from strategies.fedavg import to_arrayrecord, to_numpy

PRIVATE_STATE_KEY = "private-weights"
STATE_DIR_KEY = "state-dir"


def state_file(context: Context) -> Path | None:
    """``<state-dir>/run-<run-id>/private-weights.npz``, or None without a state folder."""
    state_dir = str(context.node_config.get(STATE_DIR_KEY, "") or "")
    if not state_dir:
        return None
    return Path(state_dir).expanduser() / f"run-{context.run_id}" / "private-weights.npz"


def _check_matches(
    weights: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], source: str
) -> None:
    if set(weights) != set(expected):
        raise ValueError(
            f"private weights in {source} have keys {sorted(weights)}, "
            f"the model's private variables are {sorted(expected)}"
        )
    for key, value in weights.items():
        if value.shape != expected[key].shape or value.dtype != expected[key].dtype:
            raise ValueError(
                f"private weight '{key}' in {source} is {value.dtype}{list(value.shape)}, "
                f"the model expects {expected[key].dtype}{list(expected[key].shape)}"
            )


def load_private(
    context: Context, expected: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray] | None:
    """This node's private weights, from its node state or else its state folder.

    Returns None when the node has none yet. ``expected`` (e.g. the
    initial private weights) gives the keys, shapes and dtypes they must have.
    """
    if PRIVATE_STATE_KEY in context.state:
        weights = to_numpy(context.state[PRIVATE_STATE_KEY])  # type: ignore[arg-type]
        _check_matches(weights, expected, "the node state")
        return weights
    path = state_file(context)
    if path is None or not path.exists():
        return None
    with np.load(path, allow_pickle=False) as archive:
        weights = {key: archive[key] for key in archive.files}
    _check_matches(weights, expected, str(path))
    context.state[PRIVATE_STATE_KEY] = to_arrayrecord(weights)
    log(INFO, "Node %d: private weights restored from %s", context.node_id, path)
    return weights


def save_private(context: Context, weights: Mapping[str, np.ndarray]) -> None:
    """Keep ``weights`` in the node state and, with a state folder, on disk."""
    context.state[PRIVATE_STATE_KEY] = to_arrayrecord(dict(weights))
    path = state_file(context)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".private-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **weights)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
