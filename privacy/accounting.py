"""Privacy accounting for DP-FedAvg: per-round DP events, an epsilon ledger, calibration.

Every round of DP-FedAvg is one subsampled Gaussian mechanism on the clients
(user-level DP): the sampled clients' clipped updates are summed and Gaussian
noise is added. Which neighbouring relation the guarantee is stated in follows
from how clients are sampled, and is the one dp-accounting 0.6 supports for
that sampling:

* ``poisson`` (each client joins independently with probability ``q``):
  add/remove-one-client DP, ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``,
  RDP (Mironov, Talwar, Zhang 2019) and, optionally, PLD accounting.
* ``fixed`` (exactly ``m`` of ``N`` clients without replacement): replace-one-
  client DP, ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``
  with RDP (Wang, Balle, Kasiviswanathan 2019, Thm. 27).

Why ``z / 2`` for ``fixed``: replacing one client's update by another, both of
norm at most ``C``, moves the sum by up to ``2C``, so relative to the
replace-one sensitivity the noise ``z * C`` is a multiplier of ``z / 2``.
dp-accounting's RDP accountant takes the noise multiplier relative to the
sensitivity of the relation in use (its ``GaussianDpEvent`` gives
``alpha / (2 sigma^2)`` under ``REPLACE_ONE`` as under ``ADD_OR_REMOVE_ONE``),
whereas its PLD accountant doubles the shift itself for ``REPLACE_ONE``; passing
``z`` unhalved to the RDP accountant would understate epsilon.
(tensorflow-privacy halves its multiplier for the same reason when
microbatches are used.)

Adaptive clipping releases a second Gaussian query (the unclipped count) in
the same round on the same sample; the round's effective multiplier
``(z_Delta^-2 + (2 sigma_b)^-2)^(-1/2)`` equals the configured ``z`` by
construction (:func:`privacy.adaptive_clipping.split_noise_multiplier`), and
:func:`round_event` composes the components exactly that way.

Delta: ``target_delta`` defaults to 1e-5, independent of the population so
that runs are comparable; it should be well below ``1/N`` (the ledger's user
warns when it is not, i.e. for more than 1e5 clients).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import dp_accounting
import numpy as np
from dp_accounting import NeighboringRelation
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from scipy.optimize import brentq

Sampling = Literal["poisson", "fixed"]
SAMPLING_SCHEMES: tuple[str, ...] = ("poisson", "fixed")
DEFAULT_TARGET_DELTA = 1e-5


def neighboring_relation(sampling: Sampling) -> NeighboringRelation:
    """Add/remove-one for Poisson sampling, replace-one for fixed-size sampling."""
    if sampling == "poisson":
        return NeighboringRelation.ADD_OR_REMOVE_ONE
    if sampling == "fixed":
        return NeighboringRelation.REPLACE_ONE
    raise ValueError(f"client-sampling must be one of {SAMPLING_SCHEMES}, got {sampling!r}")


def effective_noise_multiplier(noise_multipliers: Sequence[float]) -> float:
    """One Gaussian equivalent to several on the same data: ``(sum z_i^-2)^(-1/2)``.

    A zero multiplier (a query released without noise) makes the whole round
    non-private, returned as 0.
    """
    if not noise_multipliers:
        raise ValueError("need at least one noise multiplier")
    if any(z < 0 for z in noise_multipliers):
        raise ValueError(f"noise multipliers must be non-negative, got {noise_multipliers}")
    if any(z == 0 for z in noise_multipliers):
        return 0.0
    if any(math.isinf(z) for z in noise_multipliers):
        finite = [z for z in noise_multipliers if not math.isinf(z)]
        return effective_noise_multiplier(finite) if finite else math.inf
    return sum(z**-2 for z in noise_multipliers) ** -0.5


def fixed_sample_size(num_nodes: int, fraction: float, min_nodes: int = 1) -> int:
    """``round(q * N)`` nodes (half up), at least ``min_nodes``, at most ``N``."""
    if num_nodes <= 0:
        raise ValueError(f"need at least one node, got {num_nodes}")
    return min(num_nodes, max(min_nodes, 1, math.floor(fraction * num_nodes + 0.5)))


def round_event(
    sampling: Sampling,
    noise_multipliers: float | Sequence[float],
    *,
    sampling_rate: float | None = None,
    num_nodes: int | None = None,
    sample_size: int | None = None,
) -> dp_accounting.DpEvent:
    """The DP event of one DP-FedAvg round.

    Parameters
    ----------
    sampling : {"poisson", "fixed"}
        How the round's clients were drawn.
    noise_multipliers : float or sequence of float
        Noise stddev over the per-client bound of every query released on the
        round's sample: ``z`` for plain DP-FedAvg; ``(z_Delta, 2 sigma_b)`` with
        adaptive clipping (update sum with bound ``C``, centred count with bound
        1/2).
    sampling_rate : float
        ``q``, required for ``poisson``.
    num_nodes, sample_size : int
        ``N`` and ``m``, required for ``fixed``.

    Returns
    -------
    dp_accounting.DpEvent
        ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` or
        ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`` (see
        the module docstring for the halving); ``NonPrivateDpEvent`` when any
        query had no noise.
    """
    if isinstance(noise_multipliers, (int, float)):
        noise_multipliers = [float(noise_multipliers)]
    z = effective_noise_multiplier(list(noise_multipliers))
    if z == 0.0:
        return dp_accounting.NonPrivateDpEvent()
    if sampling == "poisson":
        if sampling_rate is None or not 0.0 < sampling_rate <= 1.0:
            raise ValueError(f"Poisson sampling needs a rate in (0, 1], got {sampling_rate}")
        return dp_accounting.PoissonSampledDpEvent(
            sampling_probability=float(sampling_rate),
            event=dp_accounting.GaussianDpEvent(z),
        )
    if sampling == "fixed":
        if num_nodes is None or sample_size is None or not 0 < sample_size <= num_nodes:
            raise ValueError(
                f"fixed-size sampling needs 0 < sample_size <= num_nodes, got "
                f"{sample_size} of {num_nodes}"
            )
        return dp_accounting.SampledWithoutReplacementDpEvent(
            source_dataset_size=int(num_nodes),
            sample_size=int(sample_size),
            event=dp_accounting.GaussianDpEvent(z / 2.0),
        )
    raise ValueError(f"client-sampling must be one of {SAMPLING_SCHEMES}, got {sampling!r}")


class PrivacyLedger:
    """Running (epsilon, delta) of a DP-FedAvg run, one composed event per round.

    RDP (dp-accounting's ``RdpAccountant`` RDP of each distinct event at its
    default orders, summed over rounds, converted with its ``compute_epsilon``)
    gives ``epsilon``, a valid upper bound that never decreases as
    rounds are added. For Poisson sampling a PLD accountant can give the
    tighter ``epsilon_pld`` as well (dp-accounting 0.6 has no PLD for sampling
    without replacement).

    Parameters
    ----------
    sampling : {"poisson", "fixed"}
        Fixes the neighbouring relation of every round.
    target_delta : float (default: 1e-5)
        The delta epsilon is reported at.
    compute_pld : bool (default: True)
        Also keep PLD epsilon (Poisson only; about 0.5 s per query).
    """

    def __init__(
        self,
        sampling: Sampling,
        target_delta: float = DEFAULT_TARGET_DELTA,
        *,
        compute_pld: bool = True,
    ) -> None:
        if not 0.0 < target_delta < 1.0:
            raise ValueError(f"target delta must be in (0, 1), got {target_delta}")
        self.sampling = sampling
        self.relation = neighboring_relation(sampling)
        self.target_delta = target_delta
        self.compute_pld = compute_pld and sampling == "poisson"
        self._orders = np.asarray(RdpAccountant().orders, dtype=np.float64)
        self._rdp = np.zeros_like(self._orders)
        self._rdp_of_event: dict[dp_accounting.DpEvent, np.ndarray] = {}
        self._events: list[dp_accounting.DpEvent] = []
        self._pld_cache: tuple[int, float] | None = None

    @property
    def rounds(self) -> int:
        """Rounds composed so far."""
        return len(self._events)

    @property
    def events(self) -> list[dp_accounting.DpEvent]:
        """The composed events, in order."""
        return list(self._events)

    def event_rdp(self, event: dp_accounting.DpEvent) -> np.ndarray:
        """RDP of one ``event`` at the accountant's orders (computed once per distinct event)."""
        rdp = self._rdp_of_event.get(event)
        if rdp is None:
            accountant = RdpAccountant(orders=self._orders, neighboring_relation=self.relation)
            if not accountant.supports(event):
                raise ValueError(f"event {event} is not supported under {self.relation}")
            rdp = accountant.compose(event).rdp
            self._rdp_of_event[event] = rdp
        return rdp

    def compose(self, event: dp_accounting.DpEvent) -> None:
        """Add one released round to the ledger (RDP adds up over rounds)."""
        self._rdp = self._rdp + self.event_rdp(event)
        self._events.append(event)

    @property
    def epsilon(self) -> float:
        """RDP epsilon at ``target_delta`` of all rounds so far (0 before any)."""
        if not self._events:
            return 0.0
        return float(compute_epsilon(self._orders, self._rdp, self.target_delta)[0])

    @property
    def epsilon_pld(self) -> float | None:
        """PLD epsilon at ``target_delta`` (Poisson sampling only, else ``None``)."""
        if not self.compute_pld:
            return None
        if not self._events:
            return 0.0
        if self._pld_cache is None or self._pld_cache[0] != len(self._events):
            accountant = PLDAccountant(neighboring_relation=self.relation)
            for event, count in Counter(self._events).items():
                accountant.compose(event, count)
            self._pld_cache = (len(self._events), float(accountant.get_epsilon(self.target_delta)))
        return self._pld_cache[1]

    def epsilon_after(self, event: dp_accounting.DpEvent, rounds: int = 1) -> float:
        """RDP epsilon if ``rounds`` more rounds of ``event`` were composed."""
        if rounds <= 0:
            return self.epsilon
        rdp = self._rdp + rounds * self.event_rdp(event)
        return float(compute_epsilon(self._orders, rdp, self.target_delta)[0])

    def would_exceed(self, event: dp_accounting.DpEvent, target_epsilon: float) -> bool:
        """Whether releasing one more round of ``event`` would take epsilon above the target."""
        return self.epsilon_after(event, 1) > target_epsilon

    def affordable_rounds(
        self, event: dp_accounting.DpEvent, target_epsilon: float, max_rounds: int
    ) -> int:
        """Most further rounds of ``event`` (up to ``max_rounds``) within ``target_epsilon``."""
        lo, hi = 0, max_rounds
        if self.epsilon_after(event, hi) <= target_epsilon:
            return hi
        while hi - lo > 1:  # epsilon_after is non-decreasing in rounds
            mid = (lo + hi) // 2
            if self.epsilon_after(event, mid) <= target_epsilon:
                lo = mid
            else:
                hi = mid
        return lo


def projected_epsilon(
    sampling: Sampling,
    noise_multiplier: float,
    num_rounds: int,
    target_delta: float = DEFAULT_TARGET_DELTA,
    *,
    sampling_rate: float | None = None,
    num_nodes: int | None = None,
    sample_size: int | None = None,
) -> float:
    """RDP epsilon of ``num_rounds`` identical rounds (what a run will spend)."""
    event = round_event(
        sampling,
        noise_multiplier,
        sampling_rate=sampling_rate,
        num_nodes=num_nodes,
        sample_size=sample_size,
    )
    return PrivacyLedger(sampling, target_delta, compute_pld=False).epsilon_after(event, num_rounds)


def calibrate_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    num_rounds: int,
    sampling_rate: float,
    sampling: Sampling = "poisson",
    num_nodes: int | None = None,
    tol: float = 1e-4,
) -> float:
    """Smallest noise multiplier whose ``num_rounds``-round RDP epsilon is within target.

    Parameters
    ----------
    target_epsilon, target_delta : float
        The budget for the whole run.
    num_rounds : int
        Rounds the run will have.
    sampling_rate : float
        ``q`` (fraction-train). For ``fixed`` the sample is
        ``m = round(q * num_nodes)`` and the rate ``m / N``.
    sampling : {"poisson", "fixed"}
        The client sampling of the run.
    num_nodes : int | None
        ``N``, required for ``fixed``.
    tol : float (default: 1e-4)
        Tolerance on ``z``; the returned value is rounded up so that the
        epsilon it gives is at most ``target_epsilon``.

    Returns
    -------
    float
        The noise multiplier ``z`` (with adaptive clipping, the *total* one,
        which the strategy splits between the update and the count).
    """
    if target_epsilon <= 0 or num_rounds <= 0:
        raise ValueError("target epsilon and number of rounds must be positive")
    sample_size = None
    if sampling == "fixed":
        if num_nodes is None:
            raise ValueError("fixed-size sampling needs num_nodes")
        sample_size = fixed_sample_size(num_nodes, sampling_rate)

    @functools.cache
    def eps(z: float) -> float:
        return projected_epsilon(
            sampling,
            z,
            num_rounds,
            target_delta,
            sampling_rate=sampling_rate,
            num_nodes=num_nodes,
            sample_size=sample_size,
        )

    lo: float | None = None
    hi = 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon}")
    if lo is None:
        lo = hi / 2.0
        while eps(lo) <= target_epsilon:
            hi, lo = lo, lo / 2.0
            if lo < 1e-3:
                return hi
    # eps is non-increasing in z and eps(hi) <= target < eps(lo): Brent's method,
    # then step up until the budget holds (the root is only known to within tol).
    z = float(brentq(lambda x: eps(x) - target_epsilon, lo, hi, xtol=tol / 2))
    while eps(z) > target_epsilon:
        z += tol / 2
    return z


def local_dp_epsilon(
    noise_multiplier: float, num_rounds: int, target_delta: float = DEFAULT_TARGET_DELTA
) -> float:
    """RDP epsilon of ``num_rounds`` local Gaussian releases by one client.

    ``noise_multiplier`` is the local noise stddev over the local sensitivity
    (``sigma / (2 C)``, see :mod:`privacy.local_dp`). No amplification by
    sampling is claimed (the server knows who was sampled) and every round is
    counted, whether or not the client took part: an upper bound.
    """
    if noise_multiplier <= 0:
        return math.inf
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), num_rounds)
    return float(accountant.get_epsilon(target_delta))


def delta_warning(target_delta: float, num_nodes: int) -> str | None:
    """A message when ``delta >= 1/N`` (delta should be much smaller than 1/N)."""
    if num_nodes > 0 and target_delta >= 1.0 / num_nodes:
        return (
            f"target-delta {target_delta:g} is not below 1/N = {1.0 / num_nodes:g}; "
            f"choose one below {np.float64(num_nodes) ** -1.1:.3g} (N^-1.1)"
        )
    return None
