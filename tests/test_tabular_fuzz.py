"""Fuzz the loaders of a user's own CSV / ``.npz`` table with malformed files.

Several hundred generated files (random headers, types and encodings,
latin-1 and UTF-16 text, binary junk, missing values, extreme numbers, huge
label ids, empty lines, ragged rows, byte-order marks, quoted newlines,
pickled object arrays, lying ``.npy`` headers, truncated archives...) go
through the two entries the app uses:

- ``load_source("csv" | "npz", data_path)``: the run's ``dataset`` on the
  server (:mod:`data.sources`);
- ``load_node_file("csv" | "npz", data_path + "?classes=K")``: a node's own
  file (:mod:`data.node_files`).

Each file must either load into sane data (finite float32 features, int64
labels in ``[0, num_classes)``, ``num_classes`` within the class cap) or
raise :class:`data.tabular_file.TableFileError` naming the file: never
another exception type. Each file takes under 2 s and under 200 MB of
traced memory. The generator is seeded (these are test inputs, not privacy
randomness), so a failure reproduces.
"""

from __future__ import annotations

import io
import pickle
import random
import resource
import string
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.dataset import LabeledData
from data.node_files import load_node_file
from data.sources import load_source
from data.tabular_file import DEFAULT_MAX_CLASSES, TableFileError

SEED = 20240611
CSV_CASES = 300
NPZ_CASES = 150
SMALL_CAP = 50
SECONDS_PER_FILE = 2.0
TRACED_BYTES_PER_FILE = 200 * 2**20
RSS_GROWTH_BYTES = 400 * 2**20
TOTAL_SECONDS = 20.0


@dataclass(frozen=True)
class Case:
    """One generated file: its bytes, its name and the query that goes with it."""

    name: str
    content: bytes
    query: str
    what: str


# --- CSV generation -----------------------------------------------------------

CELLS: tuple[Callable[[random.Random], str], ...] = (
    lambda r: str(r.randint(-5, 5)),
    lambda r: f"{r.gauss(0, 10):.4f}",
    lambda r: f"{r.gauss(0, 1):.3e}",
    lambda r: r.choice(["", "?", "NA", "nan", "NaN", "-nan", "+NaN", "null", " ", "N/A"]),
    lambda r: r.choice(["inf", "-inf", "Infinity", "1e999", "-1e999", "1e39", "3.5e38"]),
    lambda r: r.choice(["1e308", "-1e-320", "0x10", "1_000", " 7 ", "+3", "True", "1,5"]),
    lambda r: str(10 ** r.randint(5, 40)),
    lambda r: "9" * r.choice([19, 400, 5000]),
    lambda r: "".join(r.choices(string.ascii_letters, k=r.randint(1, 8))),
    lambda r: r.choice(["\u00b2", "\u0663", "\u00e9t\u00e9", "\u6f22", "\u200b", "\ufeff1"]),
    lambda r: r.choice(["\x00", "a\x00b", "\x1b[0m", "\t", "\x7f"]),
    lambda r: '"' + r.choice(["a,b", "line\nbreak", 'quote""d', "1"]) + '"',
    lambda r: r.choice(['"unterminated', 'a"b', '""']),
)
LABELS: tuple[Callable[[random.Random], str], ...] = (
    lambda r: str(r.randint(0, 3)),
    lambda r: str(r.randint(0, 3)) + ".0",
    lambda r: r.choice(["benign", "malignant", "unknown"]),
    lambda r: r.choice(["1000000000", "100000", "1e9", "100000000000000000000", "1e300"]),
    lambda r: f"{r.random():.5f}",
    lambda r: str(r.randint(0, 10**6)),
    lambda r: r.choice(["-1", "-0", "2.5", "\u00b2", "\u0663", "inf", "nan", "", "?"]),
    lambda r: "7" * r.choice([30, 5000]),
    lambda r: "".join(r.choices(string.printable, k=r.randint(1, 6))),
)


def csv_header(r: random.Random, width: int) -> list[str]:
    names = [f"f{j}" for j in range(width)]
    style = r.random()
    if style < 0.55:
        names.append("label")
    elif style < 0.7:
        names.append("y")  # queried with ?label=y, or missing
    elif style < 0.8:
        names = ["".join(r.choices(string.printable, k=r.randint(0, 5))) for _ in names]
        names.append("label")
    elif style < 0.9:
        names += ["label", "label" if r.random() < 0.5 else ""]  # repeated or empty
    else:
        names = names[:1]  # no label column at all
    if r.random() < 0.25:
        names.insert(r.randrange(len(names) + 1), "institution")
    r.shuffle(names) if r.random() < 0.3 else None
    return names


def csv_cell(r: random.Random, column: str, noise: float) -> str:
    if column in ("label", "y"):
        return r.choice(LABELS)(r) if r.random() < noise else str(r.randint(0, 2))
    if column == "institution":
        return r.choice(["north", "south", "3", "\u00b2", "9" * 5000, ""])
    if r.random() < noise:
        return r.choice(CELLS)(r)
    return f"{r.gauss(0, 5):.3f}"


def csv_text(r: random.Random) -> tuple[str, str]:
    header = csv_header(r, r.randint(0, 5))
    rows = [",".join(header)]
    label_style = r.random()
    fixed_label = r.choice(LABELS)(r)
    noise = r.choice([0.0, 0.0, 0.002, 0.02, 0.3])  # the share of odd cells
    for _ in range(r.choice([0, 1, 2, 5, 30, 120, 300])):
        cells = [csv_cell(r, c, noise) for c in header]
        if label_style < 0.15 and "label" in header:  # one class throughout
            cells[header.index("label")] = fixed_label
        if r.random() < noise / 3:  # ragged
            cells = cells[: r.randrange(len(cells) + 1)] if r.random() < 0.5 else [*cells, "x"]
        rows.append(",".join(cells))
        if r.random() < 0.03:
            rows.append(r.choice(["", " ", ",,,", "\t"]))
    if r.random() < 0.05:  # one field over csv's default field size limit
        rows.append(",".join(['"' + "x" * 140_000 + '"'] * max(1, len(header))))
    newline = r.choice(["\n", "\r\n", "\r", "\n"])
    query = ""
    if "y" in header and r.random() < 0.7:
        query = "?label=y"
    elif r.random() < 0.1:
        query = "?label=f0"
    if r.random() < 0.1:
        query += ("&" if query else "?") + "institution=" + r.choice(["institution", "nope"])
    return newline.join(rows) + (newline if r.random() < 0.8 else ""), query


def csv_case(r: random.Random, k: int) -> Case:
    text, query = csv_text(r)
    style = r.random()
    if style < 0.55:
        content, what = text.encode("utf-8", "surrogatepass"), "utf-8"
    elif style < 0.7:
        content, what = b"\xef\xbb\xbf" + text.encode("utf-8", "surrogatepass"), "utf-8 BOM"
    elif style < 0.78:
        latin = text.replace("label", "\u00e9tiquette" if r.random() < 0.3 else "label")
        content = (latin + "\u00e9\u00e8,\u00ff\n").encode("latin-1", "replace")
        what = "latin-1"
    elif style < 0.83:
        content, what = text.encode("utf-16"), "utf-16"
    elif style < 0.9:
        blob = bytearray(text.encode("utf-8", "surrogatepass"))
        for _ in range(r.randint(1, 20)):  # flip random bytes
            if blob:
                blob[r.randrange(len(blob))] = r.randrange(256)
        content, what = bytes(blob), "corrupted utf-8"
    elif style < 0.95:
        content = bytes(r.randrange(256) for _ in range(r.choice([0, 1, 3, 64, 4096])))
        what = "binary junk"
    else:
        cut = text.encode("utf-8", "surrogatepass")
        content, what = cut[: r.randrange(len(cut) + 1)], "truncated"
    return Case(f"c{k:03d}.csv", content, query, what)


# --- npz generation -----------------------------------------------------------


def npz_column(rng: np.random.Generator, r: random.Random, n: int, label: bool) -> np.ndarray:
    kind = r.random()
    if label and kind < 0.5:
        return rng.integers(0, r.choice([1, 2, 3, 5]), size=n)
    if kind < 0.35:
        values = rng.normal(size=n) * 10.0 ** r.randint(0, 300)
        if n and r.random() < 0.4:
            values[rng.integers(0, n)] = r.choice([np.nan, np.inf, -np.inf, 1e300, 5e38])
        return values
    if kind < 0.45:
        return rng.integers(-(2**62), 2**62, size=n, dtype=np.int64)
    if kind < 0.5:
        return rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64)
    if kind < 0.55:
        return rng.random(n) < 0.5
    if kind < 0.6:
        return rng.normal(size=n).astype(np.float16)
    if kind < 0.7:
        pool = ["1.5", "NA", "inf", "x", "", "\u00b2", "7" * 40, "benign", "0", "3"]
        return np.array([r.choice(pool) for _ in range(n)], dtype=str)
    if kind < 0.75:
        pool = [b"1.5", b"\xff\xfe", b"2", b"", b"nan"]
        return np.array([r.choice(pool) for _ in range(n)], dtype=bytes)
    if kind < 0.8:
        return np.array([r.choice([1.0, None, "a", {"k": 1}]) for _ in range(n)], dtype=object)
    if kind < 0.84:
        return rng.normal(size=n) + 1j * rng.normal(size=n)
    if kind < 0.87:
        return np.arange(n).astype("datetime64[D]")
    if kind < 0.9:
        return np.zeros(n, dtype=[("a", "<f4"), ("b", "<i2")])
    if kind < 0.94:
        return rng.normal(size=(n, 2))  # 2-D
    if kind < 0.96:
        return np.float64(3.0)  # 0-D
    if kind < 0.98:
        return rng.normal(size=n + 1)  # another length
    return np.array([10**9, 10**12, 0, 1][: max(n, 1)] * max(1, n // 4 + 1))[:n]


def lying_npz(n: int) -> bytes:
    """An archive whose ``a.npy`` header declares far more data than it holds."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f8", "fortran_order": False, "shape": (4_000_000_000,)}
        )
        archive.writestr("a.npy", header.getvalue() + np.zeros(n).tobytes())
        label = io.BytesIO()
        np.lib.format.write_array(label, np.zeros(n, dtype=np.int64))
        archive.writestr("label.npy", label.getvalue())
    return buffer.getvalue()


def npz_case(rng: np.random.Generator, r: random.Random, k: int) -> Case:
    n = r.choice([0, 1, 2, 7, 40, 200])
    style = r.random()
    query = ""
    if style < 0.7:
        names = [f"f{j}" for j in range(r.randint(0, 4))]
        names.append(r.choice(["label", "label", "label", "y"]))
        if r.random() < 0.2:
            names.append("institution")
        columns = {name: npz_column(rng, r, n, name in ("label", "y")) for name in names}
        if "y" in columns and r.random() < 0.7:
            query = "?label=y"
        buffer = io.BytesIO()
        (np.savez_compressed if r.random() < 0.3 else np.savez)(buffer, **columns)
        content = buffer.getvalue()
        what = ", ".join(f"{c}:{getattr(a, 'dtype', '?')}" for c, a in columns.items())
        if r.random() < 0.1:
            content, what = content[: r.randrange(len(content) + 1)], "truncated " + what
    elif style < 0.78:
        content, what = lying_npz(n), "lying .npy header"
    elif style < 0.84:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("label.npy", b"\x93NUMPY junk")
            archive.writestr("readme.txt", "not an array")
        content, what = buffer.getvalue(), "zip of non-arrays"
    elif style < 0.88:
        buffer = io.BytesIO()
        np.save(buffer, rng.normal(size=(n, 3)))
        content, what = buffer.getvalue(), "single .npy"
    elif style < 0.93:
        content = pickle.dumps({"label": [0, 1], "a": [1.0, 2.0]})
        what = "pickle"
    else:
        content = bytes(r.randrange(256) for _ in range(r.choice([0, 4, 512])))
        what = "binary junk"
    return Case(f"n{k:03d}.npz", content, query, what)


def generated_cases() -> list[Case]:
    r = random.Random(SEED)
    rng = np.random.default_rng(SEED)
    cases = [csv_case(r, k) for k in range(CSV_CASES)]
    cases += [npz_case(rng, r, k) for k in range(NPZ_CASES)]
    return cases


# --- The check --------------------------------------------------------------


def sane(data: LabeledData, cap: int) -> str | None:
    """What is wrong with loaded data, or None."""
    if data.x.dtype != np.float32 or data.x.ndim != 2 or data.x.shape[1] < 1:
        return f"features {data.x.dtype} {data.x.shape}"
    if not np.isfinite(data.x).all():
        return "non-finite features"
    if data.y.dtype.kind not in "iu" or len(data.y) != len(data.x) or not len(data.y):
        return f"labels {data.y.dtype} {data.y.shape} for {len(data.x)} rows"
    if not 1 <= data.num_classes <= cap:
        return f"num_classes {data.num_classes} outside [1, {cap}]"
    if data.y.min() < 0 or data.y.max() >= data.num_classes:
        return f"labels [{data.y.min()}, {data.y.max()}] outside [0, {data.num_classes})"
    return None


def attempt(load: Callable[[], LabeledData], path: Path, cap: int) -> tuple[str, str | None]:
    """Run one load: ``("loaded" | "refused" | "broke", what broke the contract or None)``."""
    try:
        data = load()
    except TableFileError as err:
        if str(path) in str(err):
            return "refused", None
        return "broke", f"message does not name the file: {err}"
    except Exception as err:  # noqa: BLE001 - any other type is the failure looked for
        return "broke", f"{type(err).__name__}: {str(err)[:300]}"
    problem = sane(data, cap)
    return ("loaded" if problem is None else "broke"), problem


def test_generated_malformed_tables_load_sanely_or_fail_naming_the_file(
    tmp_path: Path,
) -> None:
    cases = generated_cases()
    assert len(cases) >= 200
    failures: list[str] = []
    outcomes = {"loaded": 0, "refused": 0, "broke": 0}
    started = time.perf_counter()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    try:
        for k, case in enumerate(cases):
            path = tmp_path / case.name
            path.write_bytes(case.content)
            dataset = path.suffix[1:]
            cap = SMALL_CAP if k % 4 == 0 else DEFAULT_MAX_CLASSES
            classes = f"classes={1 + k % 4}"
            node_path = f"{path}{case.query}{'&' if case.query else '?'}{classes}"
            source_path = f"{path}{case.query}"
            for entry, load in (
                ("load_source", lambda: load_source(dataset, source_path, max_classes=cap)),
                ("load_node_file", lambda: load_node_file(dataset, node_path, max_classes=cap)),
            ):
                tracemalloc.reset_peak()
                began = time.perf_counter()
                outcome, problem = attempt(load, path, cap)
                outcomes[outcome] += 1
                seconds = time.perf_counter() - began
                peak = tracemalloc.get_traced_memory()[1]
                if problem is None and seconds > SECONDS_PER_FILE:
                    problem = f"took {seconds:.1f} s"
                if problem is None and peak > TRACED_BYTES_PER_FILE:
                    problem = f"traced peak {peak / 2**20:.0f} MB"
                if problem is not None:
                    failures.append(
                        f"{case.name} ({case.what}{case.query}) via {entry}: {problem}"
                    )
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert not failures, (
        f"{len(failures)} of {2 * len(cases)} loads broke the contract (seed {SEED}):\n"
        + "\n".join(failures[:40])
    )
    print(f"fuzz: {outcomes} in {elapsed:.2f} s, max RSS growth {rss_growth / 2**20:.0f} MB")
    # Both outcomes occur: the generator is not all junk, nor all well-formed.
    assert outcomes["loaded"] >= 20 and outcomes["refused"] >= 100, outcomes
    assert elapsed < TOTAL_SECONDS, f"{len(cases)} files took {elapsed:.1f} s"
    assert rss_growth < RSS_GROWTH_BYTES, f"max RSS grew by {rss_growth / 2**20:.0f} MB"


def test_the_generator_is_reproducible_and_varied() -> None:
    first, second = generated_cases(), generated_cases()
    assert [c.content for c in first] == [c.content for c in second]
    kinds = {c.what for c in first}
    for kind in ("utf-8 BOM", "latin-1", "utf-16", "binary junk", "lying .npy header"):
        assert kind in kinds
    assert "pickle" in kinds and "truncated" in kinds
    assert any("object" in c.what for c in first)  # pickled object arrays in an .npz
