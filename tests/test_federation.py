"""The default federation: held-out server test set, disjoint client parts, reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from data.federation import (
    FederationSpec,
    build_federation,
    load_client_data,
    load_server_split,
    stratified_split,
)
from data.sources import load_source


def spec(**overrides: object) -> FederationSpec:
    values: dict[str, object] = dict(
        dataset="digits", data_path="", partitioner="iid", num_partitions=10,
        seed=42, test_fraction=0.2,
    )
    values.update(overrides)
    return FederationSpec(**values)  # type: ignore[arg-type]


def test_digits_is_the_embedded_dataset() -> None:
    digits = load_source("digits")
    assert digits.x.shape == (1797, 8, 8, 1) and digits.x.dtype == np.float32
    assert 0.0 <= digits.x.min() and digits.x.max() <= 1.0
    assert digits.label_histogram().sum() == 1797 and digits.num_classes == 10


def test_server_test_set_is_stratified_held_out_and_fixed_by_seed() -> None:
    train, test = load_server_split("digits", "", 0.2, 42)
    assert len(test) == pytest.approx(0.2 * 1797, abs=1)
    assert len(train) + len(test) == 1797
    # Stratified: each class's share differs from the whole set's by < 1 sample's worth.
    whole = load_source("digits").label_histogram() / 1797
    assert np.abs(test.label_histogram() / len(test) - whole).max() < 1 / len(test) + 1e-9
    # Disjoint: no test image appears among the training images.
    train_rows = {row.tobytes() for row in train.x}
    assert sum(row.tobytes() in train_rows for row in test.x) <= 1  # digits has 1 duplicate pair
    again_train, again_test = stratified_split(load_source("digits"), 0.2, 42)
    np.testing.assert_array_equal(again_test.y, test.y)
    other_train, other_test = stratified_split(load_source("digits"), 0.2, 7)
    assert not np.array_equal(other_test.x, test.x)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_cover_the_training_set_without_overlap(partitioner: str) -> None:
    federation = build_federation(spec(partitioner=partitioner))
    parts = federation.partitions
    assert len(parts) == 10
    everything = np.concatenate(parts)
    assert len(everything) == len(federation.train)
    assert len(np.unique(everything)) == len(everything)
    assert all(len(p) > 0 for p in parts)


def test_equal_seeds_reproduce_and_other_seeds_differ() -> None:
    a = build_federation(spec(partitioner="dirichlet", seed=5))
    build_federation.cache_clear()
    b = build_federation(spec(partitioner="dirichlet", seed=5))
    c = build_federation(spec(partitioner="dirichlet", seed=6))
    for pa, pb in zip(a.partitions, b.partitions):
        np.testing.assert_array_equal(pa, pb)
    assert any(len(pa) != len(pc) or (pa != pc).any() for pa, pc in zip(a.partitions, c.partitions))


def test_dirichlet_alpha_controls_label_skew() -> None:
    def skew(alpha: float) -> float:
        federation = build_federation(spec(partitioner="dirichlet", dirichlet_alpha=alpha))
        shares = [
            np.bincount(federation.train.y[p], minlength=10) / len(p) for p in federation.partitions
        ]
        return float(np.mean([s.max() for s in shares]))

    assert skew(0.1) > skew(100.0) + 0.2


def test_client_train_and_validation_are_disjoint_parts_of_its_partition() -> None:
    s = spec()
    federation = build_federation(s)
    train, val = load_client_data(s, 3)
    assert len(train) + len(val) == len(federation.partitions[3])
    assert len(val) >= 1
    train_rows = {row.tobytes() for row in train.x}
    assert not any(row.tobytes() in train_rows for row in val.x)


def test_bad_partition_requests_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="partition-id=10"):
        load_client_data(spec(), 10)
    with pytest.raises(ValueError, match="only 1437 training samples"):
        build_federation(spec(num_partitions=5000))


def test_standardising_huge_finite_features_stays_finite() -> None:
    """float32 sums of 1e20..3e38 overflowed or cancelled: columns came out NaN or all zero."""
    import numpy as np

    from data.dataset import LabeledData
    from data.federation import standardize

    x = np.array([[3e38, 1e20, 1.0], [-3e38, -1e20, 2.0], [1e38, 3e20, 3.0]], np.float32)
    train = LabeledData(x, np.array([0, 1, 0]), 2, "tabular", "t")
    (out,) = standardize(train)
    assert np.isfinite(out.x).all() and out.x.dtype == np.float32
    assert np.allclose(out.x.mean(axis=0), 0.0, atol=1e-6)
    assert np.allclose(out.x.std(axis=0), 1.0, atol=1e-5)
