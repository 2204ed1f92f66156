"""A run's per-round scalars as TensorBoard event files, under ``<run_dir>/tensorboard/``.

``tensorboard --logdir <output-dir>`` then shows every run side by side, one
TensorBoard run per run folder (``<run-id>/tensorboard``).

The files are written with tensorboardX (``RecordWriter`` frames TFRecords
with their CRCs, its ``Event``/``Summary`` protocol buffers hold the values),
a small pure-Python library that needs neither TensorFlow nor the
``tensorboard`` package. Each round is one ``Event`` whose ``Summary`` holds a
``simple_value`` per metric, which TensorBoard shows in its Scalars tab; the
file is flushed (and fsynced) after every round, synchronously, so a crashed
run's curves are on disk up to its last round.

Metric names are grouped as TensorBoard sections: ``accuracy/central``,
``loss/central``, ``privacy/epsilon``, ``clipping/norm``, ...; see :data:`TAGS`.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import RecordWriter

from .progress import number

TENSORBOARD_DIR = "tensorboard"

_FILE_COUNTER = itertools.count()

#: ``metrics.json`` key -> TensorBoard tag. Other numeric keys go under ``other/``.
TAGS: dict[str, str] = {
    "central-accuracy": "accuracy/central",
    "federated-accuracy": "accuracy/federated",
    "personalized-accuracy": "accuracy/personalized",
    "global-accuracy": "accuracy/global",
    "central-loss": "loss/central",
    "federated-loss": "loss/federated",
    "personalized-loss": "loss/personalized",
    "train-loss": "loss/train",
    "epsilon": "privacy/epsilon",
    "epsilon-pld": "privacy/epsilon-pld",
    "epsilon-projected": "privacy/epsilon-projected",
    "delta": "privacy/delta",
    "sample-epsilon": "privacy/sample-epsilon",
    "sample-epsilon-max": "privacy/sample-epsilon-max",
    "sample-delta": "privacy/sample-delta",
    "local-dp-epsilon": "privacy/local-dp-epsilon",
    "local-dp-delta": "privacy/local-dp-delta",
    "clipping-norm": "clipping/norm",
    "next-clipping-norm": "clipping/next-norm",
    "clipped-fraction": "clipping/clipped-fraction",
    "clipped-fraction-noised": "clipping/clipped-fraction-noised",
    "noise-multiplier": "noise/multiplier",
    "update-noise-multiplier": "noise/update-multiplier",
    "noise-stddev": "noise/stddev",
    "count-noise-stddev": "noise/count-stddev",
    "local-dp-noise-stddev": "noise/local-dp-stddev",
    "num-sampled": "clients/sampled",
    "num-accepted": "clients/accepted",
    "num-rejected": "clients/rejected",
    "num-contributing": "clients/contributing",
    "num-dp-rejected": "clients/dp-rejected",
    "expected-clients": "clients/expected",
    "sampling-rate": "clients/sampling-rate",
    "elapsed-s": "time/round-seconds",
}


def tag_for(key: str) -> str:
    """The TensorBoard tag of a ``metrics.json`` key (``other/<key>`` if unmapped)."""
    return TAGS.get(key, f"other/{key}")


# ------------------------------------------------------------------ writer
class TensorBoardLog:
    """Per-round scalars of one run as TensorBoard event files.

    The event file is opened on the first :meth:`log_round`, flushed after
    every round, so a crashed run's curves are there up to its last round.

    Parameters
    ----------
    run_dir : Path
        The run folder; events go to ``<run_dir>/tensorboard/``.

    Examples
    --------
    >>> tb = TensorBoardLog(run_dir)            # doctest: +SKIP
    >>> tb.log_round({"round": 1, "central-accuracy": 0.9})  # doctest: +SKIP
    >>> tb.close()                              # doctest: +SKIP
    """

    def __init__(self, run_dir: Path) -> None:
        self.log_dir = run_dir / TENSORBOARD_DIR
        self._writer: RecordWriter | None = None
        self.path: Path | None = None

    def _open(self) -> RecordWriter:
        if self._writer is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            now = time.time()
            # TensorBoard reads a folder's event files in name order; the
            # counter keeps names apart within one second of one process.
            name = (
                f"events.out.tfevents.{int(now)}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_FILE_COUNTER)}.fedprivacy"
            )
            self.path = self.log_dir / name
            self._writer = RecordWriter(str(self.path))
            self._writer.write(
                Event(wall_time=now, step=0, file_version="brain.Event:2").SerializeToString()
            )
            log(
                INFO,
                "TensorBoard events: %s (tensorboard --logdir %s)",
                self.path,
                run_dir_parent(self.log_dir),
            )
        return self._writer

    def log_round(self, entry: Mapping[str, Any]) -> int:
        """Write every numeric value of a round's ``metrics.json`` entry; return how many.

        The step is the entry's ``round``; ``None``/NaN values are skipped.
        All values of the round go into one event, flushed to disk at once.
        """
        step = int(entry.get("round", 0))
        values = [
            Summary.Value(tag=tag_for(key), simple_value=value)
            for key, raw in entry.items()
            if key != "round" and (value := number(raw)) is not None
        ]
        if not values:
            return 0
        writer = self._open()
        event = Event(wall_time=time.time(), step=step, summary=Summary(value=values))
        writer.write(event.SerializeToString())
        writer.flush()  # flush + fsync
        return len(values)

    def log_rounds(self, entries: Iterable[Mapping[str, Any]]) -> int:
        """:meth:`log_round` for each entry (e.g. a ``metrics.json`` read back)."""
        return sum(self.log_round(entry) for entry in entries)

    def close(self) -> None:
        """Flush and close the event file (a later :meth:`log_round` opens a new one)."""
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    @classmethod
    def rebuild(cls, run_dir: Path, entries: Iterable[Mapping[str, Any]]) -> TensorBoardLog:
        """A log holding exactly ``entries``, for a resumed run to append to.

        Removes the run's earlier event files (they may hold rounds after the
        checkpoint the run resumes from, which would be drawn twice) and writes
        ``entries`` (the ``metrics.json`` rounds kept) into a new one.
        """
        tb = cls(run_dir)
        if tb.log_dir.is_dir():
            for old in tb.log_dir.glob("*tfevents*"):
                old.unlink()
        tb.log_rounds(entries)
        return tb

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_dir_parent(log_dir: Path) -> Path:
    """The output folder (``<output-dir>``) a ``tensorboard/`` folder belongs under."""
    return log_dir.parent.parent
