"""Where a run's files go, and ``metrics.json`` kept valid after every round.

JSON has no NaN or infinity, so every value ``metrics.json`` (and
``privacy-ledger.json``, and a checkpoint's ``metrics-entry``) holds goes
through :func:`json_value` first:

* NaN (a missing measurement) is written as ``null``;
* an infinite value is written as the string ``"inf"`` (``"-inf"``): an
  epsilon of a run without noise (``noise-multiplier = 0``) is infinite,
  i.e. no privacy at all, which is not the same as "unknown". Python's
  ``float("inf")`` reads it back; :func:`app.progress.privacy_number` does so
  for the progress line and the summary, which show it as ``inf``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from logging import DEBUG
from pathlib import Path
from typing import Any

from flwr.common.logger import log

# The app's own directory (the folder holding app/, clients/, ...). Under
# `flwr run` that is the copy of the app Flower installed, not the SuperLink's
# working directory, which can be anywhere.
APP_DIR = Path(__file__).resolve().parent.parent


def resolve_output_dir(output_dir: str, app_dir: Path = APP_DIR) -> Path:
    """An absolute ``output-dir``: relative paths resolve against ``app_dir``."""
    path = Path(output_dir).expanduser()
    return path if path.is_absolute() else (app_dir / path)


class OutputDirError(ValueError):
    """An output folder that cannot hold a run (a file stands in the way, no permission)."""


def check_output_dir(path: Path) -> None:
    """Check, without writing anything, that ``path`` is or can become a writable folder.

    Raises
    ------
    OutputDirError
        If ``path`` (or a folder above it) exists and is not a folder, or the
        nearest existing folder cannot be written to.
    """
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path} exists and is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"{existing} is a file, so {path} cannot be a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"no permission to write in {existing}")


def create_run_dir(output_dir: Path, run_id: int | str) -> Path:
    """Create ``<output_dir>/<run_id>/``; never reuse a folder that exists.

    A run id seen before (a SuperLink whose database was reset numbers runs
    again) gets a suffix ``-1``, ``-2``, ... instead of overwriting the
    earlier run's files.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    candidate = output_dir / str(run_id)
    suffix = 0
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = output_dir / f"{run_id}-{suffix}"


def write_json_atomically(path: Path, content: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous file intact, never half a file.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=2, allow_nan=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: How an infinite value is written to ``metrics.json`` (JSON has no Infinity).
INFINITY = "inf"


def json_value(value: Any) -> Any:
    """``value`` as ``metrics.json`` writes it: NaN as ``None``, ±inf as ``"inf"``/``"-inf"``.

    Applies inside lists and dicts too (e.g. the per-client figures).
    """
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return INFINITY if value > 0 else f"-{INFINITY}"
        return value
    if isinstance(value, Mapping):
        return {key: json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    return value


class MetricsLog:
    """``metrics.json``: the run config and one entry per completed round.

    The file is rewritten atomically after each round, so a crashed run still
    leaves a valid history of every round it completed.
    """

    def __init__(
        self,
        path: Path,
        config: Mapping[str, Any],
        rounds: list[Mapping[str, Any]] | None = None,
    ) -> None:
        self.path = path
        self.content: dict[str, Any] = {
            "config": dict(config),
            "rounds": [json_value(dict(entry)) for entry in rounds or []],
        }
        write_json_atomically(self.path, self.content)

    def append(self, entry: Mapping[str, Any]) -> None:
        """Add one round's entry and rewrite the file."""
        self.content["rounds"].append(json_value(dict(entry)))
        write_json_atomically(self.path, self.content)
        log(DEBUG, "Round %s written to %s", entry.get("round"), self.path)
