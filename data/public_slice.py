"""A public slice of the training split for the server, held out before partitioning.

Server-side training on global data (run-config ``server-data``) needs data
that the server may use freely: public, or consented for central use. For
experiments we carve it out of the run's own dataset:

1. the server's test set is held out first (``load_server_split``: MNIST's
   official 10,000 test images, or a stratified ``test-fraction``);
2. from the remaining training split a stratified, seeded *public slice* is
   held out (:func:`split_public_slice`);
3. only what is left is partitioned over the clients.

So the slice is disjoint from the test set and from every client's data by
construction, and every party that builds the federation from the same spec
and ``server-data`` value computes the same three parts. Whether the slice is
used (``server-train-epochs > 0``) does not change the partitions, so runs
with and without server training see identical client data.

``server-data`` values
----------------------
- ``""``: the server holds no data.
- ``"public-slice:<size>"``: ``size`` is a fraction in (0, 1) of the training
  split (``public-slice:0.01``: 600 MNIST images) or a whole number of
  samples >= 1 (``public-slice:600``).

Treating this slice as public is an assumption of the experiment: in a real
deployment it stands for a dataset the server may hold without any client's
consent being needed (a public corpus, synthetic data, data donated for
central use). Under DP-FedAvg, training on it costs no privacy budget only
because no client's record is in it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .dataset import LabeledData

PUBLIC_SLICE = "public-slice"

#: Mixed into the run seed so the slice is not drawn with the same stream as
#: the test split or the partition.
_SLICE_STREAM = 0x5EB1


@dataclass(frozen=True)
class ServerDataSpec:
    """A parsed ``server-data`` value: a public slice of ``size`` samples or fraction."""

    size: float | int

    def count(self, num_samples: int) -> int:
        """Number of samples the slice takes from a split of ``num_samples``."""
        if isinstance(self.size, int):
            return self.size
        return max(1, int(round(self.size * num_samples)))


def parse_server_data(value: str) -> ServerDataSpec | None:
    """Parse a ``server-data`` value (see the module docstring); ``""`` is ``None``.

    Raises
    ------
    ValueError
        When the value is not ``""`` or ``public-slice:<size>`` with a valid size.
    """
    text = value.strip()
    if not text:
        return None
    kind, sep, size_text = text.partition(":")
    hint = (
        f"server-data={value!r}: expected '' (none) or '{PUBLIC_SLICE}:<size>', size a "
        "fraction in (0, 1) or a whole number of samples >= 1"
    )
    if kind.strip() != PUBLIC_SLICE or not sep:
        raise ValueError(hint)
    try:
        size = float(size_text)
    except ValueError:
        raise ValueError(hint) from None
    if 0.0 < size < 1.0:
        return ServerDataSpec(size)
    if size >= 1.0 and size.is_integer():
        return ServerDataSpec(int(size))
    raise ValueError(hint)


def public_slice_indices(labels: np.ndarray, size: float | int, seed: int) -> np.ndarray:
    """Sorted indices of a stratified, seeded slice of ``labels``' samples.

    ``size`` is a fraction in (0, 1) or a count; stratification falls back to
    a plain seeded draw when a class has fewer than two samples or the slice
    is smaller than the number of classes.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    n = len(labels)
    count = ServerDataSpec(size).count(n)
    if not 1 <= count < n:
        raise ValueError(f"a public slice of {count} samples needs 1..{n - 1} of {n}")
    indices = np.arange(n)
    seed_ = int(np.random.SeedSequence([int(seed), _SLICE_STREAM]).generate_state(1)[0])
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    try:
        _, held = train_test_split(indices, test_size=count, random_state=seed_, stratify=stratify)
    except ValueError:  # too few samples per class for a stratified slice of this size
        _, held = train_test_split(indices, test_size=count, random_state=seed_, stratify=None)
    return np.sort(held)


def split_public_slice(
    train: LabeledData, size: float | int, seed: int
) -> tuple[LabeledData, LabeledData]:
    """Return ``(pool, public)``: the training split without the slice, and the slice."""
    held = public_slice_indices(train.y, size, seed)
    keep = np.setdiff1d(np.arange(len(train)), held, assume_unique=True)
    return train.subset(keep), train.subset(held)
