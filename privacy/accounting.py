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
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import dp_accounting
import numpy as np
from dp_accounting import NeighboringRelation
from dp_accounting.pld import PLDAccountant, privacy_loss_distribution
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


class LedgerStateError(ValueError):
    """A saved ledger or privacy event that cannot be restored; the message says why."""


# Flower's logger by name: the same handler as the rest of the app, without importing flwr.
_LOGGER = logging.getLogger("flwr")


def dp_event_to_json(event: Any) -> dict[str, Any]:
    """A ``dp_accounting`` event as a JSON dict ``{"type": <class name>, <fields>...}``."""
    import attr  # pylint: disable=import-outside-toplevel
    from dp_accounting import dp_event  # pylint: disable=import-outside-toplevel

    if not isinstance(event, dp_event.DpEvent) or not attr.has(type(event)):
        raise TypeError(f"not a dp_accounting event: {event!r}")

    def encode(value: Any) -> Any:
        if isinstance(value, dp_event.DpEvent):
            return dp_event_to_json(value)
        if isinstance(value, (list, tuple)):
            return [encode(item) for item in value]
        if isinstance(value, (np.floating, np.integer)):
            return value.item()
        return value

    out: dict[str, Any] = {"type": type(event).__name__}
    for attribute in attr.fields(type(event)):
        out[attribute.name] = encode(getattr(event, attribute.name))
    return out


def dp_event_from_json(data: Mapping[str, Any]) -> dp_accounting.DpEvent:
    """The event of :func:`dp_event_to_json`; only ``dp_accounting.dp_event`` classes.

    Raises
    ------
    LedgerStateError
        If the type is not a ``dp_accounting`` event or a field is wrong.
    """
    from dp_accounting import dp_event  # pylint: disable=import-outside-toplevel

    name = data.get("type")
    cls = getattr(dp_event, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)):
        raise LedgerStateError(f"unknown privacy event type {name!r}")

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            return dp_event_from_json(value)
        if isinstance(value, list):
            return [decode(item) for item in value]
        return value

    fields = {key: decode(value) for key, value in data.items() if key != "type"}
    try:
        return cls(**fields)
    except TypeError as error:
        raise LedgerStateError(f"malformed {name}: {error}") from error


#: ``PLDAccountant``'s default value discretisation, which the cached path reproduces.
PLD_DISCRETIZATION = 1e-4


def _is_poisson_gaussian(event: dp_accounting.DpEvent) -> bool:
    """A Poisson-subsampled Gaussian with noise and a positive rate (every DP-FedAvg round)."""
    return (
        isinstance(event, dp_accounting.PoissonSampledDpEvent)
        and isinstance(event.event, dp_accounting.GaussianDpEvent)
        and event.sampling_probability > 0
        and event.event.noise_multiplier > 0
    )


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
        self._pld_of_event: dict[dp_accounting.DpEvent, Any] = {}

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
            counts = Counter(self._events)
            if all(_is_poisson_gaussian(event) for event in counts):
                epsilon = self._pld_epsilon(counts)
            else:
                accountant = PLDAccountant(neighboring_relation=self.relation)
                for event, count in counts.items():
                    accountant.compose(event, count)
                epsilon = float(accountant.get_epsilon(self.target_delta))
            self._pld_cache = (len(self._events), epsilon)
        return self._pld_cache[1]

    def _pld_epsilon(self, counts: Mapping[dp_accounting.DpEvent, int]) -> float:
        """PLDAccountant's epsilon (to float rounding), with each event's own PLD built once.

        Building the PLD of a Poisson-subsampled Gaussian costs about 0.4 s;
        ``PLDAccountant`` rebuilds it on every call, so a per-round figure cost
        that much every round. Here it is kept per distinct event and only
        ``self_compose(count)`` and the composition are redone, exactly as
        ``PLDAccountant._maybe_compose`` does them (same discretisation, same
        relation); ``tests/test_dp_accounting.py`` checks it against the
        accountant composing round by round (equal to 1e-9 relative).
        """
        pld = privacy_loss_distribution.identity(value_discretization_interval=PLD_DISCRETIZATION)
        for event, count in counts.items():
            base = self._pld_of_event.get(event)
            if base is None:
                base = privacy_loss_distribution.from_gaussian_mechanism(
                    standard_deviation=event.event.noise_multiplier,
                    value_discretization_interval=PLD_DISCRETIZATION,
                    sampling_prob=event.sampling_probability,
                    neighboring_relation=self.relation,
                )
                self._pld_of_event[event] = base
            pld = pld.compose(base.self_compose(count))
        return float(pld.get_epsilon_for_delta(self.target_delta))

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

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The ledger as JSON-ready values: sampling, delta, rounds, epsilon, events."""
        epsilon = self.epsilon
        return {
            "sampling": self.sampling,
            "target-delta": self.target_delta,
            "rounds": self.rounds,
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "events": [dp_event_to_json(event) for event in self._events],
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Compose the events of a :meth:`state_dict` into this (empty) ledger.

        Raises
        ------
        LedgerStateError
            If this ledger already holds rounds (a round would be counted
            twice), the saved one is of another sampling scheme, lists a
            different number of events than rounds, or its events give another
            epsilon than it recorded.
        """
        if self.rounds:
            raise LedgerStateError(
                f"the privacy ledger already holds {self.rounds} rounds; restore into a fresh "
                "ledger so that no round is counted twice"
            )
        if saved["sampling"] != self.sampling:
            raise LedgerStateError(
                f"saved privacy ledger is for {saved['sampling']!r} sampling, this run uses "
                f"{self.sampling!r}"
            )
        same_delta = math.isclose(float(saved["target-delta"]), self.target_delta, rel_tol=1e-12)
        if not same_delta:
            _LOGGER.warning(
                "Resuming with target-delta %g (the saved ledger reported epsilon at %g)",
                self.target_delta,
                saved["target-delta"],
            )
        events = [dp_event_from_json(item) for item in saved["events"]]
        if len(events) != saved["rounds"]:
            raise LedgerStateError(f"ledger lists {len(events)} events for {saved['rounds']} rounds")
        for event in events:
            self.compose(event)
        if same_delta:
            recorded = saved.get("epsilon")
            saved_epsilon = math.inf if recorded is None else float(recorded)
            if not (
                math.isclose(self.epsilon, saved_epsilon, rel_tol=1e-9, abs_tol=1e-12)
                or (math.isinf(saved_epsilon) and math.isinf(self.epsilon))
            ):
                raise LedgerStateError(
                    f"restored ledger gives epsilon {self.epsilon!r}, the saved one recorded "
                    f"{saved_epsilon!r}"
                )

    def charge_released(
        self, rounds: int, journal: Sequence[Mapping[str, Any]] | None = None
    ) -> None:
        """Charge rounds whose models were released after the state this ledger was loaded from.

        A run resumed from an older checkpoint re-runs rounds that had already
        released a model; each release spent privacy, so those rounds are
        composed again (and the re-run composes its own). ``journal`` holds
        the events of the write-ahead ledger file; the ones beyond this
        ledger's are charged as they were, any further rounds as the costliest
        event known (never an under-count).

        Raises
        ------
        LedgerStateError
            If rounds need charging and no event is known to charge them as.
        """
        events = self.events
        known_journal = [dp_event_from_json(item) for item in (journal or [])]
        known = known_journal[len(events) :] if known_journal[: len(events)] == events else []
        if known_journal and not known and len(known_journal) > len(events):
            _LOGGER.warning("the write-ahead ledger does not extend the saved one; not used")
        rounds = max(rounds, len(known))
        if rounds <= 0:
            return
        if not events and not known:
            raise LedgerStateError(
                f"{rounds} round(s) were released after the saved state, which holds no "
                "privacy event to charge them as; epsilon cannot be bounded, start a new run"
            )
        costliest = max(set(events) | set(known), key=self.epsilon_after)
        before = self.epsilon
        for index in range(rounds):
            self.compose(known[index] if index < len(known) else costliest)
        _LOGGER.warning(
            "%d round(s) were released after the checkpoint but are not in it; charged to "
            "the privacy ledger again: epsilon %.4g -> %.4g",
            rounds,
            before,
            self.epsilon,
        )


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
