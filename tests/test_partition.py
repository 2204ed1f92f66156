"""Partitioners: cover the training set without overlap, fixed by seed, own shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.digits import load_digits
from data.mnist import load_mnist_split
from data.partition import PARTITIONERS, label_counts, partition_indices

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MNIST_NPZ = SHARED / "mnist" / "mnist.npz"

DIGITS = load_digits().y  # 1,797 labels: not a multiple of the shard counts used below
GROUPS = np.random.default_rng(0).permutation(np.arange(len(DIGITS)) % 7)


def split(partitioner: str, seed: int = 0, **kw: object) -> list[np.ndarray]:
    clients = 7 if partitioner == "natural" else 10
    return partition_indices(
        DIGITS, clients, partitioner, seed=seed, groups=GROUPS, **kw
    )


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_every_sample_goes_to_exactly_one_client(partitioner: str) -> None:
    parts = split(partitioner)
    everything = np.concatenate(parts)
    assert len(everything) == len(DIGITS)  # sizes sum to the training set
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(DIGITS)))
    assert all(len(p) > 0 for p in parts)
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_equal_seeds_reproduce_and_other_seeds_differ(partitioner: str) -> None:
    first, again, other = (
        split(partitioner, 1),
        split(partitioner, 1),
        split(partitioner, 2),
    )
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    differs = any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert differs == (partitioner != "natural")  # natural has nothing random


def test_iid_sizes_differ_by_at_most_one_and_follow_the_global_labels() -> None:
    parts = split("iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    shares = label_counts(DIGITS, parts, 10) / np.array(sizes)[:, None]
    assert np.abs(shares - np.bincount(DIGITS) / len(DIGITS)).max() < 0.15


def mean_label_skew(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's and the global label mix."""
    counts = label_counts(DIGITS, parts, 10)
    local = counts / counts.sum(axis=1, keepdims=True)
    return float(
        0.5 * np.abs(local - np.bincount(DIGITS) / len(DIGITS)).sum(axis=1).mean()
    )


def test_dirichlet_alpha_sets_the_label_skew() -> None:
    skew = {
        alpha: np.mean(
            [
                mean_label_skew(split("dirichlet", s, dirichlet_alpha=alpha))
                for s in range(3)
            ]
        )
        for alpha in (0.1, 1.0, 100.0)
    }
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 3 * skew[100.0]


def test_shards_are_label_sorted_runs_and_the_remainder_is_kept() -> None:
    parts = split("shards", shards_per_client=2)
    shard = len(DIGITS) // 20
    remainder = len(DIGITS) - 20 * shard
    assert remainder > 0
    assert sorted(len(p) for p in parts) == [2 * shard] * 9 + [2 * shard + remainder]
    # Each client's samples are two runs of the label-sorted order: at most 2 labels
    # per shard, so at most 4 per client (boundaries between classes straddle shards).
    assert (label_counts(DIGITS, parts, 10) > 0).sum(axis=1).max() <= 4


def test_natural_gives_one_client_per_group_in_group_order() -> None:
    parts = split("natural")
    for k, part in enumerate(parts):
        np.testing.assert_array_equal(part, np.flatnonzero(GROUPS == k))


@pytest.fixture(scope="module")
def mnist_train_labels() -> np.ndarray:
    if not MNIST_NPZ.exists():
        pytest.skip(
            f"real data copy {MNIST_NPZ} is absent (see shared/datasets/README.md)"
        )
    return load_mnist_split(str(MNIST_NPZ))[0].y


def test_mnist_iid_is_the_fedavg_paper_split(mnist_train_labels: np.ndarray) -> None:
    parts = partition_indices(mnist_train_labels, 100, "iid", seed=0)
    assert [len(p) for p in parts] == [600] * 100


def test_mnist_shards_are_the_fedavg_paper_split(
    mnist_train_labels: np.ndarray,
) -> None:
    """McMahan et al. (2017): sort by label, 200 shards of 300, two per client.

    MNIST's class sizes are not multiples of 300, so the 9 class boundaries fall
    inside 9 shards that hold two digits; a client holding such a shard sees 3
    (or 4) digits. The paper says "most clients will only have examples of two
    digits": all other clients hold at most 2.
    """
    y = mnist_train_labels
    parts = partition_indices(y, 100, "shards", seed=0, shards_per_client=2)
    assert [len(p) for p in parts] == [600] * 100
    rank = np.empty(len(y), dtype=np.int64)
    rank[np.argsort(y, kind="stable")] = np.arange(len(y))
    boundaries = np.cumsum(np.bincount(y))[:-1]
    straddling = set((boundaries // 300)[boundaries % 300 != 0].tolist())
    assert len(straddling) == 9
    labels_per_client = (label_counts(y, parts, 10) > 0).sum(axis=1)
    for part, num_labels in zip(parts, labels_per_client, strict=True):
        shards, sizes = np.unique(rank[part] // 300, return_counts=True)
        assert len(shards) == 2 and sizes.tolist() == [300, 300]  # two whole shards
        assert num_labels <= 2 + len(straddling.intersection(shards.tolist()))
    assert (labels_per_client > 2).sum() <= len(straddling)
    assert (labels_per_client <= 2).sum() >= 100 - len(straddling)


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(
        ValueError, match="partitioner='random' is not one of iid, dirichlet"
    ):
        split("random")
    with pytest.raises(
        ValueError, match="1797 training samples: a client would be empty"
    ):
        partition_indices(DIGITS, 1798, "iid", seed=0)
    with pytest.raises(ValueError, match="must be at least 1"):
        partition_indices(DIGITS, 0, "iid", seed=0)
    with pytest.raises(ValueError, match="has none"):
        partition_indices(DIGITS, 7, "natural", seed=0)
    with pytest.raises(ValueError, match="7 institutions, but 10 clients"):
        partition_indices(DIGITS, 10, "natural", seed=0, groups=GROUPS)
    with pytest.raises(ValueError, match="= 2000 shards, more than the 1797"):
        partition_indices(DIGITS, 1000, "shards", seed=0, shards_per_client=2)
    with pytest.raises(
        ValueError, match="dirichlet-alpha=0.01 left a client of the 6 empty"
    ):
        partition_indices(
            np.array([0, 0, 0, 0, 0, 1]), 6, "dirichlet", seed=0, dirichlet_alpha=0.01
        )
    with pytest.raises(ValueError, match="dirichlet-alpha=0 must be > 0"):
        partition_indices(DIGITS, 3, "dirichlet", seed=0, dirichlet_alpha=0)
    with pytest.raises(ValueError, match="1-D"):
        partition_indices(DIGITS.reshape(-1, 1), 3, "iid", seed=0)
    with pytest.raises(ValueError, match="10 group ids but 1797 labels"):
        partition_indices(DIGITS, 3, "natural", seed=0, groups=GROUPS[:10])
