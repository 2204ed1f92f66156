"""What a client puts into the secure sum, and what the server reads out of it.

The shared arrays' update ``Delta = local - global`` (keys in sorted order,
flattened) becomes one integer vector; a few exact integer coordinates follow:

* ``weighted`` (FedAvg): ``(w / W) Delta`` quantised, then the capped example
  count ``w = min(num-examples, W)`` and the number of clamped coordinates.
  The server divides the sum by the summed weights: example-weighted FedAvg
  without learning any client's weight.
* ``clipped`` (DP-FedAvg, server noise): ``Delta`` clipped in L2 to
  ``C - sqrt(d) * step`` (so that stochastic rounding cannot take it above
  ``C``), quantised with range ``C``, then the clip bit (1 when unclipped).
* ``distributed-noise`` (DP-FedAvg, Kairouz, Liu, Steinke 2021): ``Delta``
  clipped to ``C``, scaled by ``s``, conditionally rounded to L2 norm at most
  the norm bound, plus the client's discrete Gaussian noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .masking import dequantize, quantization_step, quantize

WEIGHTED = "weighted"
CLIPPED = "clipped"
DISTRIBUTED = "distributed-noise"
VECTOR_KINDS = (WEIGHTED, CLIPPED, DISTRIBUTED)
#: Exact integer coordinates after the update, per kind.
EXTRA_COORDINATES = {WEIGHTED: 2, CLIPPED: 1, DISTRIBUTED: 0}


@dataclass(frozen=True)
class VectorSpec:
    """How one round's vectors are encoded (sent to every client in the round's config).

    ``clipping_range`` is the per-coordinate range (``weighted``) or the L2
    clipping norm ``C`` (``clipped``, ``distributed-noise``).
    """

    kind: str
    clipping_range: float
    quantization_bits: int
    modulus_bits: int
    max_weight: int = 1
    scale: float = 0.0
    norm_bound: float = 0.0
    local_noise_stddev: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in VECTOR_KINDS:
            raise ValueError(f"vector kind must be one of {VECTOR_KINDS}, got {self.kind!r}")
        if not math.isfinite(self.clipping_range) or self.clipping_range <= 0:
            raise ValueError(f"clipping range must be > 0, got {self.clipping_range}")
        if self.kind == DISTRIBUTED and (self.scale <= 0 or self.norm_bound <= 0):
            raise ValueError("distributed noise needs a positive scale and norm bound")

    def length(self, num_parameters: int) -> int:
        """Coordinates of the vector for a model of ``num_parameters`` shared values."""
        return num_parameters + EXTRA_COORDINATES[self.kind]

    def as_dict(self) -> dict[str, float | int | str]:
        """JSON- and ConfigRecord-ready."""
        return asdict(self)


def flatten(arrays: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    """The arrays' values in ``keys`` order, as one float64 vector."""
    return np.concatenate([np.asarray(arrays[key], np.float64).ravel() for key in keys])


def unflatten(vector: np.ndarray, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split a flat vector back into ``reference``'s arrays (sorted keys, their shapes)."""
    out: dict[str, np.ndarray] = {}
    start = 0
    for key in sorted(reference):
        size = int(np.asarray(reference[key]).size)
        out[key] = vector[start : start + size].reshape(np.shape(reference[key]))
        start += size
    if start != vector.size:
        raise ValueError(f"vector has {vector.size} values, the arrays {start}")
    return out


def _clip_l2(values: np.ndarray, bound: float) -> tuple[np.ndarray, bool]:
    norm = float(np.linalg.norm(values))
    if norm <= bound:
        return values, True
    return values * (bound / norm), False


def clip_margin(spec: VectorSpec, num_parameters: int) -> float:
    """``sqrt(d) * step``: what stochastic rounding can add to an update's norm (``clipped``)."""
    return math.sqrt(num_parameters) * quantization_step(
        spec.clipping_range, spec.quantization_bits
    )


def encode(
    update: np.ndarray, num_examples: int, spec: VectorSpec, rng: np.random.Generator
) -> np.ndarray:
    """The client's int64 vector for the secure sum (before it enters the ring and is masked).

    Raises
    ------
    ValueError
        If the update holds NaN or Inf (the client must not send it: under
        secure aggregation the server cannot see it).
    """
    if not np.all(np.isfinite(update)):
        raise ValueError("the update holds NaN or Inf")
    if spec.kind == WEIGHTED:
        weight = min(int(num_examples), spec.max_weight)
        body, clamped = quantize(
            update * (weight / spec.max_weight), spec.clipping_range, spec.quantization_bits, rng
        )
        cap = 1 << (spec.quantization_bits - 1)
        return np.concatenate([body, np.array([weight, min(clamped, cap)], np.int64)])
    if spec.kind == CLIPPED:
        bound = spec.clipping_range - clip_margin(spec, update.size)
        if bound <= 0:
            raise ValueError("quantisation too coarse for this clipping norm and model size")
        clipped, unclipped = _clip_l2(update, bound)
        body, _ = quantize(clipped, spec.clipping_range, spec.quantization_bits, rng)
        return np.concatenate([body, np.array([int(unclipped)], np.int64)])
    # pylint: disable-next=import-outside-toplevel
    from privacy.distributed_noise import conditional_randomized_round, sample_discrete_gaussian

    clipped, _ = _clip_l2(update, spec.clipping_range)
    rounded = conditional_randomized_round(clipped * spec.scale, spec.norm_bound, rng)
    return rounded + sample_discrete_gaussian(spec.local_noise_stddev, rounded.size, rng)


@dataclass
class DecodedSum:
    """The server's reading of the unmasked sum."""

    update_sum: np.ndarray
    weight_total: int | None = None
    num_clamped: int | None = None
    num_unclipped: int | None = None


def decode(total: np.ndarray, spec: VectorSpec, num_parameters: int) -> DecodedSum:
    """Split the decoded integer sum into the float64 update sum and the exact counts."""
    body = total[:num_parameters]
    if spec.kind == DISTRIBUTED:
        return DecodedSum(body.astype(np.float64) / spec.scale)
    update_sum = dequantize(body, spec.clipping_range, spec.quantization_bits)
    if spec.kind == WEIGHTED:
        return DecodedSum(update_sum, int(total[num_parameters]), int(total[num_parameters + 1]))
    return DecodedSum(update_sum, num_unclipped=int(total[num_parameters]))


def rounding_bound(spec: VectorSpec, num_clients: int) -> float:
    """Most any coordinate of the decoded update sum can differ from the exact sum.

    Stochastic rounding moves each client's coordinate by less than one step;
    nothing else is lost while no coordinate is clamped and the sum does not
    wrap. (``weighted``: the sum is of ``(w / W) Delta``.)
    """
    if spec.kind == DISTRIBUTED:
        return num_clients / spec.scale
    return num_clients * quantization_step(spec.clipping_range, spec.quantization_bits)
