"""Fusing sources: schema and label alignment, de-duplication, the report."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from data.dataset import LabeledData
from data.digits import load_digits
from data.federation import FederationSpec, build_federation
from data.fusion import Schema, fuse
from data.heart import (
    HEART_CLASSES,
    HEART_COLUMNS,
    HEART_FEATURES,
    heart_file_name,
    load_heart,
)
from data.partition import partition_indices
from data.sources import load_fused, load_source
from data.tabular_file import read_table_file

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HEART_DIR = SHARED / "heart-disease"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data copy {path} is absent (see shared/datasets/README.md)")
    return path


def table(x: list[list[float]], y: list[int], name: str, **kw: object) -> LabeledData:
    return LabeledData(
        x=np.asarray(x, dtype=np.float32),
        y=np.asarray(y, dtype=np.int64),
        num_classes=int(kw.pop("num_classes", max(y) + 1)),
        kind="tabular",
        name=name,
        **kw,  # type: ignore[arg-type]
    )


def rows_of(x: np.ndarray, y: np.ndarray) -> list[tuple]:
    return [(*row.tolist(), int(label)) for row, label in zip(x, y, strict=True)]


def write_registry_csv(path: Path, sites: tuple[str, ...], columns: list[str]) -> None:
    """Real heart rows of ``sites`` as a CSV: label = num > 0, institution = site."""
    lines = [",".join(columns)]
    for site in sites:
        for line in (need(HEART_DIR) / heart_file_name(site)).read_text().splitlines():
            if not line.strip():
                continue
            record = dict(zip(HEART_COLUMNS, line.split(","), strict=True))
            record["label"] = str(int(float(record["num"]) > 0))
            record["institution"] = site
            lines.append(",".join(record[c] for c in columns))
    path.write_text("\n".join(lines) + "\n")


def test_two_real_sources_with_overlapping_patients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hospitals {Cleveland, Hungary}, registry {Hungary, Switzerland}: Hungary once."""
    first = load_heart(str(need(HEART_DIR)), sites=("cleveland", "hungarian"))
    columns = ["label", "institution", *sorted(HEART_FEATURES)]  # another column order
    write_registry_csv(tmp_path / "registry.csv", ("hungarian", "switzerland"), columns)
    second = read_table_file(str(tmp_path / "registry.csv"), "csv")
    assert second.feature_names != HEART_FEATURES

    with caplog.at_level(logging.INFO, logger="flwr"):
        fused, report = fuse(
            [first, second.data],
            [
                Schema(HEART_FEATURES, HEART_CLASSES),
                Schema(second.feature_names, second.class_names),
            ],
        )
    # Expected counts, computed from the rows themselves.
    seen = set(rows_of(first.x, first.y))
    second_x = second.data.x[:, [second.feature_names.index(f) for f in HEART_FEATURES]]
    second_rows = rows_of(second_x, second.data.y)
    duplicates = sum(r in seen for r in second_rows)
    assert duplicates == int((second.data.groups == 0).sum()) > 0  # the Hungarian rows
    assert report.duplicates == duplicates
    assert [(s.before, s.after) for s in report.sources] == [
        (len(first), len(first)),
        (len(second.data), len(second.data) - duplicates),
    ]
    assert len(fused) == report.after == len(first) + len(second.data) - duplicates
    assert report.feature_names == HEART_FEATURES and fused.input_shape == (10,)
    # One group per institution; the registry's Hungary (all duplicates) is gone.
    assert fused.group_names == (
        "heart/Cleveland",
        "heart/Hungary",
        "registry.csv/switzerland",
    )
    assert set(rows_of(fused.x, fused.y)) == seen | set(second_rows)
    switzerland = fused.groups == 2
    assert sorted(rows_of(fused.x[switzerland], fused.y[switzerland])) == sorted(
        r for r in second_rows if r not in seen
    )
    # One client per group under the natural partitioner.
    parts = partition_indices(fused.y, 3, "natural", seed=0, groups=fused.groups)
    assert [len(p) for p in parts] == np.bincount(fused.groups).tolist()
    assert f"{duplicates} exact duplicates removed" in caplog.text
    kept = len(second.data) - duplicates
    assert f"registry.csv: {len(second.data)} before, {kept} after" in caplog.text


def test_registry_fuses_plus_joined_names_into_a_natural_federation(
    tmp_path: Path,
) -> None:
    """dataset='heart+csv': 4 hospitals plus a clinic with new patients and 5 copies."""
    heart = load_heart(str(need(HEART_DIR)))
    rng = np.random.default_rng(3)
    copies = rng.choice(len(heart), 5, replace=False)
    new = heart.x[:40].copy()
    new[:, HEART_FEATURES.index("age")] += 1.0  # older patients: not duplicates
    x = np.concatenate([heart.x[copies], new])
    y = np.concatenate([heart.y[copies], heart.y[:40]])
    lines = [",".join([*HEART_FEATURES, "disease"])]
    lines += [
        ",".join([*map(repr, row.tolist()), str(label)])
        for row, label in zip(x, y, strict=True)
    ]
    (tmp_path / "clinic.csv").write_text("\n".join(lines) + "\n")
    data_path = f"{HEART_DIR};{tmp_path / 'clinic.csv'}?label=disease"

    fused, report = load_fused("heart+csv", data_path)
    assert report.duplicates == 5 and len(fused) == len(heart) + 40
    assert fused.group_names[-1] == "clinic.csv" and len(fused.group_names) == 5
    assert np.array_equal(load_source("heart+csv", data_path).y, fused.y)

    spec = FederationSpec(
        dataset="heart+csv",
        data_path=data_path,
        partitioner="natural",
        num_partitions=5,
        seed=0,
        test_fraction=0.2,
    )
    federation = build_federation(spec)
    sizes = [len(p) for p in federation.partitions]
    assert sum(sizes) == len(federation.train) and len(federation.test) > 0
    for k, part in enumerate(federation.partitions):
        assert (federation.train.groups[part] == k).all()


def test_image_sources_deduplicate_across_but_not_within_sources() -> None:
    digits = load_digits()
    shared = np.arange(100)
    altered = digits.subset(np.arange(100, 150))
    altered = LabeledData(
        x=np.clip(altered.x + 0.25, 0, 1),
        y=altered.y,
        num_classes=10,
        kind="image",
        name="digits",
    )
    second = LabeledData(
        x=np.concatenate([digits.x[shared], altered.x, altered.x[:3]]),
        y=np.concatenate([digits.y[shared], altered.y, altered.y[:3]]),
        num_classes=10,
        kind="image",
        name="digits",
    )
    fused, report = fuse([digits, second])
    assert report.sources[1].duplicates == 100  # the shared images, nothing else
    assert report.sources[1].after == 53  # the within-source repeats stay
    assert len(fused) == len(digits) + 53
    assert (
        fused.group_names == ("digits", "digits#2") and fused.name == "digits+digits#2"
    )
    assert np.bincount(fused.groups).tolist() == [len(digits), 53]
    assert fused.input_shape == (8, 8, 1) and fused.kind == "image"


def test_label_spaces_align_by_class_name() -> None:
    a = table([[0, 0], [1, 1]], [0, 1], "a")
    b = table([[2, 2], [3, 3], [4, 4]], [0, 1, 2], "b")
    fused, report = fuse(
        [a, b],
        [
            Schema(class_names=("cat", "dog")),
            Schema(class_names=("dog", "bird", "cat")),
        ],
    )
    assert report.class_names == ("cat", "dog", "bird") and fused.num_classes == 3
    names = [report.class_names[k] for k in fused.y]
    assert names == ["cat", "dog", "dog", "bird", "cat"]


def test_sources_that_cannot_be_aligned_are_clear_errors() -> None:
    a = table([[0, 0], [1, 1]], [0, 1], "a")
    b = table([[2, 2], [3, 3]], [0, 1], "b")
    with pytest.raises(
        ValueError, match=r"labels of b: its classes \['yes', 'no'\] share none"
    ):
        fuse(
            [a, b], [Schema(class_names=("0", "1")), Schema(class_names=("yes", "no"))]
        )
    with pytest.raises(ValueError, match="schema names 3"):
        fuse([a, b], [Schema(class_names=("0", "1", "2")), None])
    wide = table([[0, 0, 0]], [0], "wide", num_classes=2)
    with pytest.raises(ValueError, match="a has 2, wide has 3"):
        fuse([a, wide])
    with pytest.raises(ValueError, match=r"b lacks \['chol'\] and has extra \['sex'\]"):
        fuse([a, b], [Schema(("age", "chol")), Schema(("age", "sex"))])
    digits = load_digits()
    big = LabeledData(
        x=np.zeros((2, 28, 28, 1), np.float32),
        y=np.array([0, 1]),
        num_classes=10,
        kind="image",
        name="mnist",
    )
    with pytest.raises(
        ValueError, match=r"different sizes: digits \(8, 8, 1\), mnist \(28, 28, 1\)"
    ):
        fuse([digits, big])
    with pytest.raises(ValueError, match="cannot fuse images with tables"):
        fuse([digits, a])
    with pytest.raises(ValueError, match="at least one source"):
        fuse([])


def test_registry_refuses_to_fuse_images_of_two_sizes() -> None:
    npz = need(SHARED / "mnist" / "mnist.npz")
    with pytest.raises(
        ValueError, match=r"different sizes: digits \(8, 8, 1\), mnist \(28, 28, 1\)"
    ):
        load_source("digits+mnist", f";{npz}")
    with pytest.raises(
        ValueError, match="1 ';'-separated entries but the dataset fuses 2"
    ):
        load_source("digits+mnist", str(npz))


def test_named_features_are_reordered_and_conflicting_labels_kept() -> None:
    a = table([[1, 2], [3, 4]], [0, 1], "a")
    b = table([[2, 1], [4, 3], [6, 5]], [0, 0, 1], "b")  # columns swapped
    fused, report = fuse([a, b], [Schema(("x1", "x2")), Schema(("x2", "x1"))])
    # (1, 2)->0 duplicates a's first row; (3, 4)->0 conflicts with a's label 1: kept.
    assert report.sources[1].duplicates == 1 and report.sources[1].conflicts == 1
    np.testing.assert_array_equal(fused.x, [[1, 2], [3, 4], [3, 4], [5, 6]])
    np.testing.assert_array_equal(fused.y, [0, 1, 0, 1])
    # Without names, features are matched by position: nothing is a duplicate.
    _, positional = fuse([a, b])
    assert positional.duplicates == 0
