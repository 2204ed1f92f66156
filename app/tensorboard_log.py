"""A run's per-round scalars as TensorBoard event files, under ``<run_dir>/tensorboard/``.

``tensorboard --logdir <output-dir>`` then shows every run side by side, one
TensorBoard run per run folder (``<run-id>/tensorboard``).

The event files are written directly, without TensorFlow or the
``tensorboard`` package: TensorBoard's on-disk format is a TFRecord file
(``length, masked CRC-32C of length, data, masked CRC-32C of data``) of
``Event`` protocol buffers, and a scalar is an ``Event`` with a
``Summary.Value(tag, simple_value)``, which TensorBoard shows in its Scalars
tab. Writing them here keeps the server free of a dependency that
TensorFlow 2.21 no longer pulls in (``tf.summary.scalar`` raises without the
``tensorboard`` package) and costs about a millisecond per round.

Metric names are grouped as TensorBoard sections: ``accuracy/central``,
``loss/central``, ``privacy/epsilon``, ``clipping/norm``, ...; see :data:`TAGS`.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any, BinaryIO

from flwr.common.logger import log

from .progress import number

TENSORBOARD_DIR = "tensorboard"

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


# ------------------------------------------------------------ wire format
def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes it
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number_: int, wire_type: int) -> bytes:
    return _varint((number_ << 3) | wire_type)


def _bytes_field(number_: int, payload: bytes) -> bytes:
    return _field(number_, 2) + _varint(len(payload)) + payload


def scalar_value(tag: str, value: float) -> bytes:
    """``Summary.Value{tag: 1, simple_value: 2 (float)}``."""
    return _bytes_field(1, tag.encode("utf-8")) + _field(2, 5) + struct.pack("<f", value)


def event(
    wall_time: float,
    step: int,
    *,
    summary_values: Iterable[bytes] = (),
    file_version: str | None = None,
) -> bytes:
    """``Event{wall_time: 1 (double), step: 2, file_version: 3, summary: 5}``."""
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode("utf-8"))
    values = b"".join(_bytes_field(1, value) for value in summary_values)
    if values:
        out += _bytes_field(5, values)
    return out


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
        self._file: BinaryIO | None = None
        self.path: Path | None = None

    def _open(self) -> BinaryIO:
        if self._file is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            now = time.time()
            name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.fedprivacy"
            self.path = self.log_dir / name
            self._file = open(self.path, "ab")  # noqa: SIM115  pylint: disable=consider-using-with
            self._file.write(tfrecord(event(now, 0, file_version="brain.Event:2")))
            log(
                INFO,
                "TensorBoard events: %s (tensorboard --logdir %s)",
                self.path,
                run_dir_parent(self.log_dir),
            )
        return self._file

    def log_round(self, entry: Mapping[str, Any]) -> int:
        """Write every numeric value of a round's ``metrics.json`` entry; return how many.

        The step is the entry's ``round``; ``None``/NaN values are skipped.
        """
        step = int(entry.get("round", 0))
        values = [
            scalar_value(tag_for(key), value)
            for key, raw in entry.items()
            if key != "round" and (value := number(raw)) is not None
        ]
        if not values:
            return 0
        handle = self._open()
        handle.write(tfrecord(event(time.time(), step, summary_values=values)))
        handle.flush()
        return len(values)

    def log_rounds(self, entries: Iterable[Mapping[str, Any]]) -> int:
        """:meth:`log_round` for each entry (e.g. a ``metrics.json`` read back)."""
        return sum(self.log_round(entry) for entry in entries)

    def close(self) -> None:
        """Flush and close the event file (a later :meth:`log_round` opens a new one)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

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


# ------------------------------------------------------------------ reader
def read_scalars(path: Path) -> list[tuple[int, str, float]]:
    """``(step, tag, value)`` of every scalar in an event file, checking CRCs.

    A small reader for tests and for checking files without TensorBoard;
    it understands what :class:`TensorBoardLog` writes.

    Raises
    ------
    ValueError
        If a record is truncated or fails its CRC.
    """
    data = path.read_bytes()
    out: list[tuple[int, str, float]] = []
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        body = data[pos + 12 : pos + 12 + length]
        crc_bytes = data[pos + 12 + length : pos + 16 + length]
        if header_crc != masked_crc32c(header) or len(body) != length or len(crc_bytes) != 4:
            raise ValueError(f"{path}: corrupt or truncated record at byte {pos}")
        if struct.unpack("<I", crc_bytes)[0] != masked_crc32c(body):
            raise ValueError(f"{path}: data CRC mismatch in record at byte {pos}")
        pos += 16 + length
        fields = _parse(body)
        step = fields.get(2, [0])[0]
        for summary in fields.get(5, []):
            for value in _parse(summary).get(1, []):
                parsed = _parse(value)
                tag = parsed[1][0].decode("utf-8")
                out.append((int(step), tag, struct.unpack("<f", parsed[2][0])[0]))
    return out


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _parse(data: bytes) -> dict[int, list[Any]]:
    """Protocol-buffer fields of a message: field number -> values (bytes or int)."""
    fields: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number_, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        fields.setdefault(number_, []).append(value)
    return fields
