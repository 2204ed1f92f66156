"""Every loader on real local files, and the clear errors for missing or malformed ones.

Real data lives in ``../shared/datasets`` (see its README); a test that needs a
file skips, with the reason, where the copy is absent.
"""

from __future__ import annotations

import io
import sys
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from data.heart import (
    HEART_COLUMNS,
    HEART_FEATURES,
    HEART_SITE_NAMES,
    HEART_SITES,
    heart_file_name,
    load_heart,
)
from data.mnist import MNIST_TRAIN_SIZE, load_mnist, load_mnist_split
from data.sources import (
    SOURCES,
    is_known_dataset,
    load_described_source,
    load_official_split,
    load_source,
    split_data_path,
)
from data.tabular_file import load_csv, load_npz, parse_file_spec, read_table_file

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MNIST_NPZ = SHARED / "mnist" / "mnist.npz"
HEART_DIR = SHARED / "heart-disease"
# Published counts after FLamby's preprocessing (drop slope/ca/thal, incomplete rows).
HEART_ROWS = {"cleveland": 303, "hungarian": 261, "switzerland": 46, "va": 130}


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data copy {path} is absent (see shared/datasets/README.md)")
    return path


@pytest.fixture(scope="module")
def mnist_split() -> tuple:
    return load_mnist_split(str(need(MNIST_NPZ)))


@pytest.fixture(scope="module")
def heart_raw_rows() -> dict[str, list[str]]:
    """Each hospital file's non-empty lines, read directly (not through the loader)."""
    folder = need(HEART_DIR)
    return {
        site: [
            line
            for line in (folder / heart_file_name(site)).read_text().splitlines()
            if line.strip()
        ]
        for site in HEART_SITES
    }


# --- MNIST ------------------------------------------------------------


def test_mnist_npz_gives_the_official_split_scaled(mnist_split: tuple) -> None:
    train, test = mnist_split
    assert train.x.shape == (60000, 28, 28, 1) and test.x.shape == (10000, 28, 28, 1)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert 0.0 <= train.x.min() and train.x.max() == 1.0
    with np.load(MNIST_NPZ) as raw:
        np.testing.assert_array_equal(train.y, raw["y_train"])
        np.testing.assert_array_equal(test.y, raw["y_test"])
        np.testing.assert_allclose(test.x[..., 0], raw["x_test"] / 255.0, atol=1e-7)
    assert (train.label_histogram() > 0).all() and train.num_classes == 10


def test_mnist_whole_set_puts_the_training_images_first(mnist_split: tuple) -> None:
    whole = load_source("mnist", str(MNIST_NPZ.parent))  # a folder holding mnist.npz
    train, test = mnist_split
    assert (
        len(whole) == 70000
        and whole.kind == "image"
        and whole.input_shape == (28, 28, 1)
    )
    np.testing.assert_array_equal(whole.y[:MNIST_TRAIN_SIZE], train.y)
    np.testing.assert_array_equal(whole.x[MNIST_TRAIN_SIZE:], test.x)
    official = load_official_split("mnist", str(MNIST_NPZ))
    assert official is not None and len(official[1]) == 10000
    assert load_official_split("digits") is None


def test_mnist_download_path_calls_keras(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no data-path the loader calls keras.datasets.mnist.load_data() (faked)."""
    rng = np.random.default_rng(0)
    fake = (
        (rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.arange(12) % 10),
        (rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.arange(5)),
    )
    calls: list[int] = []
    keras = types.ModuleType("keras")
    keras.datasets = types.SimpleNamespace(  # type: ignore[attr-defined]
        mnist=types.SimpleNamespace(load_data=lambda: calls.append(1) or fake)
    )
    monkeypatch.setitem(sys.modules, "keras", keras)
    train, test = load_mnist_split("")
    assert calls == [1] and len(train) == 12 and len(test) == 5
    np.testing.assert_allclose(train.x[..., 0], fake[0][0] / 255.0, atol=1e-7)

    def offline() -> None:
        raise Exception("URL fetch failure")  # what Keras raises

    keras.datasets.mnist.load_data = offline  # type: ignore[attr-defined]
    with pytest.raises(ConnectionError, match="data-path"):
        load_mnist("")


def test_mnist_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.npz"):
        load_mnist(str(tmp_path / "absent.npz"))
    with pytest.raises(FileNotFoundError, match="mnist.npz"):
        load_mnist(str(tmp_path))  # a folder without mnist.npz


def test_mnist_malformed_files_are_clear_errors(tmp_path: Path) -> None:
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    labels = np.arange(4, dtype=np.uint8)
    np.savez(tmp_path / "nokey.npz", x_train=images, y_train=labels, x_test=images)
    with pytest.raises(ValueError, match="y_test"):
        load_mnist(str(tmp_path / "nokey.npz"))
    np.savez(
        tmp_path / "shape.npz",
        x_train=images[:, :14],
        y_train=labels,
        x_test=images,
        y_test=labels,
    )
    with pytest.raises(ValueError, match=r"\(n, 28, 28\)"):
        load_mnist(str(tmp_path / "shape.npz"))
    np.savez(
        tmp_path / "label.npz",
        x_train=images,
        y_train=labels + 7,
        x_test=images,
        y_test=labels,
    )
    with pytest.raises(ValueError, match="0..9"):
        load_mnist(str(tmp_path / "label.npz"))
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_mnist(str(tmp_path / "text.npz"))


# --- UCI Heart Disease ---------------------------------------------------------------


def test_heart_gives_the_published_rows_per_hospital(heart_raw_rows: dict) -> None:
    heart = load_source("heart", str(HEART_DIR))
    assert heart.kind == "tabular" and heart.x.shape == (740, len(HEART_FEATURES)) == (
        740,
        10,
    )
    assert heart.group_names == HEART_SITE_NAMES and heart.num_classes == 2
    counts = np.bincount(heart.groups, minlength=4)
    assert dict(zip(HEART_SITES, counts.tolist(), strict=True)) == HEART_ROWS
    assert not np.isnan(heart.x).any()
    # Label = num > 0, recomputed from the raw Cleveland file (no row is dropped there).
    num = np.array([float(line.split(",")[-1]) for line in heart_raw_rows["cleveland"]])
    np.testing.assert_array_equal(heart.y[heart.groups == 0], (num > 0).astype(int))
    # Not standardised here: age keeps its unit (years).
    age = heart.x[:, HEART_FEATURES.index("age")]
    assert 20 < age.min() and age.max() < 90


def test_heart_reads_question_marks_like_nan(
    tmp_path: Path, heart_raw_rows: dict
) -> None:
    for site, lines in heart_raw_rows.items():
        (tmp_path / heart_file_name(site)).write_text(
            "\n".join(line.replace("NaN", "?") for line in lines) + "\n"
        )
    assert "?" in (tmp_path / heart_file_name("hungarian")).read_text()
    original = load_heart(str(HEART_DIR))
    question = load_heart(str(tmp_path))
    np.testing.assert_array_equal(question.x, original.x)
    np.testing.assert_array_equal(question.y, original.y)


def test_heart_missing_or_malformed_files_are_clear_errors(
    tmp_path: Path, heart_raw_rows: dict
) -> None:
    for site in HEART_SITES[:3]:
        (tmp_path / heart_file_name(site)).write_text("\n".join(heart_raw_rows[site]))
    with pytest.raises(FileNotFoundError, match=r"processed\.va\.data"):
        load_heart(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_heart(str(tmp_path / heart_file_name("cleveland")))
    short = [
        *heart_raw_rows["va"][:3],
        ",".join(heart_raw_rows["va"][3].split(",")[:13]),
    ]
    (tmp_path / heart_file_name("va")).write_text("\n".join(short))
    with pytest.raises(ValueError, match=r"processed\.va\.data, line 4: 13 values"):
        load_heart(str(tmp_path))
    bad = heart_raw_rows["va"][0].split(",")
    bad[HEART_COLUMNS.index("chol")] = "high"
    (tmp_path / heart_file_name("va")).write_text(",".join(bad))
    with pytest.raises(ValueError, match="column 'chol': 'high'"):
        load_heart(str(tmp_path))
    with pytest.raises(ValueError, match="subset"):
        load_heart(str(HEART_DIR), sites=("cleveland", "mayo"))


def test_heart_download_fills_the_cache_and_never_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, heart_raw_rows: dict
) -> None:
    """With no data-path the files come from UCI (faked offline) into the cache."""
    monkeypatch.setenv("FEDPRIVACY_CACHE", str(tmp_path))
    cache = tmp_path / "heart-disease"
    cache.mkdir()
    # A file already in the cache (here: Cleveland without its last patient) is kept.
    kept = "\n".join(heart_raw_rows["cleveland"][:-1])
    (cache / heart_file_name("cleveland")).write_text(kept)
    fetched: list[str] = []

    def urlopen(url: str, timeout: float) -> io.BytesIO:
        fetched.append(url)
        site = url.rsplit("/", 1)[1].split(".")[1]
        return io.BytesIO("\n".join(heart_raw_rows[site]).encode())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    heart = load_heart("")
    assert fetched == [
        f"https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease/"
        f"{heart_file_name(s)}"
        for s in HEART_SITES[1:]
    ]
    assert (cache / heart_file_name("cleveland")).read_text() == kept
    assert np.bincount(heart.groups).tolist() == [302, 261, 46, 130]
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        map(heart_file_name, HEART_SITES)
    )

    def offline(url: str, timeout: float) -> None:
        raise urllib.error.URLError("no route to host")

    (cache / heart_file_name("va")).unlink()
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match=r"processed\.va\.data"):
        load_heart("")
    assert not list(cache.glob("*.part*"))


# --- A user's own CSV / npz ---------------------------------------------


def write_heart_csv(
    path: Path, raw_rows: dict, sites: tuple[str, ...], columns: list[str]
) -> int:
    """Write real heart rows as a CSV: a header, `label` = num, `institution` = site."""
    lines = [",".join(columns)]
    for site in sites:
        for line in raw_rows[site]:
            record = dict(zip(HEART_COLUMNS, line.split(","), strict=True))
            record["label"] = record["num"]
            record["institution"] = site
            lines.append(",".join(record[c] for c in columns))
    path.write_text("\n".join(lines) + "\n")
    return len(lines) - 1


def test_csv_of_real_rows_matches_the_heart_loader(
    tmp_path: Path, heart_raw_rows: dict
) -> None:
    columns = ["institution", *reversed(HEART_FEATURES), "label"]
    write_heart_csv(
        tmp_path / "clinic.csv", heart_raw_rows, ("cleveland", "va"), columns
    )
    table = read_table_file(str(tmp_path / "clinic.csv"), "csv")
    data = table.data
    assert table.feature_names == tuple(reversed(HEART_FEATURES))
    assert data.group_names == ("cleveland", "va") and data.name == "clinic.csv"
    heart = load_heart(str(HEART_DIR), sites=("cleveland", "va"))
    # Rows with a missing feature are dropped as in the heart preprocessing.
    assert len(data) == len(heart) == HEART_ROWS["cleveland"] + HEART_ROWS["va"]
    np.testing.assert_array_equal(data.x[:, ::-1], heart.x)
    np.testing.assert_array_equal(data.groups, heart.groups)
    # Labels are num itself (0..4): integer labels are their own class ids.
    assert table.class_names == ("0", "1", "2", "3", "4")
    np.testing.assert_array_equal(data.y > 0, heart.y == 1)


def test_csv_query_names_the_columns_and_text_labels_are_classes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.csv"
    path.write_text(
        "site,a,b,diagnosis\n"
        'north,1.5,2,benign\nsouth,"3",4,malignant\nnorth,5,NA,benign\nsouth,7,8,benign\n'
    )
    table = read_table_file(f"{path}?label=diagnosis&institution=site", "csv")
    assert table.feature_names == ("a", "b") and table.class_names == (
        "benign",
        "malignant",
    )
    np.testing.assert_array_equal(table.data.x, [[1.5, 2], [3, 4], [7, 8]])
    np.testing.assert_array_equal(table.data.y, [0, 1, 0])
    assert table.data.group_names == ("north", "south")
    # Without naming `site` it is not the institution but a (non-numeric) feature.
    with pytest.raises(ValueError, match="column 'site', data row 1: 'north'"):
        load_csv(f"{path}?label=diagnosis")


def test_csv_errors_name_the_file_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("x1,x2,target\n1,2,0\n3,4,1\n")
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        load_csv(str(tmp_path / "absent.csv"))
    with pytest.raises(ValueError, match=r"label column 'label' not found.*'target'"):
        load_csv(str(path))
    with pytest.raises(ValueError, match=r"label column 'y' not found"):
        load_csv(f"{path}?label=y")
    with pytest.raises(ValueError, match="institution column 'site' not found"):
        load_csv(f"{path}?label=target&institution=site")
    with pytest.raises(ValueError, match="'lable=target' is not one of label=<column>"):
        load_csv(f"{path}?lable=target")
    with pytest.raises(ValueError, match="needs data-path"):
        load_source("csv", "")
    assert len(load_csv(f"{path}?label=target")) == 2
    (tmp_path / "ragged.csv").write_text("a,label\n1,0\n2\n")
    with pytest.raises(ValueError, match="row 3: 1 values"):
        load_csv(str(tmp_path / "ragged.csv"))
    (tmp_path / "head.csv").write_text("a,label\n")
    with pytest.raises(ValueError, match="no data rows"):
        load_csv(str(tmp_path / "head.csv"))
    (tmp_path / "dup.csv").write_text("a,a,label\n1,2,0\n")
    with pytest.raises(ValueError, match=r"repeated \['a'\]"):
        load_csv(str(tmp_path / "dup.csv"))
    (tmp_path / "word.csv").write_text("a,label\n1,0\n?,1\nfoo,0\n")
    with pytest.raises(
        ValueError, match="column 'a', data row 3: 'foo' is not a number"
    ):
        load_csv(str(tmp_path / "word.csv"))
    (tmp_path / "only.csv").write_text("label\n0\n")
    with pytest.raises(ValueError, match="no feature columns"):
        load_csv(str(tmp_path / "only.csv"))


def test_npz_columns_load_like_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=20), rng.normal(size=20)
    a[3] = np.nan
    label = np.array(["yes", "no"] * 10)
    hospital = np.arange(20) % 3
    np.savez(tmp_path / "t.npz", a=a, b=b, label=label, institution=hospital)
    data = load_npz(str(tmp_path / "t.npz"))
    assert (
        len(data) == 19
        and data.input_shape == (2,)
        and data.group_names == ("0", "1", "2")
    )
    np.testing.assert_array_equal(data.y, (np.delete(label, 3) == "yes").astype(int))
    np.testing.assert_allclose(data.x[:, 1], np.delete(b, 3).astype(np.float32))
    assert load_source("npz", str(tmp_path / "t.npz")).name == "t.npz"
    np.savez(tmp_path / "bad.npz", a=np.zeros((4, 2)), label=np.zeros(4))
    with pytest.raises(ValueError, match="1-D"):
        load_npz(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "ragged.npz", a=np.zeros(4), label=np.zeros(5))
    with pytest.raises(ValueError, match="differ in length"):
        load_npz(str(tmp_path / "ragged.npz"))
    with pytest.raises(ValueError, match="dataset='npz'"):
        load_csv(str(tmp_path / "t.npz"))
    (tmp_path / "fake.npz").write_text("a,label\n1,0\n")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(str(tmp_path / "fake.npz"))


def test_file_spec_defaults() -> None:
    spec = parse_file_spec("dir/x.csv", "csv")
    assert spec.path == Path("dir/x.csv") and spec.label_column == "label"
    assert spec.institution_column == "institution" and not spec.institution_required


# --- The registry -------------------------------------------------------


def test_registry_names_and_clear_errors() -> None:
    assert {"digits", "mnist", "heart", "csv", "npz"} <= set(SOURCES)
    assert is_known_dataset("heart") and is_known_dataset("heart+csv+csv")
    assert not is_known_dataset("cifar10") and not is_known_dataset("heart+")
    with pytest.raises(ValueError, match=r"\['cifar10'\] not among csv, digits, heart"):
        load_source("cifar10")
    with pytest.raises(
        ValueError, match="2 ';'-separated entries but the dataset fuses 3"
    ):
        split_data_path("a;b", 3)
    assert split_data_path("", 2) == ["", ""] and split_data_path("a;", 2) == ["a", ""]
    with pytest.raises(ValueError, match="use load_fused"):
        load_described_source("digits+digits")
    digits = load_described_source("digits")
    assert digits.schema.feature_names is None and len(digits.data) == 1797
