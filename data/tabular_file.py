"""A user's own table, from a CSV or an ``.npz`` file, with a named label column.

Selected with ``dataset = "csv"`` or ``dataset = "npz"``; the run-config key
``data-path`` names the file, optionally followed by a query that names the
columns::

    data-path = "records.csv"                       # columns "label", "institution"
    data-path = "records.csv?label=diagnosis"       # label column "diagnosis"
    data-path = "records.npz?label=y&institution=site"  # both named

- ``label`` (default ``label``): the class of each row. Non-negative integers
  (``0``, ``3``, ``2.0``) are used as class ids and the label space is
  ``0..max``; any other values (``"benign"``, ``"malignant"``) are classes in
  sorted order.
- ``institution`` (default ``institution``, used only when present): the
  hospital, site or writer of each row; each value becomes one group, so
  ``partitioner = "natural"`` gives one client per institution. A column named
  explicitly in the query must exist.
- Every other column is a numeric feature, in file order. Rows with a missing
  value (empty, ``?``, ``NA``, ``NaN``) are dropped and counted in the log,
  as the UCI Heart Disease preprocessing does; anything else that is not a
  number is an error naming the column and the row.

CSV files are comma-separated with a header row (Python's :mod:`csv`
dialect, so quoted fields work). ``.npz`` files hold one 1-D array per column,
keyed by the column name (``np.savez(path, age=..., label=...)``), read
without pickles.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Literal

import numpy as np

from flwr.common.logger import log

from .dataset import LabeledData

FileFormat = Literal["csv", "npz"]
QUERY_KEYS = ("label", "institution")
DEFAULT_LABEL_COLUMN = "label"
DEFAULT_INSTITUTION_COLUMN = "institution"
MISSING_TOKENS = frozenset({"", "?", "na", "nan", "null"})


@dataclass(frozen=True)
class FileSpec:
    """A parsed ``data-path``: the file and the names of its special columns.

    ``institution_required`` is True when the query named the column, so its
    absence is an error rather than "no institutions".
    """

    path: Path
    label_column: str = DEFAULT_LABEL_COLUMN
    institution_column: str = DEFAULT_INSTITUTION_COLUMN
    institution_required: bool = False


@dataclass(frozen=True)
class TableFile:
    """A loaded table and the names fusion aligns it by."""

    data: LabeledData
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]


def parse_file_spec(data_path: str, file_format: FileFormat) -> FileSpec:
    """Split ``"file.csv?label=col&institution=col"`` into a :class:`FileSpec`.

    Raises
    ------
    ValueError
        On an empty path, an unknown query key or an empty column name.
    """
    if not data_path.strip():
        raise ValueError(
            f"dataset={file_format!r} needs data-path naming a .{file_format} file, "
            f"e.g. 'records.{file_format}?label=diagnosis&institution=hospital'"
        )
    path_text, _, query = data_path.partition("?")
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if key not in QUERY_KEYS or not sep:
            raise ValueError(
                f"data-path {data_path!r}: {item!r} is not one of "
                f"{', '.join(k + '=<column>' for k in QUERY_KEYS)}"
            )
        if not value.strip():
            raise ValueError(f"data-path {data_path!r}: {key}= names no column")
        options[key] = value.strip()
    return FileSpec(
        path=Path(path_text.strip()).expanduser(),
        label_column=options.get("label", DEFAULT_LABEL_COLUMN),
        institution_column=options.get("institution", DEFAULT_INSTITUTION_COLUMN),
        institution_required="institution" in options,
    )


def read_csv_columns(path: Path) -> dict[str, np.ndarray]:
    """Read a CSV with a header row into one string array per column.

    Raises
    ------
    ValueError
        On an empty file, a repeated or empty column name, or a row whose
        length differs from the header's.
    """
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 CSV file: {err}") from err
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{path} is empty; expected a header row and data rows")
    header = [name.strip() for name in rows[0]]
    if len(rows) == 1:
        raise ValueError(f"{path} has a header row but no data rows")
    repeated = sorted({n for n in header if header.count(n) > 1})
    if repeated or "" in header:
        raise ValueError(
            f"{path}: header columns must be named once each; "
            f"repeated {repeated}, empty {header.count('')}"
        )
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(
                f"{path}, row {line_no}: {len(row)} values, header has {len(header)}"
            )
    cells = np.array(rows[1:], dtype=str).reshape(len(rows) - 1, len(header))
    return {name: np.char.strip(cells[:, j]) for j, name in enumerate(header)}


def read_npz_columns(path: Path) -> dict[str, np.ndarray]:
    """Read an ``.npz`` of equal-length 1-D arrays, one per column, without pickles.

    Raises
    ------
    ValueError
        When the file is not an ``.npz``, holds object arrays, or its arrays
        are not 1-D of one length.
    """
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not one array per column")
        with archive:
            columns = {name: archive[name] for name in archive.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable .npz of columns: {err}") from err
    bad = {name: a.shape for name, a in columns.items() if a.ndim != 1}
    if bad:
        raise ValueError(
            f"{path}: every column must be a 1-D array; found shapes {bad}"
        )
    lengths = {name: len(a) for name, a in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: columns differ in length: {lengths}")
    if not columns:
        raise ValueError(f"{path} holds no arrays")
    return columns


def canonical_value(value: object) -> str:
    """A label or institution value as text: ``2.0`` and ``"2"`` both give ``"2"``."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if math.isfinite(number) and number.is_integer():
        return str(int(number))
    return text


def is_missing(values: np.ndarray) -> np.ndarray:
    """True where a raw column value is missing (NaN or a missing-value token)."""
    if values.dtype.kind in "fc":
        return np.isnan(values)
    if values.dtype.kind in "biu":
        return np.zeros(len(values), dtype=bool)
    lowered = np.char.lower(np.char.strip(values.astype(str)))
    return np.isin(lowered, list(MISSING_TOKENS))


def numeric_column(
    values: np.ndarray, column: str, source: str, rows: np.ndarray
) -> np.ndarray:
    """Convert a complete feature column to float32, naming the first bad value.

    ``rows`` holds each value's 0-based data-row number in the file, for messages.

    Raises
    ------
    ValueError
        When a value is not a number.
    """
    if values.dtype.kind in "biuf":
        return values.astype(np.float32)
    out = np.empty(len(values), dtype=np.float32)
    for k, cell in enumerate(values):
        try:
            out[k] = float(cell)
        except ValueError:
            raise ValueError(
                f"{source}: column {column!r}, data row {rows[k] + 1}: "
                f"{str(cell)!r} is not a "
                f"number; encode it numerically, or name it with ?label= or "
                "?institution= if it is the label or the institution"
            ) from None
    return out


def encode_labels(values: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map label texts to class ids; return ``(ids, class_names)``.

    Non-negative integers are their own ids (label space ``0..max``); other
    labels are numbered in sorted order.
    """
    if values and all(v.isdigit() for v in values):
        ids = np.array([int(v) for v in values], dtype=np.int64)
        return ids, tuple(str(k) for k in range(int(ids.max()) + 1))
    names = tuple(sorted(set(values)))
    index = {name: k for k, name in enumerate(names)}
    return np.array([index[v] for v in values], dtype=np.int64), names


def encode_groups(values: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map institution texts to group ids in natural order; return ``(ids, names)``."""
    names = tuple(
        sorted(set(values), key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))
    )
    index = {name: k for k, name in enumerate(names)}
    return np.array([index[v] for v in values], dtype=np.int64), names


def table_from_columns(
    columns: dict[str, np.ndarray], spec: FileSpec, source: str
) -> TableFile:
    """Turn named raw columns into a tabular :class:`TableFile`.

    Raises
    ------
    ValueError
        When the label (or a named institution) column is absent, no feature
        column is left, a feature is not numeric, or no complete row remains.
    """
    available = list(columns)
    if spec.label_column not in columns:
        raise ValueError(
            f"{source}: label column {spec.label_column!r} not found; columns are "
            f"{available}; name the label column with '?label=<column>'"
        )
    institution = (
        spec.institution_column if spec.institution_column in columns else None
    )
    if institution is None and spec.institution_required:
        raise ValueError(
            f"{source}: institution column {spec.institution_column!r} not found; "
            f"columns are {available}"
        )
    if institution == spec.label_column:
        raise ValueError(
            f"{source}: column {spec.label_column!r} cannot be both label "
            "and institution"
        )
    feature_names = tuple(
        c for c in available if c not in (spec.label_column, institution)
    )
    if not feature_names:
        raise ValueError(f"{source}: no feature columns besides {available}")
    missing = np.zeros(len(columns[spec.label_column]), dtype=bool)
    for name in available:
        missing |= is_missing(columns[name])
    keep = ~missing
    if not keep.any():
        raise ValueError(f"{source}: no row is complete (every row misses a value)")
    if missing.any():
        log(
            INFO,
            "%s: dropped %d of %d rows with missing values",
            source,
            int(missing.sum()),
            len(missing),
        )
    x = np.stack(
        [
            numeric_column(columns[c][keep], c, source, np.flatnonzero(keep))
            for c in feature_names
        ],
        axis=1,
    )
    y, class_names = encode_labels(
        [canonical_value(v) for v in columns[spec.label_column][keep]]
    )
    groups, group_names = (None, ())
    if institution is not None:
        groups, group_names = encode_groups(
            [canonical_value(v) for v in columns[institution][keep]]
        )
    data = LabeledData(
        x=x,
        y=y,
        num_classes=len(class_names),
        kind="tabular",
        name=spec.path.name,
        groups=groups,
        group_names=group_names,
    )
    return TableFile(data=data, feature_names=feature_names, class_names=class_names)


def read_table_file(data_path: str, file_format: FileFormat) -> TableFile:
    """Load the CSV or ``.npz`` table ``data_path`` names (see the module docstring).

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        On a bad ``data-path`` query or a malformed file.
    """
    spec = parse_file_spec(data_path, file_format)
    if not spec.path.is_file():
        raise FileNotFoundError(
            f"dataset={file_format!r}: file {spec.path} does not exist"
        )
    other = "npz" if file_format == "csv" else "csv"
    if spec.path.suffix.lower() == f".{other}":
        raise ValueError(
            f"{spec.path} looks like a .{other} file; use dataset={other!r} for it"
        )
    reader = read_csv_columns if file_format == "csv" else read_npz_columns
    table = table_from_columns(reader(spec.path), spec, str(spec.path))
    log(
        INFO,
        "%s: %d rows, %d features, classes %s, institutions %s",
        spec.path,
        len(table.data),
        len(table.feature_names),
        list(table.class_names),
        list(table.data.group_names) or "none",
    )
    return table


def load_csv(data_path: str) -> LabeledData:
    """Load a user's CSV table; see :func:`read_table_file`."""
    return read_table_file(data_path, "csv").data


def load_npz(data_path: str) -> LabeledData:
    """Load a user's ``.npz`` table; see :func:`read_table_file`."""
    return read_table_file(data_path, "npz").data
