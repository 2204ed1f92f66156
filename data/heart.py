"""UCI Heart Disease from its four hospitals: a natural multi-institution federation.

Janosi, Steinbrunn, Pfisterer and Detrano (1988), UCI Machine Learning
Repository, doi:10.24432/C52P4X (CC BY 4.0). Each hospital ships one
``processed.<site>.data`` file: no header, 14 comma-separated columns
(:data:`HEART_COLUMNS`), missing values written ``?`` (the original files) or
``NaN`` (some redistributed copies); both are accepted.

The preprocessing is FLamby's Fed-Heart-Disease (Ogier du Terrail et al.
2022, "FLamby: Datasets and Benchmarks for Cross-Silo Federated Learning in
Realistic Healthcare Settings", NeurIPS Datasets and Benchmarks): drop the
mostly-missing columns ``slope``, ``ca`` and ``thal``, drop rows that still
miss a value, and label a patient 1 when ``num > 0`` (any disease). That
leaves 303 / 261 / 46 / 130 patients at Cleveland / Hungary / Switzerland /
VA Long Beach. Features are left in their own units: the federation
standardises them with the training side's statistics after the server's
test split (:func:`data.federation.standardize`).

Where the files come from (the run-config key ``data-path``):

- a folder holding the four ``processed.<site>.data`` files: read as they
  are; a missing file is an error (nothing is downloaded into a user's folder);
- ``""`` (unset): downloaded from the dataset's home,
  :data:`HEART_URL`, into a cache folder (``$FEDPRIVACY_CACHE`` or
  ``$XDG_CACHE_HOME/fedprivacy``, default ``~/.cache/fedprivacy``) under
  ``heart-disease/``; a file already in the cache is used, never overwritten.
"""

from __future__ import annotations

import math
import os
import urllib.request
from pathlib import Path

import numpy as np

from .dataset import LabeledData

HEART_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease/"
HEART_SITES = ("cleveland", "hungarian", "switzerland", "va")
HEART_SITE_NAMES = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
HEART_COLUMNS = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
)  # fmt: skip
HEART_DROPPED = ("slope", "ca", "thal")
HEART_FEATURES = tuple(c for c in HEART_COLUMNS[:-1] if c not in HEART_DROPPED)
# Class 0: num == 0 (no disease); class 1: num in 1..4 (disease).
HEART_CLASSES = ("0", "1")
MISSING_TOKENS = frozenset({"?", "nan"})


def heart_file_name(site: str) -> str:
    """The file name of one hospital, e.g. ``processed.cleveland.data``."""
    return f"processed.{site}.data"


def heart_cache_dir() -> Path:
    """The folder downloads go to: ``$FEDPRIVACY_CACHE`` or the XDG cache."""
    root = os.environ.get("FEDPRIVACY_CACHE")
    if root:
        return Path(root).expanduser() / "heart-disease"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "fedprivacy" / "heart-disease"


def parse_heart_table(text: str, source: str) -> np.ndarray:
    """Parse one hospital's file into a float ``(n, 14)`` array, NaN where missing.

    Parameters
    ----------
    text : str
        The file's content: one patient per line, 14 comma-separated values.
    source : str
        File name used in error messages.

    Raises
    ------
    ValueError
        On a line without 14 values or a value that is neither a number nor
        a missing-value token (``?``, ``NaN``).
    """
    rows: list[list[float]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != len(HEART_COLUMNS):
            raise ValueError(
                f"{source}, line {line_no}: {len(cells)} values, expected "
                f"{len(HEART_COLUMNS)} ({', '.join(HEART_COLUMNS)})"
            )
        row = []
        for column, cell in zip(HEART_COLUMNS, cells, strict=True):
            if cell.lower() in MISSING_TOKENS:
                row.append(math.nan)
                continue
            try:
                row.append(float(cell))
            except ValueError:
                raise ValueError(
                    f"{source}, line {line_no}, column {column!r}: {cell!r} is "
                    "not a number nor a missing value ('?' or 'NaN')"
                ) from None
        rows.append(row)
    if not rows:
        raise ValueError(f"{source} holds no patients")
    return np.asarray(rows, dtype=np.float64)


def preprocess_heart(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's preprocessing: drop slope, ca, thal and incomplete rows; label num > 0.

    Returns ``(x, y)``: float32 ``(m, 10)`` features in :data:`HEART_FEATURES`
    order and int64 labels.
    """
    keep = [HEART_COLUMNS.index(c) for c in HEART_FEATURES]
    features = table[:, keep]
    complete = ~np.isnan(features).any(axis=1) & ~np.isnan(table[:, -1])
    x = features[complete].astype(np.float32)
    y = (table[complete, -1] > 0).astype(np.int64)
    return x, y


def download_heart_file(site: str, cache_dir: Path) -> Path:
    """Return the cached file of ``site``, downloaded from :data:`HEART_URL` if absent.

    The download goes to a temporary name and is renamed into place, so an
    interrupted download never leaves a truncated file; an existing file is
    never overwritten.

    Raises
    ------
    ConnectionError
        When the download fails.
    """
    target = cache_dir / heart_file_name(site)
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    url = HEART_URL + heart_file_name(site)
    partial = target.with_name(target.name + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (fixed URL)
            partial.write_bytes(response.read())
    except OSError as err:  # URLError and socket timeouts are OSErrors
        partial.unlink(missing_ok=True)
        raise ConnectionError(
            f"could not download {url} ({err}); set data-path to a folder holding "
            f"{', '.join(heart_file_name(s) for s in HEART_SITES)}"
        ) from err
    if target.exists():  # another process finished first: keep its file
        partial.unlink(missing_ok=True)
    else:
        partial.replace(target)
    return target


def heart_files(data_path: str, sites: tuple[str, ...] = HEART_SITES) -> list[Path]:
    """Return the file of each site: from ``data_path`` or the download cache.

    Raises
    ------
    FileNotFoundError
        When ``data_path`` is not a folder or lacks one of the site files.
    """
    if not data_path.strip():
        cache = heart_cache_dir()
        return [download_heart_file(site, cache) for site in sites]
    folder = Path(data_path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"heart data-path {folder} is not a folder; it must hold "
            f"{', '.join(heart_file_name(s) for s in sites)} (or be empty to download)"
        )
    paths = [folder / heart_file_name(site) for site in sites]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"heart data-path {folder} lacks {', '.join(missing)}; the UCI files "
            f"are at {HEART_URL}"
        )
    return paths


def load_heart(
    data_path: str = "", sites: tuple[str, ...] = HEART_SITES
) -> LabeledData:
    """Load UCI Heart Disease, one group per hospital.

    Parameters
    ----------
    data_path : str
        Folder holding ``processed.<site>.data``; empty to download from UCI.
    sites : tuple of str
        Which hospitals, a subset of :data:`HEART_SITES`, in group order.

    Returns
    -------
    LabeledData
        ``tabular`` data, 10 unscaled features (:data:`HEART_FEATURES`), two
        classes, ``groups`` = hospital index, ``group_names`` = hospital names.

    Raises
    ------
    FileNotFoundError, ValueError, ConnectionError
        Missing files, malformed files, unknown sites, failed download.
    """
    unknown = [s for s in sites if s not in HEART_SITES]
    if unknown or not sites:
        raise ValueError(
            f"heart sites {list(sites)} must be a non-empty subset of "
            f"{list(HEART_SITES)}"
        )
    xs, ys, groups = [], [], []
    for index, path in enumerate(heart_files(data_path, sites)):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not a text file: {err}") from err
        x, y = preprocess_heart(parse_heart_table(text, str(path)))
        xs.append(x)
        ys.append(y)
        groups.append(np.full(len(y), index, dtype=np.int64))
    return LabeledData(
        x=np.concatenate(xs),
        y=np.concatenate(ys),
        num_classes=len(HEART_CLASSES),
        kind="tabular",
        name="heart",
        groups=np.concatenate(groups),
        group_names=tuple(HEART_SITE_NAMES[HEART_SITES.index(s)] for s in sites),
    )
