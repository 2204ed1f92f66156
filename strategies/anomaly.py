"""Per-client anomaly report: each reply's update norm and its cosine similarity to the aggregate.

What lets an operator see a failing device: a reply whose update is ten
times the others' norm, or points away from the aggregate (cosine near -1),
stands out in ``metrics.json`` and the progress line. Never computed under
DP-FedAvg: per-client figures are statistics of a client's data that the
guarantee does not cover (:attr:`AggregationStage.per_client_report`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .validation import TrainReply


@dataclass(frozen=True)
class ClientFigures:
    """One reply's figures in a round."""

    node_id: int
    norm: float
    cosine: float
    status: str = "used"

    def as_dict(self) -> dict[str, float | int | str]:
        """Kebab-case keys, as ``metrics.json`` writes them."""
        return {
            "node": self.node_id,
            "update-norm": self.norm,
            "cosine-to-aggregate": self.cosine,
            "status": self.status,
        }


def client_figures(
    replies: Sequence[TrainReply],
    reference: Mapping[str, np.ndarray],
    averaged: Mapping[str, np.ndarray],
    statuses: Mapping[int, str] | None = None,
) -> list[ClientFigures]:
    """Update norm and cosine to the aggregate update, for every reply (float64, one pass).

    Parameters
    ----------
    replies : sequence of TrainReply
        The round's valid replies (finite arrays of the reference's keys and shapes).
    reference : mapping
        The global arrays sent this round, ``x_t``.
    averaged : mapping
        The stage's aggregate ``x_t + Delta``.
    statuses : mapping of node id to str, optional
        How the stage treated each reply (``"excluded ..."``, ``"clipped ..."``);
        ``"used"`` for the others.
    """
    n = len(replies)
    squares, dots = np.zeros(n), np.zeros(n)
    aggregate_square = 0.0
    for key, ref in reference.items():
        ref64 = np.asarray(ref, dtype=np.float64).ravel()
        direction = np.asarray(averaged[key], dtype=np.float64).ravel() - ref64
        aggregate_square += float(direction @ direction)
        # One (n, size) float64 block per variable, each row written once
        # straight from the reply (np.subtract casts on the fly); then two
        # BLAS calls instead of 2n small dot products.
        updates = np.empty((n, ref64.size))
        for row, reply in zip(updates, replies):
            np.subtract(np.asarray(reply.arrays[key]).ravel(), ref64, out=row)
        squares += np.einsum("ij,ij->i", updates, updates)
        dots += updates @ direction
    return _figures(replies, squares, dots, math.sqrt(aggregate_square), statuses)


def figures_from_gram(
    replies: Sequence[TrainReply],
    gram: np.ndarray,
    coefficients: np.ndarray,
    statuses: Mapping[int, str] | None = None,
) -> list[ClientFigures]:
    """:func:`client_figures` from the updates' Gram matrix, without touching the arrays.

    For a stage whose aggregate update is a linear combination of the
    replies' updates, ``Delta = sum_j c_j Delta_j`` (Krum, Multi-Krum), and
    which already holds ``G = [<Delta_i, Delta_j>]`` (float64):
    ``||Delta_i|| = sqrt(G_ii)``, ``<Delta_i, Delta> = (G c)_i`` and
    ``||Delta||^2 = c^T G c``.

    Parameters
    ----------
    replies : sequence of TrainReply
        The valid replies, in the order of ``gram``'s rows.
    gram : ndarray
        ``(n, n)`` Gram matrix of their updates.
    coefficients : ndarray
        ``(n,)`` weight of each reply's update in the aggregate (0 if excluded).
    statuses : mapping of node id to str, optional
        As for :func:`client_figures`.
    """
    dots = gram @ coefficients
    aggregate_norm = math.sqrt(max(float(coefficients @ dots), 0.0))
    return _figures(replies, np.maximum(np.diag(gram), 0.0), dots, aggregate_norm, statuses)


def _figures(
    replies: Sequence[TrainReply],
    squares: np.ndarray,
    dots: np.ndarray,
    aggregate_norm: float,
    statuses: Mapping[int, str] | None,
) -> list[ClientFigures]:
    """Each reply's norm ``sqrt(squares_i)`` and cosine ``dots_i / (norm_i |Delta|)``."""
    statuses = statuses or {}
    figures = []
    for index, reply in enumerate(replies):
        norm = math.sqrt(squares[index])
        denominator = norm * aggregate_norm
        cosine = float(dots[index] / denominator) if denominator > 0 else 0.0
        figures.append(
            ClientFigures(reply.node_id, norm, cosine, statuses.get(reply.node_id, "used"))
        )
    return figures


def summary_line(figures: Sequence[ClientFigures]) -> str:
    """A short text for the progress line: the largest norm, the lowest cosine, exclusions."""
    if not figures:
        return ""
    largest = max(figures, key=lambda f: f.norm)
    lowest = min(figures, key=lambda f: f.cosine)
    median = float(np.median([f.norm for f in figures]))
    parts = [f"norm median {median:.3g} max {largest.norm:.3g} (node {largest.node_id})"]
    parts.append(f"min cosine {lowest.cosine:.2f} (node {lowest.node_id})")
    off = [f.node_id for f in figures if f.status != "used"]
    if off:
        parts.append(f"down-weighted {len(off)} ({', '.join(str(n) for n in off[:5])}"
                     f"{', ...' if len(off) > 5 else ''})")
    return "; ".join(parts)
