"""The public parameters of SecAgg+ and the neighbour graph of a round.

Bonawitz et al. (2017), "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", https://eprint.iacr.org/2017/281 (every pair of clients
masks: ``neighbours = 0``), and Bell et al. (2020), "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", https://eprint.iacr.org/2020/704
(SecAgg+: each client masks with and shares its keys among ``k`` neighbours of
a random ``k``-regular graph).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Defaults, documented in the README's secure-aggregation section.
DEFAULT_THRESHOLD = 0.6
DEFAULT_NEIGHBOURS = 0
DEFAULT_CLIPPING_RANGE = 1.0
DEFAULT_QUANTIZATION_BITS = 22
DEFAULT_MODULUS_BITS = 32
DEFAULT_MAX_WEIGHT = 10_000


class SecAggError(ValueError):
    """Parameters that cannot give a correct or secure sum."""


@dataclass(frozen=True)
class SecAggParameters:
    """What every party of a SecAgg+ round agrees on.

    Attributes
    ----------
    threshold : float
        Fraction in (0.5, 1] of a client's neighbourhood (its neighbours and
        itself) whose shares rebuild its secrets; a round whose survivors fall
        below it is voided. Above one half, so a server cannot assemble both
        secrets of one client from two disjoint groups.
    neighbours : int
        0: every pair of clients masks (SecAgg). An even ``k >= 2``: SecAgg+,
        each client masks with ``k`` neighbours on a ring over a secret random
        permutation of the round's clients (the full graph when ``k >= n - 1``).
    clipping_range : float
        Without DP, every coordinate of a weighted update is clamped to
        ``[-range, range]`` before quantisation (DP runs use the clipping norm).
    quantization_bits : int
        ``[-range, range]`` maps to the integers ``[-2^(b-1), 2^(b-1)]``.
    modulus_bits : int
        Masks and sums live in the integers modulo ``2^modulus_bits``.
    max_weight : int
        FedAvg's example weights are capped at this many examples (weights
        are summed exactly as integers inside the secure sum).
    """

    threshold: float = DEFAULT_THRESHOLD
    neighbours: int = DEFAULT_NEIGHBOURS
    clipping_range: float = DEFAULT_CLIPPING_RANGE
    quantization_bits: int = DEFAULT_QUANTIZATION_BITS
    modulus_bits: int = DEFAULT_MODULUS_BITS
    max_weight: int = DEFAULT_MAX_WEIGHT

    def __post_init__(self) -> None:
        if not 0.5 < self.threshold <= 1.0:
            raise SecAggError(f"secagg-threshold must be in (0.5, 1], got {self.threshold}")
        if self.neighbours < 0 or self.neighbours % 2:
            raise SecAggError(
                f"secagg-neighbours must be 0 (every pair) or an even number >= 2, "
                f"got {self.neighbours}"
            )
        if not math.isfinite(self.clipping_range) or self.clipping_range <= 0:
            raise SecAggError(f"secagg-clipping-range must be > 0, got {self.clipping_range}")
        if not 2 <= self.quantization_bits <= 40:
            raise SecAggError(
                f"secagg-quantization-bits must be in [2, 40], got {self.quantization_bits}"
            )
        if not self.quantization_bits + 1 < self.modulus_bits <= 63:
            raise SecAggError(
                f"secagg-modulus-bits must be in ({self.quantization_bits + 1}, 63] "
                f"(above secagg-quantization-bits + 1), got {self.modulus_bits}"
            )
        if self.max_weight < 1:
            raise SecAggError(f"secagg-max-weight must be >= 1, got {self.max_weight}")

    @property
    def modulus(self) -> int:
        """``M = 2^modulus_bits``."""
        return 1 << self.modulus_bits

    @property
    def half_range(self) -> int:
        """The integer a coordinate at the clipping range maps to: ``2^(b-1)``."""
        return 1 << (self.quantization_bits - 1)

    def max_clients(self, per_client_bound: int | None = None) -> int:
        """Most clients whose sum of values within ``+-per_client_bound`` cannot wrap.

        A signed sum is decoded correctly while ``|sum| < M / 2``.
        """
        bound = max(self.half_range + 1, self.max_weight) if per_client_bound is None else (
            per_client_bound
        )
        return (self.modulus // 2 - 1) // max(bound, 1)

    def threshold_of(self, neighbourhood_size: int) -> int:
        """Shares needed to rebuild a secret shared among ``neighbourhood_size`` holders."""
        return min(neighbourhood_size, max(2, math.ceil(self.threshold * neighbourhood_size)))

    def as_config(self) -> dict[str, float | int]:
        """The kebab-case run-config view (``metrics.json``)."""
        return {
            "secagg-threshold": self.threshold,
            "secagg-neighbours": self.neighbours,
            "secagg-clipping-range": self.clipping_range,
            "secagg-quantization-bits": self.quantization_bits,
            "secagg-modulus-bits": self.modulus_bits,
            "secagg-max-weight": self.max_weight,
        }


def neighbour_graph(
    node_ids: Sequence[int], neighbours: int, rng: np.random.Generator
) -> dict[int, list[int]]:
    """Each node's neighbours (itself excluded): every other node, or a ring of ``k``.

    SecAgg+'s graph: the nodes in a random order on a ring, each joined to the
    ``k / 2`` nodes on either side (a Harary graph); ``rng`` must be secret
    randomness, or the server could steer which clients share keys.
    """
    nodes = [int(node) for node in node_ids]
    n = len(nodes)
    if neighbours == 0 or neighbours >= n - 1:
        return {node: [other for other in nodes if other != node] for node in nodes}
    order = [nodes[i] for i in rng.permutation(n)]
    half = neighbours // 2
    graph: dict[int, list[int]] = {}
    for position, node in enumerate(order):
        near = {order[(position + step) % n] for step in range(-half, half + 1) if step}
        graph[node] = sorted(near)
    return graph
