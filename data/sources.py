"""The registry of dataset sources, looked up by the run-config key ``dataset``.

``dataset`` is one registered name, or several joined by ``+`` to fuse them
(:func:`data.fusion.fuse`), e.g. ``"heart+csv"``:

- ``digits``: scikit-learn's bundled digits (:mod:`data.digits`); ``data-path``
  is ignored.
- ``mnist``: ``data-path`` a Keras-layout ``.npz`` (or a folder holding
  ``mnist.npz``); empty downloads with Keras (:mod:`data.mnist`).
- ``heart``: ``data-path`` a folder of the four ``processed.<site>.data``
  files; empty downloads from UCI into a cache (:mod:`data.heart`).
- ``csv`` / ``npz``: ``data-path`` is ``file[?label=col][&institution=col]``
  (:mod:`data.tabular_file`).

Every loading function takes ``max_classes``, the cap on a table's label
space (default :data:`data.tabular_file.DEFAULT_MAX_CLASSES`; the run-config
key ``max-classes``); sources with a fixed label space ignore it.

For a fused dataset, ``data-path`` is empty (every source's default) or one
entry per source, in the same order, separated by ``;`` (an empty entry
selects that source's default), e.g. ``dataset = "heart+csv"`` with
``data-path = "/data/uci-heart;/data/clinic.csv?label=num&institution=site"``.
A name may repeat (``"csv+csv"``) to fuse two files of one format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .dataset import LabeledData
from .digits import load_digits
from .fusion import FusionReport, Schema, fuse
from .heart import HEART_CLASSES, HEART_FEATURES, load_heart
from .mnist import load_mnist, load_mnist_split
from .tabular_file import (
    DEFAULT_MAX_CLASSES,
    TableFile,
    TableFileError,
    check_max_classes,
    read_table_file,
)

FUSION_SEPARATOR = "+"
PATH_SEPARATOR = ";"


@dataclass(frozen=True)
class LoadedSource:
    """One loaded source and the names fusion aligns it by."""

    data: LabeledData
    schema: Schema


# A loader takes the run-config ``data-path`` ("" when unset) and the class cap
# ``max_classes`` and returns the whole dataset; it raises
# FileNotFoundError/ValueError with a clear message.
SourceLoader = Callable[[str, int], LoadedSource]


def _from_table(table: TableFile) -> LoadedSource:
    return LoadedSource(table.data, Schema(table.feature_names, table.class_names))


SOURCES: dict[str, SourceLoader] = {
    "digits": lambda data_path, max_classes: LoadedSource(load_digits(), Schema()),
    "mnist": lambda data_path, max_classes: LoadedSource(load_mnist(data_path), Schema()),
    "heart": lambda data_path, max_classes: LoadedSource(
        load_heart(data_path), Schema(HEART_FEATURES, HEART_CLASSES)
    ),
    "csv": lambda data_path, max_classes: _from_table(
        read_table_file(data_path, "csv", max_classes=max_classes)
    ),
    "npz": lambda data_path, max_classes: _from_table(
        read_table_file(data_path, "npz", max_classes=max_classes)
    ),
}

# Sources with a published train/test split (see load_official_split).
OFFICIAL_SPLITS: dict[str, Callable[[str], tuple[LabeledData, LabeledData]]] = {
    "mnist": load_mnist_split,
}


def source_names(dataset: str) -> list[str]:
    """Split a ``dataset`` value on ``+`` into registered source names.

    Raises
    ------
    ValueError
        When a part is empty or not registered, naming the allowed values.
    """
    names = [part.strip() for part in dataset.split(FUSION_SEPARATOR)]
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(
            f"dataset={dataset!r}: {unknown} not among {', '.join(sorted(SOURCES))} "
            f"(join several with {FUSION_SEPARATOR!r} to fuse them)"
        )
    return names


def is_known_dataset(dataset: str) -> bool:
    """True when ``dataset`` is a registered name or ``+``-joined registered names."""
    try:
        source_names(dataset)
    except ValueError:
        return False
    return True


def split_data_path(data_path: str, count: int) -> list[str]:
    """One ``data-path`` entry per fused source: all empty, or ``;``-separated.

    Raises
    ------
    ValueError
        When the number of entries differs from ``count``.
    """
    if not data_path.strip():
        return [""] * count
    entries = [entry.strip() for entry in data_path.split(PATH_SEPARATOR)]
    if len(entries) != count:
        raise ValueError(
            f"data-path {data_path!r} has {len(entries)} {PATH_SEPARATOR!r}-separated "
            f"entries but the dataset fuses {count} sources; give one per source "
            "(empty for a source's default) or leave data-path empty"
        )
    return entries


def load_described_source(
    name: str, data_path: str = "", *, max_classes: int = DEFAULT_MAX_CLASSES
) -> LoadedSource:
    """Load the single source registered as ``name``, with its schema."""
    names = source_names(name)
    if len(names) != 1:
        raise ValueError(f"dataset={name!r} fuses {len(names)} sources; use load_fused")
    return SOURCES[names[0]](data_path, check_max_classes(max_classes))


def load_fused(
    dataset: str, data_path: str = "", *, max_classes: int = DEFAULT_MAX_CLASSES
) -> tuple[LabeledData, FusionReport]:
    """Load every source of a ``+``-joined ``dataset`` and fuse them.

    Each source, or each institution of a source, becomes one group of the
    result; see :func:`data.fusion.fuse` for the alignment rules and errors.

    Raises
    ------
    TableFileError
        When a table, or the union of the sources' classes, has more than
        ``max_classes`` classes.
    """
    check_max_classes(max_classes)
    names = source_names(dataset)
    loaded = [
        SOURCES[n](p, max_classes)
        for n, p in zip(names, split_data_path(data_path, len(names)), strict=True)
    ]
    fused, report = fuse(
        [s.data for s in loaded],
        [s.schema for s in loaded],
        name=FUSION_SEPARATOR.join(names),
    )
    if fused.num_classes > max_classes:
        raise TableFileError(
            f"dataset={dataset!r}, data-path {data_path!r}: the fused label space has "
            f"{fused.num_classes} classes, more than the class cap of {max_classes} "
            "(max-classes); the sources' class names differ more than expected"
        )
    return fused, report


def load_source(
    name: str, data_path: str = "", *, max_classes: int = DEFAULT_MAX_CLASSES
) -> LabeledData:
    """Load the dataset ``name``: one registered source, or several fused with ``+``.

    ``max_classes`` caps a table's label space (see :mod:`data.tabular_file`).
    """
    names = source_names(name)
    if len(names) > 1:
        return load_fused(name, data_path, max_classes=max_classes)[0]
    return SOURCES[names[0]](data_path, check_max_classes(max_classes)).data


def load_official_split(
    name: str, data_path: str = ""
) -> tuple[LabeledData, LabeledData] | None:
    """The published ``(train, test)`` split of source ``name``; None if none."""
    split = OFFICIAL_SPLITS.get(name.strip())
    return None if split is None else split(data_path)
