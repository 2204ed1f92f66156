"""Where a node's data comes from: its part of the run's dataset, or its own file.

The ClientApp reads this from its **node config**, in simulation and in
deployment alike (one code path):

- ``partition-id`` and ``num-partitions``: the node holds part ``partition-id``
  of the run's ``dataset`` partitioned over ``num-partitions`` clients
  (:func:`data.federation.load_client_data`). Flower's simulation sets these
  two keys; a SuperNode gets them from ``--node-config``.
- ``data-path``: an institution's own file, on the node's own machine. The
  node loads only that file, in the format of the run config's ``dataset``,
  and is not partitioned. ``partition-id`` may accompany it; it then only
  names the node (its validation-split seed, its local data-order seed, its
  task under ``client-tasks``) and defaults to 0. ``num-partitions`` is
  ignored.

What ``data-path`` names, by the run config's ``dataset``:

- ``heart``: one hospital's ``processed.<site>.data`` file (UCI layout, 14
  columns, missing values ``?`` or ``NaN``), with FLamby's preprocessing
  (:func:`data.heart.preprocess_heart`);
- ``mnist``: a Keras-layout ``.npz`` (or a folder holding ``mnist.npz``); all
  of its images are the node's;
- ``csv`` / ``npz``: ``file?label=col&classes=...`` (the query of
  :mod:`data.tabular_file` plus ``classes``, see below); an ``institution``
  column is read but not used: every row is the node's;
- ``digits`` ships no files and fused datasets (``heart+csv``) have no single
  file format: both are refused with a message.

Decisions
---------
Label space
    The model every party builds must match the server's: same input shape,
    same number of classes. The number of classes therefore comes from the
    dataset, never from the labels a node happens to hold: ``heart`` has
    :data:`data.heart.HEART_CLASSES`, ``mnist`` 10. A CSV or ``.npz`` table
    has no fixed label space, so its ``data-path`` must declare the
    federation's with ``classes=``: a count (``classes=5``: integer labels
    0..4) or the class names in the order the server's file numbers them
    (integer labels ascending, names sorted: ``classes=benign,malignant``).
    A node may hold only some of them; a label outside them is an error.
    The declared classes, and the file's own label space, are capped at
    ``max_classes`` (:data:`data.tabular_file.DEFAULT_MAX_CLASSES`, the
    run-config key ``max-classes``), as the server's table is.
Validation split
    The node's rows are split into train and validation with the run config's
    ``val-fraction``, stratified by label, seeded with ``seed +
    partition-id``: the same rule as a partition's split, so it is
    reproducible. Nothing is held out for the server: the server's test set
    is its own (the run config's ``dataset`` and ``data-path`` on the
    SuperLink's machine).
Standardisation
    Tabular features are standardised to zero mean and unit variance with
    the statistics of the node's **own training split**
    (:func:`data.federation.standardize`), applied to its validation split.
    Raw data never leaves the node, so the pooled statistics the simulation
    uses (the whole federation's training side) are not available to it;
    per-node statistics are the same transformation computed on what the
    node may see. The cost: features of nodes with very different
    populations are scaled differently, and the server's test set is scaled
    with its own training side's statistics. Images are scaled to [0, 1] by
    their loader, as in the federation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from logging import INFO
from pathlib import Path

import numpy as np

from flwr.common.logger import log

from .dataset import LabeledData
from .federation import split_local, standardize
from .heart import HEART_CLASSES, parse_heart_table, preprocess_heart
from .mnist import load_mnist
from .sources import FUSION_SEPARATOR, SOURCES
from .tabular_file import (
    DEFAULT_MAX_CLASSES,
    TableFileError,
    canonical_value,
    check_max_classes,
    read_table_file,
)

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
CLASSES_KEY = "classes"
NODE_FILE_DATASETS = ("heart", "mnist", "csv", "npz")


@dataclass(frozen=True)
class NodeData:
    """Where this node's data comes from, as its node config says.

    ``data_path`` set: the node's own file (``num_partitions`` is None);
    otherwise part ``partition_id`` of ``num_partitions``.
    """

    partition_id: int
    num_partitions: int | None = None
    data_path: str | None = None


def node_data(node_config: Mapping[str, object]) -> NodeData:
    """Read ``data-path`` or ``partition-id``/``num-partitions`` from a node config.

    ``data-path`` wins when both are given (an empty ``data-path`` counts as
    absent).

    Raises
    ------
    ValueError
        When the node config names neither a file nor a partition, or a value
        is not an integer; the message names the keys and shows both forms.
    """
    data_path = str(node_config.get(DATA_PATH, "") or "").strip()
    if data_path:
        return NodeData(_integer(node_config, PARTITION_ID, 0), data_path=data_path)
    missing = [k for k in (PARTITION_ID, NUM_PARTITIONS) if k not in node_config]
    if missing:
        raise ValueError(
            f"node config {dict(node_config)!r} has no {' or '.join(map(repr, missing))} "
            f"and no {DATA_PATH!r}: start the SuperNode with "
            f"--node-config \"{PARTITION_ID}=K {NUM_PARTITIONS}=N\" (part K of the run's "
            f"dataset split over N nodes) or --node-config \"{DATA_PATH}='/path/to/file'\" "
            "(this institution's own file)"
        )
    return NodeData(
        _integer(node_config, PARTITION_ID), _integer(node_config, NUM_PARTITIONS)
    )


def _integer(node_config: Mapping[str, object], key: str, default: int | None = None) -> int:
    value = node_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"node config {key}={value!r} must be an integer")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"node config {key}={value!r} must be an integer") from None


# ------------------------------------------------------------------------------ files
def split_classes(
    data_path: str, max_classes: int = DEFAULT_MAX_CLASSES
) -> tuple[str, tuple[str, ...] | None]:
    """Take ``classes=...`` out of a table ``data-path``'s query.

    Returns the ``data-path`` without it (for :func:`read_table_file`) and the
    declared class names: ``classes=3`` gives ``("0", "1", "2")``,
    ``classes=a,b`` gives ``("a", "b")``; None when not declared.

    Raises
    ------
    TableFileError
        On an empty or repeated class list, or more than ``max_classes``
        classes (checked before any name is built).
    """
    check_max_classes(max_classes)
    path, sep, query = data_path.partition("?")
    kept, declared = [], None
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key.strip() != CLASSES_KEY:
            kept.append(item)
            continue
        names = [canonical_value(v) for v in value.split(",") if v.strip()]
        if not names:
            raise TableFileError(f"data-path {data_path!r}: {CLASSES_KEY}= names no class")
        if len(names) == 1 and names[0].isascii() and names[0].isdigit():
            text = names[0].lstrip("0") or "0"
            if len(text) > len(str(max_classes)) or int(text) > max_classes:
                raise TableFileError(
                    f"data-path {data_path!r}: {CLASSES_KEY}={names[0]} is more than "
                    f"the class cap of {max_classes} (max-classes)"
                )
            count = int(text)
            if count < 2:
                raise TableFileError(
                    f"data-path {data_path!r}: {CLASSES_KEY}={count} needs >= 2"
                )
            names = [str(k) for k in range(count)]
        if len(names) > max_classes:
            raise TableFileError(
                f"data-path {data_path!r}: {CLASSES_KEY} declares {len(names)} classes, "
                f"more than the class cap of {max_classes} (max-classes)"
            )
        if len(set(names)) != len(names):
            raise TableFileError(
                f"data-path {data_path!r}: {CLASSES_KEY} repeats a name: {names}"
            )
        declared = tuple(names)
    rebuilt = path + (sep + "&".join(kept) if kept else "")
    return rebuilt, declared


def _existing_file(path_text: str, what: str) -> Path:
    path = Path(path_text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"node config data-path {path_text!r}: {path.absolute()} does not exist "
            f"on this node; it must name {what}"
        )
    return path


def load_heart_file(data_path: str) -> LabeledData:
    """One hospital's UCI file, preprocessed as :func:`data.heart.load_heart` does."""
    path = _existing_file(data_path, "this hospital's processed.<site>.data file")
    if path.is_dir():
        raise ValueError(
            f"node config data-path {data_path!r} is a folder; a node reads one "
            "hospital's file, e.g. .../processed.cleveland.data"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a text file: {err}") from err
    x, y = preprocess_heart(parse_heart_table(text, str(path)))
    if not len(y):
        raise ValueError(f"{path}: no patient is left after dropping incomplete rows")
    return LabeledData(
        x=x, y=y, num_classes=len(HEART_CLASSES), kind="tabular", name=f"heart/{path.name}"
    )


def load_table_file(
    data_path: str, file_format: str, max_classes: int = DEFAULT_MAX_CLASSES
) -> LabeledData:
    """A CSV/``.npz`` table whose labels are renumbered onto the declared ``classes``.

    Raises
    ------
    TableFileError
        On a malformed file or ``data-path``, an undeclared label space, more
        than ``max_classes`` classes, or a label outside the declared ones.
    FileNotFoundError
        When the file is not on this node.
    """
    path_text, declared = split_classes(data_path, max_classes)
    if declared is None:
        raise TableFileError(
            f"node config data-path {data_path!r} must declare the federation's label "
            f"space, which the server's model has: add '{CLASSES_KEY}=N' (integer labels "
            f"0..N-1) or '{CLASSES_KEY}=name1,name2,...' (in the order the server's file "
            f"numbers them), e.g. 'records.{file_format}?label=diagnosis&{CLASSES_KEY}=2'. "
            "A node may hold only some of the classes; its model must still have all of them"
        )
    _existing_file(path_text.partition("?")[0], f"this institution's .{file_format} file")
    table = read_table_file(
        path_text,
        file_format,  # type: ignore[arg-type]
        max_classes=max_classes,
        defines_label_space=False,
    )
    index = {name: k for k, name in enumerate(declared)}
    present = sorted(set(table.data.y.tolist()))
    unknown = [table.class_names[k] for k in present if table.class_names[k] not in index]
    if unknown:
        raise TableFileError(
            f"node config data-path {data_path!r}: labels {unknown[:20]} are not among the "
            f"declared {CLASSES_KEY} {list(declared[:20])}"
            f"{' ...' if len(declared) > 20 else ''}"
        )
    mapping = np.array([index.get(name, -1) for name in table.class_names], dtype=np.int64)
    return LabeledData(
        x=table.data.x, y=mapping[table.data.y], num_classes=len(declared),
        kind="tabular", name=table.data.name,
    )


def load_node_file(
    dataset: str, data_path: str, max_classes: int = DEFAULT_MAX_CLASSES
) -> LabeledData:
    """The whole of a node's own file, in the format of the run's ``dataset``.

    ``max_classes`` caps a table's label space (``csv``/``npz`` only).

    Raises
    ------
    ValueError
        For a dataset without node files (``digits``, fused datasets), a
        malformed file or an undeclared label space.
    FileNotFoundError
        When the file is not on this node.
    """
    name = dataset.strip()
    if FUSION_SEPARATOR in name:
        raise ValueError(
            f"dataset={dataset!r} fuses several sources; a node config data-path names one "
            "file, which needs a single-source dataset "
            f"({', '.join(NODE_FILE_DATASETS)}); use partition-id/num-partitions instead"
        )
    if name == "heart":
        return load_heart_file(data_path)
    if name == "mnist":
        _existing_file(data_path, "a Keras-layout .npz or a folder holding mnist.npz")
        return load_mnist(data_path)
    if name in ("csv", "npz"):
        return load_table_file(data_path, name, max_classes)
    if name in SOURCES:
        raise ValueError(
            f"dataset={dataset!r} ships no files a node could hold; a node config "
            f"data-path needs dataset one of {', '.join(NODE_FILE_DATASETS)}; "
            "use partition-id/num-partitions instead"
        )
    raise ValueError(f"dataset={dataset!r} is not a known dataset")


@lru_cache(maxsize=16)
def load_node_data(
    dataset: str,
    data_path: str,
    val_fraction: float,
    seed: int,
    partition_id: int = 0,
    max_classes: int = DEFAULT_MAX_CLASSES,
) -> tuple[LabeledData, LabeledData]:
    """This node's own ``(train, validation)``, from its file alone (see the module docstring).

    ``max_classes`` caps a table's label space (the run-config key
    ``max-classes``). Cached per process, like a partition.
    """
    local = load_node_file(dataset, data_path, max_classes)
    train, val = standardize(*split_local(local, val_fraction, seed + partition_id))
    log(
        INFO,
        "Node file %s: %d train / %d validation samples, labels %s",
        data_path,
        len(train),
        len(val),
        train.label_histogram().tolist(),
    )
    return train, val
