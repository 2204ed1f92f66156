"""Randomness that protects privacy: fresh OS entropy, never a user seed, never saved.

Every privacy-relevant draw (DP noise, DP client sampling, adaptive clipping's
count noise, local-DP noise, DP-SGD's batches and noise) comes from a
generator made here. A secure source hands out a generator freshly seeded with
128 bits from the operating system (``np.random.SeedSequence()`` reads
:mod:`secrets`) on every call, so no state exists to write to a checkpoint,
and a resumed or repeated run cannot replay a release's noise. numpy's PCG64
is not a cryptographic generator; reseeding each release from the OS bounds
what an observer could learn from one release's noise to that release.

The only way to reproduce DP noise is :class:`InsecureSeed`, for tests and
debugging: a run that uses it is stamped NOT PRIVATE in its outputs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

#: What outputs of a run with a replayable DP seed are stamped with.
NOT_PRIVATE = "NOT PRIVATE"


def secure_generator() -> np.random.Generator:
    """A numpy Generator seeded with fresh OS entropy (128 bits), never from a user seed."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence()))


class RandomSource(Protocol):
    """Where a mechanism gets the generator for its next privacy-relevant draw."""

    #: False when the draws can be replayed (the guarantee does not hold).
    private: bool

    def generator(self) -> np.random.Generator:
        """The generator for the next draw."""


class SecureRandom:
    """Fresh OS entropy for every draw: the source of every real DP run."""

    private = True

    def generator(self) -> np.random.Generator:
        """A newly seeded generator (:func:`secure_generator`)."""
        return secure_generator()

    def __repr__(self) -> str:
        return "SecureRandom()"


class InsecureSeed:
    """A seeded, replayable source: for tests only. The guarantee does NOT hold.

    Anyone who knows the seed regenerates the noise and subtracts it from the
    release. Runs that use it (run-config ``insecure-dp-seed``) are stamped
    :data:`NOT_PRIVATE`.
    """

    private = False

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)

    def generator(self) -> np.random.Generator:
        """The one seeded generator (draws continue its stream)."""
        return self._rng

    def __repr__(self) -> str:
        return f"InsecureSeed({self.seed})"


def random_source(insecure_seed: int | None = None) -> RandomSource:
    """:class:`SecureRandom`, or :class:`InsecureSeed` when a test seed is given."""
    return SecureRandom() if insecure_seed is None else InsecureSeed(insecure_seed)
