"""The in-memory labelled dataset that every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

DataKind = Literal["image", "tabular"]


@dataclass(frozen=True)
class LabeledData:
    """Features and integer labels of one dataset, or of one part of it.

    Parameters
    ----------
    x : np.ndarray
        float32 features: ``(n, height, width, channels)`` for images,
        ``(n, features)`` for tables.
    y : np.ndarray
        int64 labels in ``[0, num_classes)``.
    num_classes : int
        Size of the label space (not only the labels present in ``y``).
    kind : {"image", "tabular"}
        Decides which model the clients build (CNN or MLP).
    name : str
        Name of the source, for logs and reports.
    groups : np.ndarray, optional
        int64 institution or writer index per sample, for natural partitions.
    group_names : tuple of str
        Name of each group index.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    kind: DataKind
    name: str
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(
                f"{self.name}: {len(self.x)} feature rows but {len(self.y)} labels"
            )
        if self.groups is not None and len(self.groups) != len(self.y):
            raise ValueError(
                f"{self.name}: {len(self.groups)} group ids but {len(self.y)} labels"
            )
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise ValueError(
                f"{self.name}: labels must lie in [0, {self.num_classes}), "
                f"found [{self.y.min()}, {self.y.max()}]"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(int(d) for d in self.x.shape[1:])

    def subset(self, indices: np.ndarray) -> LabeledData:
        """Return the samples at ``indices`` (a copy), keeping the label space."""
        return LabeledData(
            x=self.x[indices],
            y=self.y[indices],
            num_classes=self.num_classes,
            kind=self.kind,
            name=self.name,
            groups=None if self.groups is None else self.groups[indices],
            group_names=self.group_names,
        )

    def label_histogram(self) -> np.ndarray:
        """Count of samples per class, length ``num_classes``."""
        return np.bincount(self.y, minlength=self.num_classes)
