"""Split a training set over clients with flwr-datasets' partitioners.

The partitioners (``IidPartitioner``, ``DirichletPartitioner``,
``ShardPartitioner``, ``NaturalIdPartitioner`` of flwr-datasets, Beutel et al.
2020) work on a Hugging Face ``datasets.Dataset``; we hand them a two-column
table (sample index, label or group) built in memory, so any in-memory source
can be partitioned without a hub download, and read the sample indices back.

Every partitioner returns disjoint parts that together hold every training
sample, is fixed by its seed, and never leaves a client empty (an error says
what to change instead).
"""

from __future__ import annotations

import warnings

import numpy as np

PARTITIONERS = ("iid", "dirichlet", "shards", "natural")


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    *,
    seed: int,
    dirichlet_alpha: float = 0.5,
    shards_per_client: int = 2,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Return, for each client, the sorted indices of its samples.

    Parameters
    ----------
    labels : np.ndarray
        int labels of the training set.
    num_partitions : int
        Number of clients.
    partitioner : {"iid", "dirichlet", "shards", "natural"}
        ``iid``: a seeded shuffle cut into equal parts. ``dirichlet``: label
        proportions per client drawn from Dir(alpha) (Hsu et al. 2019).
        ``shards``: the pathological split of McMahan et al. (2017): sort by
        label, cut into ``num_partitions * shards_per_client`` equal shards,
        give each client ``shards_per_client`` of them; the fewer than
        ``num_shards`` samples left over by the integer shard size (the end of
        the label-sorted order) join the client holding the last shard, so no
        sample is dropped. ``natural``: one client per institution or writer
        (``groups``), client ``k`` holding the ``k``-th smallest group id.
    seed : int
        Seed of every random choice; equal seeds give equal partitions.

    Raises
    ------
    ValueError
        On an unknown partitioner, more clients than samples, a missing group
        column, or a split that leaves a client empty.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        ShardPartitioner,
    )

    labels = np.asarray(labels)
    n = len(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if groups is not None and len(groups) != n:
        raise ValueError(f"{len(groups)} group ids but {n} labels")
    if partitioner not in PARTITIONERS:
        raise ValueError(
            f"partitioner={partitioner!r} is not one of {', '.join(PARTITIONERS)}"
        )
    if num_partitions < 1:
        raise ValueError(f"num-partitions={num_partitions} must be at least 1")
    if num_partitions > n:
        raise ValueError(
            f"{num_partitions} clients but only {n} training samples: "
            "a client would be empty"
        )

    if partitioner == "dirichlet" and not dirichlet_alpha > 0:
        raise ValueError(f"dirichlet-alpha={dirichlet_alpha} must be > 0")
    if partitioner == "shards" and shards_per_client < 1:
        raise ValueError(f"shards-per-client={shards_per_client} must be at least 1")

    order = np.arange(n)
    if partitioner == "iid":
        # IidPartitioner cuts contiguous shards; shuffle first so they are IID.
        order = np.random.default_rng(seed).permutation(n)
        part = IidPartitioner(num_partitions=num_partitions)
        column = labels[order]
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="column",
            alpha=dirichlet_alpha,
            min_partition_size=1,
            seed=seed,
        )
        column = labels
    elif partitioner == "shards":
        # ShardPartitioner expects data sorted by the key; a stable sort keeps
        # the split reproducible.
        order = np.argsort(labels, kind="stable")
        num_shards = num_partitions * shards_per_client
        if num_shards > n:
            raise ValueError(
                f"shards-per-client={shards_per_client} x {num_partitions} clients "
                f"= {num_shards} shards, more than the {n} training samples"
            )
        part = ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="column",
            num_shards_per_partition=shards_per_client,
            shard_size=n // num_shards,
            shuffle=True,
            seed=seed,
        )
        column = labels[order]
    else:
        if groups is None:
            raise ValueError(
                "partitioner='natural' needs a dataset with institutions or writers; "
                "this one has none"
            )
        present = np.unique(groups)
        if len(present) != num_partitions:
            raise ValueError(
                f"partitioner='natural' gives one client per institution: "
                f"{len(present)} institutions, but {num_partitions} clients were "
                "asked for"
            )
        part = NaturalIdPartitioner(partition_by="column")
        column = groups

    part.dataset = Dataset.from_dict(
        {"position": np.arange(n, dtype=np.int64), "column": np.asarray(column)}
    )
    # NaturalIdPartitioner numbers groups in sorted order, so client k holds
    # the k-th smallest group id, matching the other partitioners' 0..n-1.
    try:
        with warnings.catch_warnings():
            # DirichletPartitioner warns on each resampling; our error says it all.
            warnings.simplefilter("ignore", UserWarning)
            # pyarrow's deprecation notice inside datasets' sort is not ours to fix.
            warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")
            positions = [
                np.asarray(part.load_partition(pid)["position"], dtype=np.int64)
                for pid in range(num_partitions)
            ]
    except ValueError as err:
        if partitioner != "dirichlet":
            raise
        raise ValueError(
            f"partitioner='dirichlet' with dirichlet-alpha={dirichlet_alpha} left a "
            f"client of the {num_partitions} empty in 10 draws; use fewer clients "
            f"or a larger dirichlet-alpha ({err})"
        ) from err
    if partitioner == "shards":
        positions = _give_shard_remainder(
            positions, n, num_partitions * shards_per_client
        )
    result = [np.sort(order[p]) for p in positions]
    empty = [k for k, idx in enumerate(result) if len(idx) == 0]
    if empty:
        raise ValueError(
            f"partitioner={partitioner!r} left client(s) {empty} with no samples; "
            "use fewer clients or a larger dirichlet-alpha"
        )
    return result


def _give_shard_remainder(
    positions: list[np.ndarray], n: int, num_shards: int
) -> list[np.ndarray]:
    """Hand the samples past the last whole shard to the client holding that shard.

    ``ShardPartitioner`` uses ``num_shards * (n // num_shards)`` samples; the
    rest, at the end of the label-sorted order, would otherwise be lost.
    """
    if num_shards * (n // num_shards) == n:
        return positions
    assigned = np.concatenate(positions)
    leftover = np.setdiff1d(np.arange(n), assigned)
    # The data is label-sorted, so the last whole shard ends at the largest
    # assigned position, next to the leftover samples' labels.
    last = assigned.max()
    holder = next(k for k, p in enumerate(positions) if (p == last).any())
    positions = list(positions)
    positions[holder] = np.concatenate([positions[holder], leftover])
    return positions


def label_counts(
    labels: np.ndarray, partitions: list[np.ndarray], num_classes: int
) -> np.ndarray:
    """Samples per client and class: an int array ``(len(partitions), num_classes)``."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in partitions])
