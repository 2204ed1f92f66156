"""Split a training set over clients with flwr-datasets' partitioners.

The partitioners work on a Hugging Face ``datasets.Dataset``; we hand them a
two-column table (sample index, label or group) built in memory, so any
in-memory source can be partitioned without a hub download, and read the
sample indices back.
"""

from __future__ import annotations

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
        give each client ``shards_per_client`` of them. ``natural``: one client
        per institution or writer (``groups``).
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

    n = len(labels)
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
                f"{len(present)} institutions, but {num_partitions} clients were asked for"
            )
        part = NaturalIdPartitioner(partition_by="column")
        column = groups

    part.dataset = Dataset.from_dict(
        {"position": np.arange(n, dtype=np.int64), "column": np.asarray(column)}
    )
    result = []
    # NaturalIdPartitioner numbers groups in sorted order, so client k holds
    # the k-th smallest group id, matching the other partitioners' 0..n-1.
    for pid in range(num_partitions):
        positions = np.asarray(part.load_partition(pid)["position"], dtype=np.int64)
        result.append(np.sort(order[positions]))
    empty = [k for k, idx in enumerate(result) if len(idx) == 0]
    if empty:
        raise ValueError(
            f"partitioner={partitioner!r} left client(s) {empty} with no samples; "
            "use fewer clients or a larger dirichlet-alpha"
        )
    return result
