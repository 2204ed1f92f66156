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
  value (empty, ``?``, ``NA``, ``NaN`` in any spelling ``float`` reads, or a
  NaN in an ``.npz``) are dropped and counted in the log, as the UCI Heart
  Disease preprocessing does; anything else that is not a number is an error
  naming the column and the row.

CSV files are comma-separated with a header row (Python's :mod:`csv`
dialect, so quoted fields work), in UTF-8; a byte-order mark (as Excel's
"CSV UTF-8" writes) is ignored. ``.npz`` files hold one 1-D array per column,
keyed by the column name (``np.savez(path, age=..., label=...)``), of numbers,
booleans or text, read without pickles.

Decisions
---------
Errors
    Every problem with a file's content or its ``data-path`` query raises
    :class:`TableFileError` (a :class:`ValueError`) whose message names the
    file and, where there is one, the column and the data row (the N-th
    non-empty row after the header); a missing file raises
    :class:`FileNotFoundError`. No other exception type leaves this module for
    a malformed file.
Class cap
    The label space is capped at ``max_classes`` classes
    (:data:`DEFAULT_MAX_CLASSES` unless the caller passes another; the
    run-config key ``max-classes``). Integer labels are class ids, so one
    stray id (``1000000000``) would otherwise build a billion-class model;
    text labels each become a class, so a free-text column would too. Past
    the cap the file is refused, naming the first label value that crosses
    it and its row.
Non-finite features
    ``inf``, ``-inf``, ``1e999`` and any value beyond float32's range
    (about ±3.4e38, which becomes infinite as float32) are **errors**, not
    missing values: an infinite feature is a broken export, not a gap, and
    dropping such rows silently would hide it. Left in, it makes every
    client's update non-finite, which the server rejects for the whole run.
    (NaN, by contrast, is the usual missing-value marker and drops the row.)
Label warnings
    The file still loads, with a WARNING in the log, when its label column
    looks wrong: when it holds a single class (a model trained on it scores
    accuracy 1.0); when it looks continuous, that is, its values are all
    numbers and one is not an integer (``0.37``), or it has more than
    :data:`CONTINUOUS_MIN_DISTINCT` distinct values and fewer than
    :data:`CONTINUOUS_MIN_ROWS_PER_CLASS` rows per distinct value on
    average (an ``age`` column used as label); and when integer ids leave
    classes of ``0..max`` without any row (1-based or sparse ids). The
    single-class and empty-class warnings apply only where the file defines
    the label space (``dataset = "csv"``), not to a node's own file, which
    may hold some of the federation's declared classes only.
"""

from __future__ import annotations

import csv
import math
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Literal

import numpy as np

from flwr.common.logger import log

from .dataset import LabeledData

FileFormat = Literal["csv", "npz"]
QUERY_KEYS = ("label", "institution")
DEFAULT_LABEL_COLUMN = "label"
DEFAULT_INSTITUTION_COLUMN = "institution"
MISSING_TOKENS = frozenset({"", "?", "na", "nan", "-nan", "+nan", "null"})
#: Most classes a table's label space may have unless the caller passes
#: ``max_classes`` (the run-config key ``max-classes``).
DEFAULT_MAX_CLASSES = 1000
#: A label column with more distinct values than this ...
CONTINUOUS_MIN_DISTINCT = 20
#: ... and fewer rows than this per distinct value on average looks continuous.
CONTINUOUS_MIN_ROWS_PER_CLASS = 10
#: ``.npz`` column dtypes read (kinds): booleans, integers, floats, text, bytes.
NPZ_KINDS = "biufUS"
_NPZ_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    OverflowError,
    RuntimeError,  # an encrypted zip member
    NotImplementedError,  # an unsupported zip compression method
    MemoryError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
)
_SHOWN_CHARS = 40


class TableFileError(ValueError):
    """A malformed table file or ``data-path``; the message names the file."""


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


def shown(value: object) -> str:
    """``repr`` of a cell's text for a message, shortened past 40 characters."""
    text = str(value)
    if len(text) > _SHOWN_CHARS:
        return repr(text[: _SHOWN_CHARS - 10]) + f"... ({len(text)} characters)"
    return repr(text)


def check_max_classes(max_classes: int) -> int:
    """Validate a class cap: an integer >= 1 (bools refused).

    Raises
    ------
    ValueError
        Otherwise.
    """
    if isinstance(max_classes, bool) or not isinstance(max_classes, int) or max_classes < 1:
        raise ValueError(f"max-classes={max_classes!r} must be an integer >= 1")
    return max_classes


def parse_file_spec(data_path: str, file_format: FileFormat) -> FileSpec:
    """Split ``"file.csv?label=col&institution=col"`` into a :class:`FileSpec`.

    Raises
    ------
    TableFileError
        On an empty path, an unknown query key or an empty column name.
    """
    if not data_path.strip():
        raise TableFileError(
            f"dataset={file_format!r} needs data-path naming a .{file_format} file, "
            f"e.g. 'records.{file_format}?label=diagnosis&institution=hospital'"
        )
    path_text, _, query = data_path.partition("?")
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if key not in QUERY_KEYS or not sep:
            raise TableFileError(
                f"data-path {data_path!r}: {item!r} is not one of "
                f"{', '.join(k + '=<column>' for k in QUERY_KEYS)}"
            )
        if not value.strip():
            raise TableFileError(f"data-path {data_path!r}: {key}= names no column")
        options[key] = value.strip()
    return FileSpec(
        path=Path(path_text.strip()).expanduser(),
        label_column=options.get("label", DEFAULT_LABEL_COLUMN),
        institution_column=options.get("institution", DEFAULT_INSTITUTION_COLUMN),
        institution_required="institution" in options,
    )


def read_csv_columns(path: Path) -> dict[str, np.ndarray]:
    """Read a UTF-8 CSV with a header row into one array of ``str`` per column.

    A byte-order mark is ignored; blank rows are skipped. The arrays have
    dtype object (stripped ``str``), so one very long cell costs its own
    length, not that length times every cell of the table.

    Raises
    ------
    TableFileError
        On a file that is not UTF-8 or not readable as CSV, an empty file, a
        repeated or empty column name, or a row whose length differs from
        the header's.
    """
    rows: list[list[str]] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            try:
                for row in reader:
                    if any(cell.strip() for cell in row):
                        rows.append(row)
            except csv.Error as err:
                raise TableFileError(
                    f"{path}, line {reader.line_num}: not readable as CSV: {err}"
                ) from None
    except UnicodeDecodeError as err:
        raise TableFileError(
            f"{path} is not a UTF-8 CSV file (byte {err.start}: {err.reason}); "
            "save it as UTF-8"
        ) from None
    except OSError as err:
        raise TableFileError(f"{path} cannot be read: {err}") from None
    if not rows:
        raise TableFileError(f"{path} is empty; expected a header row and data rows")
    header = [name.strip().lstrip("\ufeff").strip() for name in rows[0]]
    if len(rows) == 1:
        raise TableFileError(f"{path} has a header row but no data rows")
    repeated = sorted({n for n in header if header.count(n) > 1})
    if repeated or "" in header:
        raise TableFileError(
            f"{path}: header columns must be named once each; "
            f"repeated {repeated}, empty {header.count('')}"
        )
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise TableFileError(
                f"{path}, row {line_no}: {len(row)} values, header has {len(header)}"
            )
    return {
        name: _text_array([row[j].strip() for row in rows[1:]])
        for j, name in enumerate(header)
    }


def _text_array(values: Sequence[str]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _check_npz_members(archive: zipfile.ZipFile, path: Path) -> None:
    """Refuse members that are not ``.npy`` arrays or declare more data than they hold.

    Read before any array is: a header declaring shape ``(4_000_000_000,)``
    would otherwise make numpy allocate 30 GiB before finding the data short.
    """
    for info in archive.infolist():
        if info.is_dir():
            continue
        if not info.filename.endswith(".npy"):
            raise TableFileError(
                f"{path}: member {shown(info.filename)} is not a .npy array; an .npz "
                "of columns holds one array per column (np.savez)"
            )
        column = info.filename[: -len(".npy")]
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise TableFileError(
                    f"{path}: column {shown(column)} is in .npy format {version}, "
                    "which holds structured arrays; save plain 1-D columns"
                )
        declared = math.prod(shape) * dtype.itemsize
        if declared > info.file_size:
            raise TableFileError(
                f"{path}: column {shown(column)} declares shape {shape} of {dtype} "
                f"({declared} bytes) but holds {info.file_size} bytes; the file is "
                "truncated or corrupt"
            )


def read_npz_columns(path: Path) -> dict[str, np.ndarray]:
    """Read an ``.npz`` of equal-length 1-D arrays, one per column, without pickles.

    Numeric and boolean columns keep their dtype; text and UTF-8 bytes become
    arrays of ``str`` (dtype object), as :func:`read_csv_columns` gives.

    Raises
    ------
    TableFileError
        When the file is not an ``.npz`` of ``.npy`` arrays, holds object
        arrays (pickles) or another dtype (complex, dates, records), or its
        arrays are not 1-D of one length.
    """
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not one array per column")
        with archive:
            _check_npz_members(archive.zip, path)
            columns = {name: archive[name] for name in archive.files}
    except TableFileError:
        raise
    except _NPZ_READ_ERRORS as err:
        raise TableFileError(
            f"{path} is not a readable .npz of columns: {type(err).__name__}: "
            f"{str(err)[:300]}"
        ) from None
    if not columns:
        raise TableFileError(f"{path} holds no arrays")
    bad = {
        name: getattr(a, "shape", type(a).__name__)
        for name, a in columns.items()
        if not isinstance(a, np.ndarray) or a.ndim != 1
    }
    if bad:
        raise TableFileError(
            f"{path}: every column must be a 1-D array; found shapes {bad}"
        )
    lengths = {name: len(a) for name, a in columns.items()}
    if len(set(lengths.values())) > 1:
        raise TableFileError(f"{path}: columns differ in length: {lengths}")
    return {name: _npz_column(a, name, path) for name, a in columns.items()}


def _npz_column(values: np.ndarray, name: str, path: Path) -> np.ndarray:
    kind = values.dtype.kind
    if kind not in NPZ_KINDS:
        raise TableFileError(
            f"{path}: column {shown(name)} holds {values.dtype}; columns must hold "
            "numbers, booleans or text"
        )
    if kind == "U":
        return _text_array([str(v).strip() for v in values])
    if kind == "S":
        texts = []
        for k, raw in enumerate(values):
            try:
                texts.append(bytes(raw).decode("utf-8").strip())
            except UnicodeDecodeError:
                raise TableFileError(
                    f"{path}: column {shown(name)}, data row {k + 1}: bytes {shown(raw)} "
                    "are not UTF-8 text"
                ) from None
        return _text_array(texts)
    return values


def canonical_value(value: object) -> str:
    """A label or institution value as text: ``2.0`` and ``"2"`` both give ``"2"``."""
    text = str(value).strip()
    try:
        number = float(text)
    except (ValueError, OverflowError):
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
    return np.fromiter(
        (str(v).strip().lower() in MISSING_TOKENS for v in values),
        dtype=bool,
        count=len(values),
    )


def numeric_column(
    values: np.ndarray, column: str, source: str, rows: np.ndarray
) -> np.ndarray:
    """Convert a complete feature column to finite float32, naming the first bad value.

    ``rows`` holds each value's 0-based data-row number in the file, for messages.

    Raises
    ------
    TableFileError
        When a value is not a number, or is not finite as float32 (``inf``,
        ``1e999``, or beyond about ±3.4e38): see the module docstring.
    """
    if values.dtype.kind in "biuf":
        wide = values.astype(np.float64)
    else:
        wide = np.empty(len(values), dtype=np.float64)
        for k, cell in enumerate(values):
            try:
                wide[k] = float(cell)
            except (ValueError, TypeError, OverflowError):
                raise TableFileError(
                    f"{source}: column {shown(column)}, data row {rows[k] + 1}: "
                    f"{shown(cell)} is not a "
                    f"number; encode it numerically, or name it with ?label= or "
                    "?institution= if it is the label or the institution"
                ) from None
    with np.errstate(over="ignore", invalid="ignore"):
        out = wide.astype(np.float32)
    infinite = ~np.isfinite(out)
    if infinite.any():
        k = int(np.argmax(infinite))
        raise TableFileError(
            f"{source}: column {shown(column)}, data row {rows[k] + 1}: "
            f"{shown(values[k])} is not a finite number (features are float32: "
            "infinite, or beyond about ±3.4e38); fix the value, or leave the cell "
            "empty to drop the row"
        )
    return out


def _are_ids(values: Sequence[str]) -> bool:
    """True when every label is a non-negative integer in ASCII digits: class ids."""
    return bool(values) and all(v.isascii() and v.isdigit() for v in values)


def _id_above(text: str, top: int) -> bool:
    """True when the ASCII digits ``text`` denote an integer above ``top``, without int()."""
    digits, limit = text.lstrip("0") or "0", str(top)
    return len(digits) > len(limit) or (len(digits) == len(limit) and digits > limit)


def label_over_cap(values: Sequence[str], max_classes: int) -> int | None:
    """Index of the first label that takes the label space past ``max_classes``.

    Class ids count up to the largest id; other labels count distinct values.
    None when the label space fits.
    """
    if _are_ids(values):
        return next(
            (k for k, v in enumerate(values) if _id_above(v, max_classes - 1)), None
        )
    seen: set[str] = set()
    for k, value in enumerate(values):
        if value not in seen:
            seen.add(value)
            if len(seen) > max_classes:
                return k
    return None


def encode_labels(
    values: Sequence[str], max_classes: int = DEFAULT_MAX_CLASSES
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map label texts to class ids; return ``(ids, class_names)``.

    Non-negative integers are their own ids (label space ``0..max``); other
    labels are numbered in sorted order.

    Raises
    ------
    TableFileError
        When the label space would exceed ``max_classes`` classes (the
        message names the label; :func:`table_from_columns` names the file).
    """
    over = label_over_cap(values, check_max_classes(max_classes))
    if over is not None:
        raise TableFileError(
            f"label {shown(values[over])} takes the label space past the class cap "
            f"of {max_classes}"
        )
    if _are_ids(values):
        ids = np.array([int(v) for v in values], dtype=np.int64)
        return ids, tuple(str(k) for k in range(int(ids.max()) + 1))
    names = tuple(sorted(set(values)))
    index = {name: k for k, name in enumerate(names)}
    return np.array([index[v] for v in values], dtype=np.int64), names


def _group_order(value: str) -> tuple[int, int, str, str]:
    if value.isascii() and value.isdigit():
        digits = value.lstrip("0") or "0"
        return (0, len(digits), digits, value)
    return (1, 0, "", value)


def encode_groups(values: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map institution texts to group ids in natural order; return ``(ids, names)``."""
    names = tuple(sorted(set(values), key=_group_order))
    index = {name: k for k, name in enumerate(names)}
    return np.array([index[v] for v in values], dtype=np.int64), names


def _cap_error(
    source: str,
    column: str,
    raw: object,
    label: str,
    row: int,
    ids: bool,
    max_classes: int,
) -> TableFileError:
    where = f"{source}: label column {shown(column)}, data row {row}: label {shown(raw)}"
    if ids:
        return TableFileError(
            f"{where} is class id {label if len(label) <= 30 else shown(label)}, so "
            f"the label space 0..max has more than the class cap of {max_classes} "
            "classes (max-classes). Integer labels are class ids: renumber them "
            f"0..{max_classes - 1} or below, or raise max-classes"
        )
    return TableFileError(
        f"{where} is distinct label number {max_classes + 1}: more than the class "
        f"cap of {max_classes} classes (max-classes). Each distinct text label is a "
        "class: is this the label column? Otherwise raise max-classes"
    )


def _non_integer_number(names: Sequence[str]) -> str | None:
    """A label that is a non-integer number, when every label is a number; else None."""
    example = None
    for name in names:
        try:
            number = float(name)
        except (ValueError, OverflowError):
            return None
        if example is None and math.isfinite(number) and not number.is_integer():
            example = name
    return example


def warn_about_labels(
    y: np.ndarray,
    class_names: tuple[str, ...],
    ids: bool,
    source: str,
    column: str,
    *,
    defines_label_space: bool = True,
) -> None:
    """Log a WARNING when the label column looks wrong (rules in the module docstring)."""
    counts = np.bincount(y, minlength=len(class_names))
    present = np.flatnonzero(counts)
    rows, distinct = len(y), len(present)
    if defines_label_space and distinct == 1:
        log(
            WARNING,
            "%s: label column %s holds one class only (%s, %d rows): a model trained "
            "on it predicts that class and scores accuracy 1.0; is it the right "
            "label column (?label=<column>)?",
            source,
            shown(column),
            shown(class_names[present[0]]),
            rows,
        )
    reasons = []
    fraction = None if ids else _non_integer_number([class_names[k] for k in present])
    if fraction is not None:
        reasons.append(f"its values are numbers, some non-integer such as {shown(fraction)}")
    if distinct > CONTINUOUS_MIN_DISTINCT and rows < CONTINUOUS_MIN_ROWS_PER_CLASS * distinct:
        reasons.append(
            f"{distinct} distinct labels in {rows} rows, fewer than "
            f"{CONTINUOUS_MIN_ROWS_PER_CLASS} rows per class"
        )
    if reasons:
        log(
            WARNING,
            "%s: label column %s looks continuous (%s); each distinct value becomes a "
            "class (%d classes). Is it the right label column (?label=<column>)? "
            "Otherwise bin its values into classes",
            source,
            shown(column),
            "; ".join(reasons),
            len(class_names),
        )
    empty = np.flatnonzero(counts == 0)
    if defines_label_space and ids and len(empty):
        listed = empty[:10].tolist()
        log(
            WARNING,
            "%s: label column %s: integer labels are class ids, so the label space is "
            "0..%d; %d of %d classes have no row: %s%s. Renumber the labels 0..%d "
            "if these gaps are not meant (1-based or sparse ids)",
            source,
            shown(column),
            len(class_names) - 1,
            len(empty),
            len(class_names),
            listed,
            "..." if len(empty) > len(listed) else "",
            distinct - 1,
        )


def table_from_columns(
    columns: dict[str, np.ndarray],
    spec: FileSpec,
    source: str,
    *,
    max_classes: int = DEFAULT_MAX_CLASSES,
    defines_label_space: bool = True,
) -> TableFile:
    """Turn named raw columns into a tabular :class:`TableFile`.

    ``defines_label_space`` False (a node's own file, whose classes are
    declared elsewhere) skips the single-class and empty-class warnings.

    Raises
    ------
    TableFileError
        When the label (or a named institution) column is absent, no feature
        column is left, a feature is not a finite number, no complete row
        remains, or the labels exceed ``max_classes`` classes.
    """
    check_max_classes(max_classes)
    available = list(columns)
    if spec.label_column not in columns:
        raise TableFileError(
            f"{source}: label column {spec.label_column!r} not found; columns are "
            f"{available}; name the label column with '?label=<column>'"
        )
    institution = (
        spec.institution_column if spec.institution_column in columns else None
    )
    if institution is None and spec.institution_required:
        raise TableFileError(
            f"{source}: institution column {spec.institution_column!r} not found; "
            f"columns are {available}"
        )
    if institution == spec.label_column:
        raise TableFileError(
            f"{source}: column {spec.label_column!r} cannot be both label "
            "and institution"
        )
    feature_names = tuple(
        c for c in available if c not in (spec.label_column, institution)
    )
    if not feature_names:
        raise TableFileError(f"{source}: no feature columns besides {available}")
    missing = np.zeros(len(columns[spec.label_column]), dtype=bool)
    for name in available:
        missing |= is_missing(columns[name])
    keep = ~missing
    if not keep.any():
        raise TableFileError(
            f"{source}: no row is complete (every row misses a value)"
        )
    if missing.any():
        log(
            INFO,
            "%s: dropped %d of %d rows with missing values",
            source,
            int(missing.sum()),
            len(missing),
        )
    rows = np.flatnonzero(keep)
    raw_labels = columns[spec.label_column][keep]
    labels = [canonical_value(v) for v in raw_labels]
    over = label_over_cap(labels, max_classes)
    if over is not None:
        raise _cap_error(
            source, spec.label_column, raw_labels[over], labels[over],
            int(rows[over]) + 1, _are_ids(labels), max_classes,
        )
    y, class_names = encode_labels(labels, max_classes)
    x = np.stack(
        [numeric_column(columns[c][keep], c, source, rows) for c in feature_names],
        axis=1,
    )
    warn_about_labels(
        y, class_names, _are_ids(labels), source, spec.label_column,
        defines_label_space=defines_label_space,
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


def read_table_file(
    data_path: str,
    file_format: FileFormat,
    *,
    max_classes: int = DEFAULT_MAX_CLASSES,
    defines_label_space: bool = True,
) -> TableFile:
    """Load the CSV or ``.npz`` table ``data_path`` names (see the module docstring).

    ``max_classes`` caps the label space (the run-config key ``max-classes``);
    ``defines_label_space`` is False for a node's own file, whose classes are
    declared by its ``data-path`` (see :mod:`data.node_files`).

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    TableFileError
        On a bad ``data-path`` query or a malformed file; the message names
        the file.
    """
    check_max_classes(max_classes)
    spec = parse_file_spec(data_path, file_format)
    if not spec.path.is_file():
        raise FileNotFoundError(
            f"dataset={file_format!r}: file {spec.path} does not exist"
        )
    other = "npz" if file_format == "csv" else "csv"
    if spec.path.suffix.lower() == f".{other}":
        raise TableFileError(
            f"{spec.path} looks like a .{other} file; use dataset={other!r} for it"
        )
    reader = read_csv_columns if file_format == "csv" else read_npz_columns
    table = table_from_columns(
        reader(spec.path), spec, str(spec.path),
        max_classes=max_classes, defines_label_space=defines_label_space,
    )
    log(
        INFO,
        "%s: %d rows, %d features, %d classes %s, institutions %s",
        spec.path,
        len(table.data),
        len(table.feature_names),
        len(table.class_names),
        list(table.class_names[:20]) + (["..."] if len(table.class_names) > 20 else []),
        list(table.data.group_names[:20]) or "none",
    )
    return table


def load_csv(data_path: str, *, max_classes: int = DEFAULT_MAX_CLASSES) -> LabeledData:
    """Load a user's CSV table; see :func:`read_table_file`."""
    return read_table_file(data_path, "csv", max_classes=max_classes).data


def load_npz(data_path: str, *, max_classes: int = DEFAULT_MAX_CLASSES) -> LabeledData:
    """Load a user's ``.npz`` table; see :func:`read_table_file`."""
    return read_table_file(data_path, "npz", max_classes=max_classes).data
