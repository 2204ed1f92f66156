"""One federation per process: the server's held-out test set and each client's part.

Everything here is cached per process (``functools.lru_cache``), so a
dataset is read and partitioned once per process, not once per round: Flower's
simulation keeps its worker processes across rounds, and a deployed SuperNode
reads its own files once per ClientApp process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from logging import DEBUG

import numpy as np

from flwr.common.logger import log

from .dataset import LabeledData
from .partition import partition_indices
from .public_slice import parse_server_data, split_public_slice
from .sources import load_official_split, load_source
from .tabular_file import DEFAULT_MAX_CLASSES


@dataclass(frozen=True)
class FederationSpec:
    """What identifies a federation; equal specs give identical data everywhere."""

    dataset: str
    data_path: str
    partitioner: str
    num_partitions: int
    seed: int
    test_fraction: float
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    val_fraction: float = 0.1
    server_data: str = ""
    max_classes: int = DEFAULT_MAX_CLASSES


@dataclass(frozen=True)
class Federation:
    """The server's held-out test set and the clients' training indices."""

    train: LabeledData
    test: LabeledData
    partitions: tuple[np.ndarray, ...]


def stratified_split(
    data: LabeledData, fraction: float, seed: int
) -> tuple[LabeledData, LabeledData]:
    """Split off ``fraction`` of ``data``, stratified by label where possible.

    Returns ``(rest, held_out)``. Stratification falls back to a plain seeded
    split when a class has too few samples to appear on both sides.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must lie in (0, 1), got {fraction}")
    indices = np.arange(len(data))
    counts = data.label_histogram()
    stratify = data.y if counts[counts > 0].min() >= 2 else None
    try:
        rest, held_out = train_test_split(
            indices, test_size=fraction, random_state=seed, stratify=stratify
        )
    except ValueError:
        # Too few samples per class for the requested held-out size.
        rest, held_out = train_test_split(
            indices, test_size=fraction, random_state=seed, stratify=None
        )
    return data.subset(np.sort(rest)), data.subset(np.sort(held_out))


@lru_cache(maxsize=4)
def load_dataset(name: str, data_path: str, max_classes: int = DEFAULT_MAX_CLASSES) -> LabeledData:
    """Load a source once per process (``max_classes``: the cap on a table's label space)."""
    return load_source(name, data_path, max_classes=max_classes)


def standardize(train: LabeledData, *others: LabeledData) -> list[LabeledData]:
    """Scale tabular features to zero mean, unit variance with ``train``'s statistics.

    The statistics come from the training side only, so nothing of the
    server's held-out test set leaks into training. Images are returned as they are.
    """
    if train.kind != "tabular":
        return [train, *others]
    # float64: float32 sums of features near 1e20..3e38 overflow or cancel, and
    # the standardised columns would come out NaN or zero.
    mean = train.x.mean(axis=0, dtype=np.float64)
    std = train.x.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return [
        replace(part, x=((part.x.astype(np.float64) - mean) / std).astype(np.float32))
        for part in (train, *others)
    ]


@lru_cache(maxsize=4)
def load_server_split(
    name: str,
    data_path: str,
    test_fraction: float,
    seed: int,
    max_classes: int = DEFAULT_MAX_CLASSES,
) -> tuple[LabeledData, LabeledData]:
    """Return ``(train, test)``: the test set is held out before partitioning.

    A source with an official test set (MNIST's 10,000 images) keeps it, as
    in the published benchmarks, and ``test_fraction`` does not apply; other
    sources hold out a stratified ``test_fraction``. Tabular features are
    standardised with the training side's statistics.
    """
    official = load_official_split(name, data_path)
    if official is not None:
        train, test = official
    else:
        train, test = stratified_split(
            load_dataset(name, data_path, max_classes), test_fraction, seed
        )
    train, test = standardize(train, test)
    return train, test


def client_pool(train: LabeledData, spec: FederationSpec) -> LabeledData:
    """The training data left to the clients once the server's public slice is held out."""
    server_data = parse_server_data(spec.server_data)
    if server_data is None:
        return train
    return split_public_slice(train, server_data.size, spec.seed)[0]


@lru_cache(maxsize=4)
def load_server_data(spec: FederationSpec) -> LabeledData | None:
    """The server's own (public) training data, disjoint from every client and the test set."""
    server_data = parse_server_data(spec.server_data)
    if server_data is None:
        return None
    train, _ = load_server_split(
        spec.dataset, spec.data_path, spec.test_fraction, spec.seed, spec.max_classes
    )
    return split_public_slice(train, server_data.size, spec.seed)[1]


@lru_cache(maxsize=4)
def build_federation(spec: FederationSpec) -> Federation:
    """Hold out the server's test set, then partition the rest over the clients."""
    train, test = load_server_split(
        spec.dataset, spec.data_path, spec.test_fraction, spec.seed, spec.max_classes
    )
    train = client_pool(train, spec)
    partitions = partition_indices(
        train.y,
        spec.num_partitions,
        spec.partitioner,
        seed=spec.seed,
        dirichlet_alpha=spec.dirichlet_alpha,
        shards_per_client=spec.shards_per_client,
        groups=train.groups,
    )
    return Federation(train=train, test=test, partitions=tuple(partitions))


def split_local(
    local: LabeledData, val_fraction: float, seed: int
) -> tuple[LabeledData, LabeledData]:
    """A client's ``(train, validation)`` split of its own data (no validation below 2 samples)."""
    if len(local) < 2:
        return local, local.subset(np.arange(0))
    return stratified_split(local, val_fraction, seed)


def local_train_size(num_samples: int, val_fraction: float) -> int:
    """How many of a client's ``num_samples`` :func:`split_local` leaves for training.

    Without loading the data: scikit-learn's ``train_test_split`` (behind
    :func:`stratified_split`) holds out ``ceil(val_fraction * n)``.
    """
    if num_samples < 2:
        return num_samples
    return num_samples - math.ceil(val_fraction * num_samples)


@lru_cache(maxsize=64)
def load_client_data(
    spec: FederationSpec, partition_id: int
) -> tuple[LabeledData, LabeledData]:
    """Return client ``partition_id``'s local ``(train, validation)`` split."""
    if not 0 <= partition_id < spec.num_partitions:
        raise ValueError(
            f"partition-id={partition_id} must lie in [0, {spec.num_partitions})"
        )
    federation = build_federation(spec)
    local = federation.train.subset(federation.partitions[partition_id])
    train, val = split_local(local, spec.val_fraction, spec.seed + partition_id)
    log(
        DEBUG,
        "Client %d: %d train / %d validation samples, labels %s",
        partition_id,
        len(train),
        len(val),
        train.label_histogram().tolist(),
    )
    return train, val


@dataclass(frozen=True)
class PublicFederation:
    """A federation whose clients share ``federation.train``, and the server's public slice."""

    federation: Federation
    public: LabeledData


def build_federation_with_public_slice(spec: FederationSpec, server_data: str) -> PublicFederation:
    """Hold out the test set, then the public slice, then partition the rest.

    :func:`data.federation.build_federation` and
    :func:`data.federation.load_server_data` of ``spec`` with this
    ``server-data`` (both cached): ``federation.train`` is the client pool
    (the slice removed), the partitions index into it, and ``public`` is the
    slice.

    Raises
    ------
    ValueError
        When ``server_data`` names no data (use ``build_federation``) or is invalid.
    """
    if parse_server_data(server_data) is None:
        raise ValueError("server-data is empty: there is no public slice to hold out")
    spec = replace(spec, server_data=server_data)
    public = load_server_data(spec)
    assert public is not None  # server_data names a slice
    return PublicFederation(build_federation(spec), public)
