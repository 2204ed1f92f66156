"""A user's own CSV / ``.npz`` table: the malformed inputs a user actually sent.

Each test pins one reported problem of :mod:`data.tabular_file` (and the
node-file and registry paths that call it): a cap on the number of classes,
non-finite features refused at load time, warnings for a single class or a
continuous-looking label column, UTF-8 files saved with a BOM, and a few
inputs whose errors did not name the file. Fast: tiny files, no Flower run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from data.node_files import load_node_data, load_node_file, split_classes
from data.sources import load_described_source, load_fused, load_source
from data import tabular_file
from data.tabular_file import load_csv, load_npz, read_table_file


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def table_text(labels: list[str], features: int = 2, header: str = "label") -> str:
    names = [f"f{j}" for j in range(features)]
    lines = [",".join([*names, header])]
    for k, label in enumerate(labels):
        lines.append(",".join([*(str(k + j) for j in range(features)), label]))
    return "\n".join(lines) + "\n"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --- 1. The cap on the number of classes ---------------------------------


def test_the_default_class_cap_is_a_documented_module_constant() -> None:
    assert tabular_file.DEFAULT_MAX_CLASSES == 1000
    # Callers that catch ValueError still do.
    assert issubclass(tabular_file.TableFileError, ValueError)


@pytest.mark.parametrize("huge", ["100000", "1000000000", "1e9", "100000000000000000000"])
def test_a_huge_integer_label_is_refused_naming_file_value_and_row(
    tmp_path: Path, huge: str
) -> None:
    # Integer labels are class ids (label space 0..max): one huge id used to
    # build a name per id up to it (100,001 classes, or a MemoryError at 10^9,
    # or an int64 OverflowError at 10^20).
    path = write(tmp_path / "ids.csv", table_text(["0", "1", "1", huge, "0"]))
    with pytest.raises(tabular_file.TableFileError) as caught:
        load_csv(str(path))
    message = str(caught.value)
    assert str(path) in message and "label column 'label'" in message
    assert "data row 4" in message and repr(huge) in message
    assert "1000" in message and "max-classes" in message


def test_the_cap_is_a_parameter_of_every_loading_path(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", table_text([str(k % 12) for k in range(24)]))
    assert read_table_file(str(path), "csv").data.num_classes == 12
    assert load_source("csv", str(path)).num_classes == 12
    assert load_source("csv", str(path), max_classes=12).num_classes == 12
    for load in (
        lambda: read_table_file(str(path), "csv", max_classes=11),
        lambda: load_csv(str(path), max_classes=11),
        lambda: load_source("csv", str(path), max_classes=11),
        lambda: load_described_source("csv", str(path), max_classes=11),
        lambda: load_fused("csv+csv", f"{path};{path}", max_classes=11),
        lambda: load_node_file("csv", f"{path}?classes=12", max_classes=11),
        lambda: load_node_data("csv", f"{path}?classes=12", 0.1, 0, 0, max_classes=11),
    ):
        with pytest.raises(tabular_file.TableFileError, match=r"more than the class cap of 11"):
            load()


def test_text_labels_count_distinct_values_against_the_cap(tmp_path: Path) -> None:
    labels = [f"c{k:03d}" for k in range(6)]
    path = write(tmp_path / "names.csv", table_text([*labels, "c000", "zz", "c001"]))
    with pytest.raises(tabular_file.TableFileError) as caught:
        read_table_file(str(path), "csv", max_classes=6)
    message = str(caught.value)
    # The 7th distinct value, in row order, is the offending one.
    assert str(path) in message and "data row 8" in message and "'zz'" in message
    table = read_table_file(str(path), "csv", max_classes=7)
    assert table.data.num_classes == 7 and table.class_names[-1] == "zz"


def test_npz_labels_are_capped_too(tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", a=np.arange(3.0), label=np.array([0, 1, 10**12]))
    with pytest.raises(tabular_file.TableFileError, match=r"t\.npz.*data row 3.*1000000000000"):
        load_npz(str(tmp_path / "t.npz"))
    np.savez(tmp_path / "f.npz", a=np.arange(3.0), label=np.array([0.0, 1.0, 1e300]))
    with pytest.raises(tabular_file.TableFileError, match=r"f\.npz.*data row 3"):
        load_npz(str(tmp_path / "f.npz"))


def test_a_node_cannot_declare_more_classes_than_the_cap(tmp_path: Path) -> None:
    # classes=10**9 used to build a billion class names before reading the file.
    with pytest.raises(tabular_file.TableFileError, match=r"classes=1000000000.*class cap of 1000"):
        split_classes(f"{tmp_path / 'x.csv'}?classes=1000000000")
    assert len(split_classes("x.csv?classes=1000")[1] or ()) == 1000
    with pytest.raises(tabular_file.TableFileError, match="class cap of 3"):
        split_classes("x.csv?classes=a,b,c,d", max_classes=3)


# --- 2. Non-finite features ----------------------------------------------


@pytest.mark.parametrize("value", ["inf", "-inf", "1e999", "Infinity", "1e39", "-3.5e38"])
def test_a_non_finite_feature_is_refused_at_load_time(tmp_path: Path, value: str) -> None:
    # float32 overflow (1e39) is infinite too: every client reply would hold Inf.
    path = write(tmp_path / "inf.csv", "age,weight,label\n1,2,0\n3,4,1\n5," + value + ",0\n")
    with pytest.raises(tabular_file.TableFileError) as caught:
        load_csv(str(path))
    message = str(caught.value)
    assert str(path) in message and "column 'weight'" in message and "data row 3" in message
    assert repr(value) in message and "finite" in message


def test_a_non_finite_npz_feature_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", a=np.array([1.0, np.inf]), label=np.array([0, 1]))
    error = tabular_file.TableFileError
    with pytest.raises(error, match=r"t\.npz: column 'a', data row 2: .*finite"):
        load_npz(str(tmp_path / "t.npz"))
    np.savez(tmp_path / "big.npz", a=np.array([1.0, 1e300]), label=np.array([0, 1]))
    with pytest.raises(tabular_file.TableFileError, match=r"big\.npz: column 'a', data row 2"):
        load_npz(str(tmp_path / "big.npz"))


def test_every_nan_spelling_is_a_missing_value(tmp_path: Path) -> None:
    path = write(tmp_path / "nan.csv", "a,label\n1,0\n-nan,1\n+NaN,0\n2,1\nnan,1\n")
    data = load_csv(str(path))
    np.testing.assert_array_equal(data.x[:, 0], [1, 2])
    np.testing.assert_array_equal(data.y, [0, 1])


# --- 3. Warnings for a label column that looks wrong ---------------------


def test_a_single_class_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "one.csv", table_text(["benign"] * 5))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        data = load_csv(str(path))
    assert data.num_classes == 1
    (warning,) = warnings_of(caplog)
    assert str(path) in warning and "one class" in warning and "'benign'" in warning


def test_a_single_integer_class_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "one.csv", table_text(["1"] * 5))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        load_csv(str(path))
    assert any("one class" in w and "'1'" in w for w in warnings_of(caplog))


def test_a_continuous_label_column_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(200, 3))
    lines = ["f0,f1,label"] + [f"{a:.6f},{b:.6f},{int(c > 0)}" for a, b, c in values]
    path = write(tmp_path / "f.csv", "\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        table = read_table_file(f"{path}?label=f0", "csv")
    assert table.data.num_classes == 200
    (warning,) = warnings_of(caplog)
    assert str(path) in warning and "'f0'" in warning and "continuous" in warning
    assert "non-integer" in warning


def test_many_distinct_integer_labels_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An integer-valued continuous column (age) as label: ~3 rows per class.
    labels = [str(20 + k % 60) for k in range(180)]
    path = write(tmp_path / "age.csv", table_text(labels))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        load_csv(str(path))
    text = " ".join(warnings_of(caplog))
    assert "continuous" in text and "60 distinct labels in 180 rows" in text
    # ... and ids 0..19 have no row: the label space has empty classes.
    assert "20 of 80 classes" in text


def test_integer_ids_with_empty_classes_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "gap.csv", table_text(["1", "2", "1", "2", "5"] * 4))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert load_csv(str(path)).num_classes == 6
    (warning,) = warnings_of(caplog)
    assert "[0, 3, 4]" in warning and "have no row" in warning


def test_an_ordinary_file_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "ok.csv", table_text(["0", "1", "2"] * 10))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        load_csv(str(path))
        # A node holding one of the declared classes is normal in a federation.
        load_node_file("csv", f"{write(tmp_path / 'n.csv', table_text(['1'] * 6))}?classes=3")
    assert warnings_of(caplog) == []


# --- 4. A UTF-8 BOM ------------------------------------------------------


def test_a_csv_saved_with_a_bom_loads(tmp_path: Path) -> None:
    path = write(tmp_path / "excel.csv", table_text(["0", "1"] * 3), encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    table = read_table_file(str(path), "csv")
    assert table.feature_names == ("f0", "f1") and len(table.data) == 6
    # And when the BOM sits on the label column itself.
    path = write(tmp_path / "first.csv", "label,a\n0,1\n1,2\n", encoding="utf-8-sig")
    assert load_csv(str(path)).num_classes == 2
    assert load_node_file("csv", f"{path}?classes=2").num_classes == 2


# --- Errors that did not name the file -----------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a,label\n1,0\n2,\u00b2\n",  # a superscript digit: isdigit() but not int()
        "a,label\n1,0\n2," + "7" * 5000 + "\n",  # beyond int()'s digit limit
        "a,institution,label\n1,\u00b2,0\n2," + "9" * 5000 + ",1\n",
        "a,label\n" + "1,0\n" * 3 + '"' + "x" * 200_000 + '",1\n',  # over csv's field limit
    ],
)
def test_odd_labels_load_or_fail_naming_the_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "odd.csv", text)
    try:
        data = load_csv(str(path))
    except tabular_file.TableFileError as err:
        assert str(path) in str(err)
    else:
        assert 0 < data.num_classes <= tabular_file.DEFAULT_MAX_CLASSES


def test_npz_columns_of_unsupported_types_are_refused(tmp_path: Path) -> None:
    label = np.array([0, 1])
    np.savez(tmp_path / "c.npz", a=np.array([1 + 2j, 3j]), label=label)
    with pytest.raises(tabular_file.TableFileError, match=r"c\.npz: column 'a' holds complex128"):
        load_npz(str(tmp_path / "c.npz"))
    np.savez(tmp_path / "b.npz", a=np.array([b"1.5", b"\xff"]), label=label)
    with pytest.raises(tabular_file.TableFileError, match=r"b\.npz: column 'a'.*UTF-8"):
        load_npz(str(tmp_path / "b.npz"))
    np.savez(tmp_path / "o.npz", a=np.array([1.0, None], dtype=object), label=label)
    with pytest.raises(tabular_file.TableFileError, match=r"o\.npz is not a readable \.npz"):
        load_npz(str(tmp_path / "o.npz"))
    np.savez(tmp_path / "s.npz", a=np.array([b"1.5", b"2"]), label=label)
    np.testing.assert_array_equal(load_npz(str(tmp_path / "s.npz")).x[:, 0], [1.5, 2])


def test_an_npz_whose_header_declares_a_huge_array_is_refused(tmp_path: Path) -> None:
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (4_000_000_000,)}
    )
    label = io.BytesIO()
    np.lib.format.write_array(label, np.zeros(4))
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as archive:
        archive.writestr("a.npy", header.getvalue() + np.zeros(4).tobytes())
        archive.writestr("label.npy", label.getvalue())
    # It used to allocate 30 GiB (numpy's MemoryError) before reading 32 bytes.
    with pytest.raises(tabular_file.TableFileError, match=r"lie\.npz.*'a'.*declares"):
        load_npz(str(tmp_path / "lie.npz"))
