"""Checks on client replies: a malformed reply is rejected with a reason, never averaged."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from flwr.app import ArrayRecord, Message, MetricRecord

NUM_EXAMPLES_KEY = "num-examples"


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


def array_specs(record: ArrayRecord) -> dict[str, ArraySpec]:
    """The spec of every array in ``record``: what replies are checked against."""
    return {
        key: ArraySpec(tuple(int(d) for d in array.shape), str(array.dtype))
        for key, array in record.items()
    }


def _only_record(records: Mapping[str, object], what: str) -> object:
    if len(records) != 1:
        raise InvalidReply(f"expected exactly one {what}, found {len(records)}")
    return next(iter(records.values()))


def _check_metrics(message: Message) -> tuple[int, dict[str, float]]:
    record = _only_record(message.content.metric_records, "MetricRecord")
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


def check_train_reply(message: Message, expected: Mapping[str, ArraySpec]) -> TrainReply:
    """Validate a training reply against the arrays that were sent.

    Checks, in order: not an error; exactly one ArrayRecord whose keys are
    exactly ``expected``'s; every shape and dtype as sent (read from the
    Array's header, before deserialising); every value finite; exactly one
    MetricRecord with a positive whole ``num-examples`` and finite metrics.

    Raises
    ------
    InvalidReply
        With the first reason the reply fails.
    """
    _check_error(message)
    record = _only_record(message.content.array_records, "ArrayRecord")
    assert isinstance(record, ArrayRecord)
    missing = sorted(set(expected) - set(record))
    extra = sorted(set(record) - set(expected))
    if missing or extra:
        raise InvalidReply(f"array keys differ: missing {missing}, unexpected {extra}")
    arrays: dict[str, np.ndarray] = {}
    for key, spec in expected.items():
        array = record[key]
        shape = tuple(int(d) for d in array.shape)
        if shape != spec.shape or str(array.dtype) != spec.dtype:
            raise InvalidReply(
                f"array '{key}' is {array.dtype}{list(shape)}, "
                f"expected {spec.dtype}{list(spec.shape)}"
            )
        value = array.numpy()
        if not np.isfinite(value).all():
            raise InvalidReply(f"array '{key}' holds NaN or Inf")
        arrays[key] = value
    num_examples, metrics = _check_metrics(message)
    return TrainReply(message.metadata.src_node_id, arrays, num_examples, metrics)


def check_evaluate_reply(message: Message) -> EvaluateReply:
    """Validate an evaluation reply: not an error, one MetricRecord, positive count."""
    _check_error(message)
    num_examples, metrics = _check_metrics(message)
    return EvaluateReply(message.metadata.src_node_id, num_examples, metrics)
