"""Checks on client replies: a malformed reply is rejected with a reason, never averaged.

Replies are read without copying their arrays: :func:`decode_array` parses the
``.npy`` header of a Flower ``Array`` and returns a read-only numpy view of the
bytes the message already holds (Flower's ``Array.numpy()`` copies them through
``np.load``), with the same safety as ``np.load(allow_pickle=False)``: object
dtypes are refused, and so is a payload whose length does not match its
header. :func:`all_finite` checks for NaN/Inf with one BLAS pass and no
temporary array.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from . import protocol

NUM_EXAMPLES_KEY = protocol.NUM_EXAMPLES


class InvalidReply(ValueError):
    """A client reply that must not enter the aggregate; the message is the reason."""


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype one array of a reply must have."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class TrainReply:
    """A validated training reply."""

    node_id: int
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class EvaluateReply:
    """A validated evaluation reply."""

    node_id: int
    num_examples: int
    metrics: dict[str, float]


NPY_MAGIC = b"\x93NUMPY"
#: Parsed ``.npy`` headers, keyed by (version, header bytes): every client's reply
#: repeats the same few headers, so each is parsed (``ast.literal_eval``) once.
_HEADERS: dict[tuple[int, bytes], tuple[np.dtype, tuple[int, ...], bool]] = {}
_MAX_CACHED_HEADERS = 4096


def _parse_header(version: int, prefix: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """dtype, shape and Fortran order from the magic + header bytes ``prefix``."""
    stream = io.BytesIO(prefix)
    np.lib.format.read_magic(stream)
    if version == 1:
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    return np.dtype(dtype), tuple(int(d) for d in shape), bool(fortran_order)


def decode_array(array: Array) -> np.ndarray:
    """The numpy array a Flower ``Array`` holds, as a read-only view of its bytes (no copy).

    Equal to ``array.numpy()`` (same dtype, shape, values and memory order) for
    every array Flower serialises (``.npy`` versions 1.0 and 2.0), but it does
    not copy the data: the result shares memory with ``array.data`` and is
    read-only, so it cannot alter the message it came from.

    Raises
    ------
    ValueError
        If the serialisation is not numpy's, the ``.npy`` header is malformed
        or not version 1.0/2.0, the dtype holds Python objects (what
        ``np.load(allow_pickle=False)`` refuses: loading them could run code),
        or the payload is shorter or longer than the header says.
    """
    if array.stype != "numpy.ndarray":
        raise ValueError(f"unsupported serialisation {array.stype!r}")
    data = array.data
    if len(data) < 10 or data[:6] != NPY_MAGIC:
        raise ValueError("not an .npy payload (bad magic string)")
    version = data[6]
    if data[7] != 0 or version not in (1, 2):
        raise ValueError(f".npy format version {data[6]}.{data[7]} is not supported")
    if version == 1:
        start = 10
        header_len = int.from_bytes(data[8:10], "little")
    else:
        if len(data) < 12:
            raise ValueError("truncated .npy header")
        start = 12
        header_len = int.from_bytes(data[8:12], "little")
    offset = start + header_len
    if offset > len(data):
        raise ValueError("truncated .npy header")
    key = (version, bytes(data[start:offset]))
    parsed = _HEADERS.get(key)
    if parsed is None:
        parsed = _parse_header(version, bytes(data[:offset]))
        if len(_HEADERS) >= _MAX_CACHED_HEADERS:
            _HEADERS.clear()
        _HEADERS[key] = parsed
    dtype, shape, fortran_order = parsed
    if dtype.hasobject:
        raise ValueError(f"object dtype {dtype} refused (it would need pickle)")
    if dtype.itemsize == 0:
        raise ValueError(f"dtype {dtype} has no size")
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(
            f"payload holds {len(data) - offset} bytes, the header "
            f"({dtype}{list(shape)}) needs {expected}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


#: ``.npy`` headers written, keyed by (dtype, shape): a round's result repeats those of the model.
_WRITTEN_HEADERS: dict[tuple[np.dtype, tuple[int, ...]], bytes] = {}


def encode_array(value: np.ndarray) -> Array:
    """A Flower ``Array`` holding ``value``, with the bytes ``Array(value)`` would hold.

    Flower's ``Array(ndarray)`` goes through ``np.save`` into a ``BytesIO`` and
    copies the result out of it (two copies of the data). Here the ``.npy``
    header (version 1.0, as ``np.save`` writes it; cached per dtype and shape)
    and the array's buffer are joined into the ``bytes`` directly: one copy.
    Arrays ``np.save`` would store differently (Fortran order, object or
    structured dtypes, headers beyond version 1.0) take Flower's path.
    """
    value = np.asarray(value)
    if value.dtype.kind not in "biufc" or not value.flags.c_contiguous:
        return Array(value)
    key = (value.dtype, value.shape)
    header = _WRITTEN_HEADERS.get(key)
    if header is None:
        stream = io.BytesIO()
        try:
            np.lib.format.write_array_header_1_0(
                stream, np.lib.format.header_data_from_array_1_0(value)
            )
        except ValueError:  # header too long for version 1.0
            return Array(value)
        header = stream.getvalue()
        if len(_WRITTEN_HEADERS) >= _MAX_CACHED_HEADERS:
            _WRITTEN_HEADERS.clear()
        _WRITTEN_HEADERS[key] = header
    data = b"".join((header, memoryview(value).cast("B"))) if value.size else header
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype="numpy.ndarray", data=data)


def all_finite(value: np.ndarray) -> bool:
    """True if no entry of ``value`` is NaN or +-Inf (always true for integers, bools, strings).

    float32/float64 arrays are screened with one BLAS dot product ``x . x``,
    which reads the data once and allocates nothing: any NaN or Inf makes it
    non-finite. Only when the screen is not finite (a NaN/Inf, or finite
    entries whose squares overflow) is the exact elementwise check run; small
    arrays get the exact check directly.
    """
    value = np.asarray(value)
    if value.dtype.kind not in "fc" or value.size == 0:
        return True
    if value.dtype in (np.float32, np.float64) and value.size > 1024:
        flat = value.ravel(order="K")  # a view for C- or Fortran-contiguous arrays
        with np.errstate(all="ignore"):
            if math.isfinite(float(np.dot(flat, flat))):
                return True
    return bool(np.isfinite(value).all())


def array_specs(record: ArrayRecord) -> dict[str, ArraySpec]:
    """The spec of every array in ``record``: what replies are checked against."""
    return {
        key: ArraySpec(tuple(int(d) for d in array.shape), str(array.dtype))
        for key, array in record.items()
    }


def _records(message: Message) -> tuple[list[ArrayRecord], list[MetricRecord]]:
    """The reply's ArrayRecords and MetricRecords, in one pass over its content.

    (``content.array_records`` and ``content.metric_records`` each build a new
    typed dict on every access; on a server validating hundreds of replies a
    round that Python overhead shows.)
    """
    array_records: list[ArrayRecord] = []
    metric_records: list[MetricRecord] = []
    for record in message.content.values():
        if isinstance(record, ArrayRecord):
            array_records.append(record)
        elif isinstance(record, MetricRecord):
            metric_records.append(record)
    return array_records, metric_records


def _only(records: list, what: str) -> object:
    if len(records) != 1:
        raise InvalidReply(f"expected exactly one {what}, found {len(records)}")
    return records[0]


_DTYPES: dict[str, np.dtype] = {}


def _np_dtype(name: str) -> np.dtype | None:
    """``np.dtype(name)``, cached (``str(dtype)`` and dtype parsing are slow in a hot loop)."""
    dtype = _DTYPES.get(name)
    if dtype is None:
        try:
            dtype = np.dtype(name)
        except TypeError:
            return None
        _DTYPES[name] = dtype
    return dtype


def _check_metrics(
    message: Message, metric_records: list[MetricRecord] | None = None
) -> tuple[int, dict[str, float]]:
    if metric_records is None:
        metric_records = _records(message)[1]
    record = _only(metric_records, "MetricRecord")
    assert isinstance(record, MetricRecord)
    if NUM_EXAMPLES_KEY not in record:
        raise InvalidReply(f"MetricRecord has no '{NUM_EXAMPLES_KEY}'")
    count = record[NUM_EXAMPLES_KEY]
    if isinstance(count, list) or not math.isfinite(count) or count <= 0:
        raise InvalidReply(f"'{NUM_EXAMPLES_KEY}' = {count!r} is not a positive count")
    if float(count) != int(count):
        raise InvalidReply(f"'{NUM_EXAMPLES_KEY}' = {count!r} is not a whole number")
    metrics: dict[str, float] = {}
    for key, value in record.items():
        if key == NUM_EXAMPLES_KEY or isinstance(value, list):
            continue
        if not math.isfinite(value):
            raise InvalidReply(f"metric '{key}' = {value!r} is not finite")
        metrics[key] = float(value)
    return int(count), metrics


def _check_error(message: Message) -> None:
    if message.has_error():
        raise InvalidReply(f"error reply: {message.error.reason}")
    if not message.has_content():
        raise InvalidReply("reply has no content")


def check_train_reply(
    message: Message, expected: Mapping[str, ArraySpec], *, check_finite: bool = True
) -> TrainReply:
    """Validate a training reply against the arrays that were sent.

    Checks, in order: not an error; exactly one ArrayRecord whose keys are
    exactly ``expected``'s; every shape and dtype as sent (read from the
    Array's metadata before decoding, then from the ``.npy`` header it
    carries, which must agree); every value finite (unless ``check_finite`` is
    false: for a caller that checks finiteness in its aggregation pass, see
    :func:`strategies.aggregation.finite_weighted_mean`); exactly one
    MetricRecord with a positive whole ``num-examples`` and finite metrics.

    The arrays of the returned :class:`TrainReply` are read-only views of the
    message's bytes (:func:`decode_array`): validation copies nothing.

    Raises
    ------
    InvalidReply
        With the first reason the reply fails.
    """
    _check_error(message)
    array_records, metric_records = _records(message)
    record = _only(array_records, "ArrayRecord")
    assert isinstance(record, ArrayRecord)
    if record.keys() != expected.keys():
        missing = sorted(set(expected) - set(record))
        extra = sorted(set(record) - set(expected))
        raise InvalidReply(f"array keys differ: missing {missing}, unexpected {extra}")
    arrays: dict[str, np.ndarray] = {}
    for key, spec in expected.items():
        array = record[key]
        shape = tuple(array.shape)
        if shape != spec.shape or array.dtype != spec.dtype:
            raise InvalidReply(
                f"array '{key}' is {array.dtype}{list(shape)}, "
                f"expected {spec.dtype}{list(spec.shape)}"
            )
        try:
            value = decode_array(array)
        except ValueError as error:
            raise InvalidReply(f"array '{key}': {error}") from None
        expected_dtype = _np_dtype(spec.dtype)
        if value.shape != spec.shape or (
            value.dtype != expected_dtype
            if expected_dtype is not None
            else str(value.dtype) != spec.dtype
        ):
            raise InvalidReply(
                f"array '{key}' carries {value.dtype}{list(value.shape)} in its data but "
                f"{array.dtype}{list(shape)} in its metadata"
            )
        if check_finite and not all_finite(value):
            raise InvalidReply(f"array '{key}' holds NaN or Inf")
        arrays[key] = value
    num_examples, metrics = _check_metrics(message, metric_records)
    return TrainReply(message.metadata.src_node_id, arrays, num_examples, metrics)


def check_evaluate_reply(message: Message) -> EvaluateReply:
    """Validate an evaluation reply: not an error, one MetricRecord, positive count."""
    _check_error(message)
    num_examples, metrics = _check_metrics(message)
    return EvaluateReply(message.metadata.src_node_id, num_examples, metrics)
