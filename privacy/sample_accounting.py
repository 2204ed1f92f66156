"""Sample-level privacy of DP-SGD inside one client: steps, epsilon, a persistent ledger.

Local DP-SGD (Abadi et al. 2016, "Deep Learning with Differential
Privacy") protects each *example* of a client's dataset: every step samples
each example independently with probability ``q = batch_size / n`` (Poisson
sampling, :func:`clients.dp_sgd.poisson_batches`), clips each example's
gradient to norm ``C`` and adds ``N(0, (z C)^2)`` noise to the batch sum. One
step is therefore one Poisson-subsampled Gaussian mechanism with noise
multiplier ``z`` under add/remove-one-example DP, and ``T`` steps compose to
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), T)``,
accounted here with dp-accounting's Renyi-DP accountant (Mironov 2017,
"Renyi Differential Privacy"; Mironov, Talwar, Zhang 2019 for the sampled
Gaussian) and converted to ``(epsilon, delta)``.

A client accrues privacy loss only in rounds it actually trains in:
:class:`SamplePrivacyState` keeps one entry per such round, lives in the
node's ``Context.state`` (as a ``ConfigRecord``-compatible dict) and, where
the node has a state folder, in a JSON file that survives restarts. The
server's client sampling is *not* credited (no amplification from it at the
sample level), so the figure is an upper bound for the sample-level guarantee.

This module imports neither TensorFlow nor Flower, so the ServerApp can
project the sample-level epsilon before round 1 cheaply.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import dp_accounting

# dp_accounting (with scipy.signal) takes ~2 s to import: it is imported where an
# epsilon is computed, so that the ClientApp's module loads fast for the clients
# that never run DP-SGD (a deployed SuperNode starts a process per message).

DEFAULT_SAMPLE_DELTA = 1e-5
STATE_KEY = "sample-privacy"
"""Key of the :class:`SamplePrivacyState` record in a node's ``Context.state``."""
STATE_FILE = "sample-privacy.json"
"""File name of the ledger inside a node's state folder."""

# Reply metric keys (kebab-case, as everywhere in the project's metrics).


def sampling_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling probability ``q = min(1, batch_size / n)`` of one DP-SGD step."""
    if num_examples <= 0:
        raise ValueError(f"need at least one example, got {num_examples}")
    if batch_size <= 0:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return min(1.0, batch_size / num_examples)


def expected_batch_size(num_examples: int, batch_size: int) -> int:
    """``q * n = min(batch_size, n)``: the denominator of the DP-SGD average.

    Dividing the noisy sum by the *expected* rather than the drawn batch size
    keeps the batch size, which depends on the data, out of the update.
    """
    return min(batch_size, num_examples)


def num_steps(num_examples: int, batch_size: int, epochs: int) -> int:
    """Steps of ``epochs`` epochs: ``ceil(epochs / q) = ceil(epochs * n / min(B, n))``.

    Shared by the trainer and the accountant so they cannot disagree; zero for
    an empty dataset (nothing is trained, nothing is spent).
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if num_examples <= 0:
        return 0
    per_step = expected_batch_size(num_examples, batch_size)
    return -(-epochs * num_examples // per_step)


@dataclass(frozen=True)
class SampleDPRound:
    """One round of local DP-SGD as the accountant sees it.

    Parameters
    ----------
    num_examples : int
        ``n``, the client's training-set size.
    batch_size : int
        Expected batch size ``B`` (``q = B / n``).
    epochs : int
        Local epochs; the round runs :func:`num_steps` steps.
    noise_multiplier : float
        ``z``: noise stddev over the clipping norm.
    """

    num_examples: int
    batch_size: int
    epochs: int
    noise_multiplier: float

    @property
    def sampling_rate(self) -> float:
        """``q`` of each step."""
        return sampling_rate(self.num_examples, self.batch_size)

    @property
    def steps(self) -> int:
        """Number of DP-SGD steps of the round."""
        return num_steps(self.num_examples, self.batch_size, self.epochs)


def step_event(q: float, noise_multiplier: float) -> dp_accounting.DpEvent:
    """``PoissonSampledDpEvent(q, GaussianDpEvent(z))``: one DP-SGD step."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sampling rate must be in (0, 1], got {q}")
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    import dp_accounting

    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier))


def composed_event(steps: Mapping[tuple[float, float], int]) -> dp_accounting.DpEvent:
    """Composition of ``count`` steps for each ``(q, z)``: the whole local history."""
    import dp_accounting

    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(step_event(q, z), count)
            for (q, z), count in sorted(steps.items())
            if count > 0
        ]
    )


def epsilon_of(event: dp_accounting.DpEvent, delta: float) -> float:
    """``epsilon`` at ``delta`` of ``event`` by the RDP accountant (inf without noise)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def sample_epsilon(
    num_examples: int,
    batch_size: int,
    epochs: int,
    rounds: int,
    noise_multiplier: float,
    delta: float = DEFAULT_SAMPLE_DELTA,
) -> float:
    """Sample-level epsilon of ``rounds`` rounds of local DP-SGD on one client.

    Parameters
    ----------
    num_examples, batch_size, epochs : int
        The client's ``n``, expected batch size and local epochs per round.
    rounds : int
        Rounds the client trains in.
    noise_multiplier : float
        DP-SGD noise multiplier ``z``; 0 gives ``inf``.
    delta : float
        Target delta (should be below ``1 / n``).

    Returns
    -------
    float
        ``epsilon`` by RDP accounting of ``rounds * num_steps(n, B, epochs)``
        Poisson-sampled Gaussian steps (0.0 when nothing is trained).
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    spec = SampleDPRound(num_examples, batch_size, epochs, noise_multiplier)
    total = spec.steps * rounds
    if total == 0:
        return 0.0
    return epsilon_of(composed_event({(spec.sampling_rate, noise_multiplier): total}), delta)


def affordable_rounds(
    num_examples: int,
    batch_size: int,
    epochs: int,
    noise_multiplier: float,
    target_epsilon: float,
    max_rounds: int,
    delta: float = DEFAULT_SAMPLE_DELTA,
) -> int:
    """Most rounds (at most ``max_rounds``) of local DP-SGD within ``target_epsilon``.

    Bisection: :func:`sample_epsilon` does not decrease as rounds are added.
    """
    low, high = 0, max_rounds
    while low < high:
        mid = (low + high + 1) // 2
        epsilon = sample_epsilon(num_examples, batch_size, epochs, mid, noise_multiplier, delta)
        if epsilon <= target_epsilon:
            low = mid
        else:
            high = mid - 1
    return low


@dataclass
class SamplePrivacyState:
    """A client's ledger of the local DP-SGD rounds it took part in.

    Each entry is one round: its sampling rate, noise multiplier and number of
    steps. Entries only ever grow, so of two copies of a node's ledger (the
    in-memory ``Context.state`` and the file) the longer is the newer.

    Parameters
    ----------
    delta : float
        Target delta of the reported epsilon.
    sampling_rates, noise_multipliers : list of float
        Per recorded round.
    steps : list of int
        Per recorded round.
    """

    delta: float = DEFAULT_SAMPLE_DELTA
    sampling_rates: list[float] = field(default_factory=list)
    noise_multipliers: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (len(self.sampling_rates) == len(self.noise_multipliers) == len(self.steps)):
            raise ValueError("sampling_rates, noise_multipliers and steps differ in length")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    @property
    def rounds(self) -> int:
        """Rounds recorded (those the client trained in)."""
        return len(self.steps)

    @property
    def total_steps(self) -> int:
        """DP-SGD steps over all recorded rounds."""
        return sum(self.steps)

    def _counts(self, extra: Iterable[SampleDPRound] = ()) -> Counter[tuple[float, float]]:
        counts: Counter[tuple[float, float]] = Counter()
        for q, z, k in zip(self.sampling_rates, self.noise_multipliers, self.steps):
            counts[(float(q), float(z))] += int(k)
        for spec in extra:
            counts[(spec.sampling_rate, float(spec.noise_multiplier))] += spec.steps
        return counts

    def _epsilon(self, extra: Iterable[SampleDPRound] = ()) -> float:
        counts = self._counts(extra)
        if sum(counts.values()) == 0:
            return 0.0
        return epsilon_of(composed_event(counts), self.delta)

    # The same API as :class:`privacy.accounting.PrivacyLedger` (user level):
    # ``epsilon`` a property; ``epsilon_after``, ``would_exceed`` and
    # ``affordable_rounds`` take the round first, then the target.
    @property
    def epsilon(self) -> float:
        """Cumulative sample-level epsilon of the recorded rounds (0 when none)."""
        return self._epsilon()

    def epsilon_after(self, spec: SampleDPRound, rounds: int = 1) -> float:
        """Epsilon if ``rounds`` more rounds like ``spec`` were trained now."""
        return self._epsilon([spec] * max(rounds, 0))

    def would_exceed(self, spec: SampleDPRound, target_epsilon: float) -> bool:
        """Whether training ``spec`` would take epsilon past ``target_epsilon``.

        A non-positive target means "no target" and never stops training.
        """
        if target_epsilon <= 0:
            return False
        return self.epsilon_after(spec) > target_epsilon

    def affordable_rounds(self, spec: SampleDPRound, target_epsilon: float, max_rounds: int) -> int:
        """Most further rounds like ``spec`` (up to ``max_rounds``) within ``target_epsilon``."""
        low, high = 0, max_rounds
        while low < high:  # epsilon_after does not decrease as rounds are added
            mid = (low + high + 1) // 2
            if self.epsilon_after(spec, mid) <= target_epsilon:
                low = mid
            else:
                high = mid - 1
        return low

    def state_dict(self) -> dict[str, Any]:
        """:meth:`to_dict`, under the name every stateful object of the project uses."""
        return self.to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this ledger's rounds by those of a :meth:`state_dict`."""
        restored = type(self).from_dict(state)
        self.delta = restored.delta
        self.sampling_rates = restored.sampling_rates
        self.noise_multipliers = restored.noise_multipliers
        self.steps = restored.steps

    def record(self, spec: SampleDPRound) -> None:
        """Add a trained round to the ledger (no-op for zero steps)."""
        if spec.steps == 0:
            return
        self.sampling_rates.append(spec.sampling_rate)
        self.noise_multipliers.append(float(spec.noise_multiplier))
        self.steps.append(spec.steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (floats, ints, lists of them): fits a Flower ``ConfigRecord``."""
        return {
            "delta": float(self.delta),
            "sampling-rates": [float(q) for q in self.sampling_rates],
            "noise-multipliers": [float(z) for z in self.noise_multipliers],
            "steps": [int(k) for k in self.steps],
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplePrivacyState:
        """Inverse of :meth:`to_dict` (also accepts a ``ConfigRecord``)."""
        return cls(
            delta=float(values["delta"]),
            sampling_rates=[float(q) for q in values["sampling-rates"]],
            noise_multipliers=[float(z) for z in values["noise-multipliers"]],
            steps=[int(k) for k in values["steps"]],
        )

    def save(self, path: str | Path) -> None:
        """Write the ledger as JSON, atomically (a crash leaves the old file intact)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.to_dict(), handle, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path, *, delta: float = DEFAULT_SAMPLE_DELTA) -> SamplePrivacyState:
        """Read a ledger written by :meth:`save`; a new one when the file does not exist."""
        path = Path(path)
        if not path.exists():
            return cls(delta=delta)
        with path.open(encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))


def newest(*states: SamplePrivacyState | None) -> SamplePrivacyState | None:
    """The copy with the most recorded rounds (ledgers only grow); ``None`` if all are."""
    present = [s for s in states if s is not None]
    if not present:
        return None
    return max(present, key=lambda s: (s.rounds, s.total_steps))
