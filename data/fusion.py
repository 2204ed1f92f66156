"""Fuse several sources into one federation: align, de-duplicate, keep provenance.

Each source (or, when it has institutions, each of its institutions) becomes
one group of the fused dataset, so ``partitioner = "natural"`` gives one
client per source or institution, as in cross-silo benchmarks such as FLamby
(Ogier du Terrail et al. 2022). Fusion

1. aligns the schemas: all sources must be of one kind; images must share
   one shape; tables must have the same features, matched by name (and
   reordered to the first source's order) where names are known, by position
   otherwise;
2. aligns the label spaces by class name: the fused classes are the union of
   the sources' classes in first-seen order, and each source's labels are
   re-indexed into it; a source that shares no class with the others cannot
   be aligned;
3. removes exact duplicates across sources: a sample whose features and
   (aligned) label equal those of a sample of an earlier source is dropped,
   so a record shared by two registries is counted once; duplicates within
   one source are kept, being that source's own data. Samples with equal
   features but different labels are kept and counted as conflicts;
4. reports the counts per source before and after, logged at INFO level.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np

from flwr.common.logger import log

from .dataset import LabeledData


@dataclass(frozen=True)
class Schema:
    """The names a source's columns and classes carry, for alignment.

    Parameters
    ----------
    feature_names : tuple of str, optional
        One name per tabular feature; None aligns by position (images, or
        tables without a header).
    class_names : tuple of str, optional
        The name of each class id; None means ``"0", "1", ...``.
    """

    feature_names: tuple[str, ...] | None = None
    class_names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SourceReport:
    """What fusion did to one source."""

    name: str
    before: int
    after: int
    duplicates: int
    conflicts: int
    groups: tuple[str, ...]


@dataclass(frozen=True)
class FusionReport:
    """What fusion did: counts per source, the fused classes and features."""

    sources: tuple[SourceReport, ...]
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...] | None

    @property
    def before(self) -> int:
        """Samples over all sources before de-duplication."""
        return sum(s.before for s in self.sources)

    @property
    def after(self) -> int:
        """Samples in the fused dataset."""
        return sum(s.after for s in self.sources)

    @property
    def duplicates(self) -> int:
        """Samples dropped as exact duplicates of an earlier source's sample."""
        return sum(s.duplicates for s in self.sources)


def class_names_of(data: LabeledData, schema: Schema | None) -> tuple[str, ...]:
    """The class names of ``data``: the schema's, or ``"0".."num_classes-1"``.

    Raises
    ------
    ValueError
        When the schema names a different number of classes than ``data`` has.
    """
    if schema is None or schema.class_names is None:
        return tuple(str(k) for k in range(data.num_classes))
    if len(schema.class_names) != data.num_classes:
        raise ValueError(
            f"{data.name}: {data.num_classes} classes but the schema names "
            f"{len(schema.class_names)}: {list(schema.class_names)}"
        )
    return schema.class_names


def unique_names(names: Sequence[str]) -> list[str]:
    """Make source names distinct: a repeated name gets ``#2``, ``#3``, ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def align_features(
    sources: Sequence[LabeledData], schemas: Sequence[Schema | None]
) -> tuple[list[np.ndarray], tuple[str, ...] | None]:
    """Return each source's features in one common layout, and the feature names.

    Raises
    ------
    ValueError
        On mixed kinds, images of different shapes, or tables whose features
        differ in number or names.
    """
    kinds = {s.kind for s in sources}
    if len(kinds) > 1:
        raise ValueError(
            "cannot fuse images with tables: "
            + ", ".join(f"{s.name} is {s.kind}" for s in sources)
        )
    shapes = {s.input_shape for s in sources}
    if sources[0].kind == "image":
        if len(shapes) > 1:
            raise ValueError(
                "cannot fuse images of different sizes: "
                + ", ".join(f"{s.name} {s.input_shape}" for s in sources)
                + "; resize them to one shape first"
            )
        return [s.x for s in sources], None
    if len(shapes) > 1:
        raise ValueError(
            "cannot fuse tables with different numbers of features: "
            + ", ".join(f"{s.name} has {s.input_shape[0]}" for s in sources)
        )
    named = [
        (s, sc.feature_names)
        for s, sc in zip(sources, schemas, strict=True)
        if sc is not None and sc.feature_names is not None
    ]
    if not named:
        return [s.x for s in sources], None
    reference_source, reference = named[0]
    xs = []
    for source, schema in zip(sources, schemas, strict=True):
        names = None if schema is None else schema.feature_names
        if names is None:
            xs.append(source.x)
            continue
        if len(names) != source.x.shape[1] or len(set(names)) != len(names):
            raise ValueError(
                f"{source.name}: {source.x.shape[1]} features but the schema names "
                f"{list(names)} (names must be distinct, one per feature)"
            )
        missing = [n for n in reference if n not in names]
        extra = [n for n in names if n not in reference]
        if missing or extra:
            raise ValueError(
                f"cannot align features of {source.name} with {reference_source.name}: "
                f"{source.name} lacks {missing} and has extra {extra}; "
                f"expected {list(reference)}"
            )
        xs.append(source.x[:, [names.index(n) for n in reference]])
    return xs, reference


def align_labels(
    sources: Sequence[LabeledData], schemas: Sequence[Schema | None]
) -> tuple[list[np.ndarray], tuple[str, ...]]:
    """Re-index each source's labels into the union of class names.

    Raises
    ------
    ValueError
        When a source shares no class name with the other sources.
    """
    per_source = [class_names_of(s, sc) for s, sc in zip(sources, schemas, strict=True)]
    fused: list[str] = []
    for names in per_source:
        fused.extend(n for n in names if n not in fused)
    if len(sources) > 1:
        # Latest source first: it is the one that was added to the others.
        for k in reversed(range(len(sources))):
            others = {n for j, ns in enumerate(per_source) if j != k for n in ns}
            if not others.intersection(per_source[k]):
                raise ValueError(
                    f"cannot align the labels of {sources[k].name}: its classes "
                    f"{list(per_source[k])} share none with the other sources' "
                    f"{sorted(others)}; relabel one side so class names match"
                )
    index = {name: k for k, name in enumerate(fused)}
    ys = [
        np.array([index[n] for n in names], dtype=np.int64)[source.y]
        for source, names in zip(sources, per_source, strict=True)
    ]
    return ys, tuple(fused)


def row_digests(x: np.ndarray) -> list[bytes]:
    """BLAKE2b digest (128 bits) of each float32 sample, ``-0.0`` as ``0.0``."""
    flat = np.ascontiguousarray(x.reshape(len(x), -1).astype(np.float32) + 0.0)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def cross_source_duplicates(
    xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], list[int]]:
    """Find samples equal to a sample of an earlier source.

    Returns
    -------
    keep : list of np.ndarray
        Per source, a boolean mask: False where features and label both equal
        those of a sample of an earlier source.
    conflicts : list of int
        Per source, kept samples whose features equal an earlier source's
        sample but whose label differs.
    """
    seen_x: set[bytes] = set()
    seen_xy: set[tuple[bytes, int]] = set()
    keep, conflicts = [], []
    for x, y in zip(xs, ys, strict=True):
        digests = row_digests(x)
        mask = np.array(
            [
                (d, int(label)) not in seen_xy
                for d, label in zip(digests, y, strict=True)
            ],
            dtype=bool,
        )
        conflicts.append(
            sum(1 for d, m in zip(digests, mask, strict=True) if m and d in seen_x)
        )
        keep.append(mask)
        seen_x.update(digests)
        seen_xy.update(zip(digests, (int(v) for v in y), strict=True))
    return keep, conflicts


def source_groups(source: LabeledData, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Group ids and names of one source: its institutions, or itself as one group."""
    if source.groups is None:
        return np.zeros(len(source), dtype=np.int64), (name,)
    count = int(source.groups.max()) + 1 if len(source) else 0
    labels = list(source.group_names) + [
        str(g) for g in range(len(source.group_names), count)
    ]
    return source.groups.astype(np.int64), tuple(f"{name}/{g}" for g in labels)


def compact_groups(
    groups: np.ndarray, names: tuple[str, ...]
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Renumber group ids to ``0..k-1`` over the groups that still hold samples."""
    present = np.unique(groups)
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[present] = np.arange(len(present))
    return remap[groups], tuple(names[g] for g in present)


def log_report(report: FusionReport, name: str) -> None:
    """Log what fusion did, one line per source."""
    log(
        INFO,
        "Fused %s: %d samples from %d sources -> %d (%d exact duplicates "
        "removed), classes %s",
        name,
        report.before,
        len(report.sources),
        report.after,
        report.duplicates,
        list(report.class_names),
    )
    for s in report.sources:
        log(
            INFO,
            "  %s: %d before, %d after (%d duplicates of earlier sources), groups %s",
            s.name,
            s.before,
            s.after,
            s.duplicates,
            list(s.groups),
        )
        if s.conflicts:
            log(
                WARNING,
                "  %s: %d samples equal an earlier source's features with "
                "a different label; kept",
                s.name,
                s.conflicts,
            )


def fuse(
    sources: Sequence[LabeledData],
    schemas: Sequence[Schema | None] | None = None,
    *,
    name: str | None = None,
) -> tuple[LabeledData, FusionReport]:
    """Fuse ``sources`` into one dataset, one group per source or per institution.

    Parameters
    ----------
    sources : sequence of LabeledData
        The datasets, in priority order: a duplicate is kept in the earliest source.
    schemas : sequence of Schema or None, optional
        Feature and class names per source (None: positional features,
        classes ``"0".."k-1"``).
    name : str, optional
        Name of the fused dataset; default the sources' names joined by ``+``.

    Returns
    -------
    (LabeledData, FusionReport)
        The fused data (``groups`` and ``group_names`` set) and what was done.

    Raises
    ------
    ValueError
        When no source is given, or schemas or label spaces cannot be aligned.
    """
    if not sources:
        raise ValueError("fusion needs at least one source")
    schemas = list(schemas) if schemas is not None else [None] * len(sources)
    if len(schemas) != len(sources):
        raise ValueError(f"{len(sources)} sources but {len(schemas)} schemas")
    names = unique_names([s.name for s in sources])
    xs, feature_names = align_features(sources, schemas)
    ys, class_names = align_labels(sources, schemas)
    keep, conflicts = cross_source_duplicates(xs, ys)

    all_groups, all_group_names, reports = [], [], []
    for source, source_name, mask, clashes in zip(
        sources, names, keep, conflicts, strict=True
    ):
        groups, group_names = source_groups(source, source_name)
        all_groups.append(groups[mask] + len(all_group_names))
        all_group_names.extend(group_names)
        kept_groups = tuple(group_names[g] for g in np.unique(groups[mask]))
        reports.append(
            SourceReport(
                name=source_name,
                before=len(source),
                after=int(mask.sum()),
                duplicates=int((~mask).sum()),
                conflicts=clashes,
                groups=kept_groups,
            )
        )
    groups, group_names = compact_groups(
        np.concatenate(all_groups), tuple(all_group_names)
    )
    fused_name = name or "+".join(names)
    fused = LabeledData(
        x=np.concatenate([x[m] for x, m in zip(xs, keep, strict=True)]).astype(
            np.float32
        ),
        y=np.concatenate([y[m] for y, m in zip(ys, keep, strict=True)]),
        num_classes=len(class_names),
        kind=sources[0].kind,
        name=fused_name,
        groups=groups,
        group_names=group_names,
    )
    report = FusionReport(
        sources=tuple(reports), class_names=class_names, feature_names=feature_names
    )
    log_report(report, fused_name)
    return fused, report
