"""The central Gaussian mechanism of DP-FedAvg: plan, sample, clip bound, noise, charge.

Implementation of the server side of DP-FedAvg with the fixed-denominator
estimator of McMahan, Ramage, Talwar, Zhang (2018), "Learning Differentially
Private Recurrent Language Models", https://arxiv.org/abs/1710.06963, and of
adaptive clipping from Andrew, Thakkar, McMahan, Ramaswamy (2021),
"Differentially Private Learning with Adaptive Clipping",
https://arxiv.org/abs/1905.03871.

:class:`CentralGaussian` holds everything that decides the guarantee: the
round's public plan (sampling rate, denominator ``m``, clipping norm, the DP
event), the client sampling, the per-update clip rule, the noise ``N(0, (z C /
m)^2)`` on the mean, the adaptive clipping estimate and the ledger. It sees
numpy arrays only; the aggregation stage of :mod:`strategies.dp_aggregation`
feeds it. Every draw comes from its :class:`~privacy.randomness.RandomSource`:
fresh OS entropy unless a test seed was given (then the run is NOT PRIVATE).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dp_accounting
import numpy as np

from .accounting import (
    DEFAULT_TARGET_DELTA,
    PrivacyLedger,
    Sampling,
    fixed_sample_size,
    neighboring_relation,
    round_event,
)
from .adaptive_clipping import (
    DEFAULT_CLIPPING_LEARNING_RATE,
    DEFAULT_TARGET_UNCLIPPED_QUANTILE,
    QuantileClipEstimator,
    split_noise_multiplier,
)
from .clipping import NORM_TOLERANCE, InvalidUpdate, add_gaussian_noise, clip_factor
from .distributed_noise import DdgRoundPlan, ddg_dp_event
from .local_dp import local_dp_noise_stddev
from .randomness import RandomSource, SecureRandom

ClippingMode = Literal["fixed", "adaptive"]
ClippingSide = Literal["server", "client"]
#: Who adds the noise: the server to the sum ("central"), or each client its share
#: of a distributed discrete Gaussian under secure aggregation ("distributed").
NoisePlacement = Literal["central", "distributed"]

#: A client-clipped update with norm at least ``C (1 - this)`` counts as clipped
#: for adaptive clipping (float32 rounding of updates clipped to exactly ``C``).
CLIPPED_BIT_TOLERANCE = 1e-4

#: What the guarantee is about, stated in every DP run's outputs. With N and the
#: per-round counts published, Poisson sampling's add/remove-one relation is
#: in effect zero-out: one client's data replaced by a zero contribution.
RELATION_BY_SAMPLING = {
    "poisson": "zero-out (one client's contribution replaced by zero; N is public)",
    "fixed": "replace-one (one client's data replaced by another's; N is public)",
}

#: Published figures that the user-level guarantee does not cover.
NOT_COVERED = (
    "num-nodes (N)",
    "num-sampled",
    "num-accepted",
    "num-rejected",
    "num-contributing",
    "num-dp-rejected",
    "clipped-fraction",
    "train metrics (train-loss ...)",
    "federated evaluation metrics",
    "elapsed-s",
)

_LOGGER = logging.getLogger("flwr")


# ----------------------------------------------------------------- pure math
def noise_stddev(noise_multiplier: float, clipping_norm: float, denominator: float) -> float:
    """Stddev of the Gaussian noise on the mean of clipped updates: ``z C / m``."""
    if denominator <= 0:
        raise ValueError(f"denominator must be positive, got {denominator}")
    return noise_multiplier * clipping_norm / denominator


def expected_clients(
    sampling: Sampling, num_nodes: int, sampling_rate: float, sample_size: int
) -> float:
    """The fixed denominator ``m``: ``q N`` for Poisson sampling, the sample size for fixed."""
    return sampling_rate * num_nodes if sampling == "poisson" else float(sample_size)


#: :func:`noise_to_signal` above which a run is warned that it will not learn much.
#: From TensorFlow Federated's DP tutorial (2NN on EMNIST, 199,210 parameters):
#: ratio 4.5 (noise 1.2, 120 clients) kept 79.6% of 80.5%; 6.7 (0.75, 50) fell
#: to 70.9%; 8.9 (1.0, 50) to 38.3%.
NOISE_TO_SIGNAL_WARNING = 6.0


def noise_to_signal(noise_stddev_per_coordinate: float, clipping_norm: float,
                    num_parameters: int) -> float:
    """Norm of a round's noise vector over the largest norm the clipped mean update can have.

    ``sigma sqrt(d) / C``: with central noise ``sigma = z C / m`` it is
    ``z sqrt(d) / m``. Updates that agree can reach norm ``C``; the noise's
    norm is ``sigma sqrt(d)``. Far above 1 every round, the model follows the
    noise unless many rounds average it away; the figure is a plain-words
    screen for hopeless settings (few clients per round, a large model), not
    a privacy quantity.
    """
    if clipping_norm <= 0 or num_parameters <= 0:
        raise ValueError("clipping norm and parameter count must be positive")
    return noise_stddev_per_coordinate * math.sqrt(num_parameters) / clipping_norm


def poisson_sample(
    node_ids: Sequence[int], sampling_rate: float, rng: np.random.Generator
) -> list[int]:
    """Each node independently with probability ``q`` (may be empty)."""
    draws = rng.random(len(node_ids))
    return [node for node, u in zip(node_ids, draws, strict=True) if u < sampling_rate]


def fixed_size_sample(
    node_ids: Sequence[int], size: int, rng: np.random.Generator
) -> list[int]:
    """``size`` distinct nodes drawn uniformly (sorted input, so only ``rng`` decides)."""
    ordered = sorted(node_ids)
    picked = rng.choice(len(ordered), size=size, replace=False)
    return [ordered[i] for i in sorted(picked)]


def noised_mean_update(
    clipped_sum: Mapping[str, np.ndarray],
    denominator: float,
    stddev: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``sum / m + N(0, stddev^2)`` per entry, float64."""
    mean = {key: np.asarray(value, dtype=np.float64) / denominator for key, value in clipped_sum.items()}
    return add_gaussian_noise(mean, stddev, rng)


@dataclass
class RoundPlan:
    """The public parameters of one round, fixed before any client is contacted."""

    server_round: int
    node_ids: list[int]
    sampling_rate: float
    sample_size: int
    denominator: float
    clipping_norm: float
    update_noise_multiplier: float
    count_stddev: float
    event: dp_accounting.DpEvent
    sampled: list[int] | None = None

    @property
    def num_nodes(self) -> int:
        """``N``: connected nodes when the round was planned."""
        return len(self.node_ids)


# pylint: disable=too-many-instance-attributes
class CentralGaussian:
    """User-level DP of the released models: clip to ``C``, mean over ``m``, add ``N(0, (zC/m)^2)``.

    Who is protected against whom: each client's whole contribution, against
    anyone who sees the released global models and the privacy figures
    (other clients, model users, readers of ``metrics.json`` and the
    checkpoints). The server itself sees every raw update (trusted-server
    central DP); secure aggregation is what removes that trust.

    Parameters
    ----------
    noise_multiplier : float
        ``z``: noise stddev over the clipping norm for a round (with adaptive
        clipping the total, split between update and count). 0 disables the
        noise and the guarantee (epsilon = inf).
    clipping_norm : float
        ``C`` (the initial value with adaptive clipping).
    clipping : {"fixed", "adaptive"} (default: "fixed")
        Keep ``C`` or adapt it to a quantile of the update norms.
    clipping_side : {"server", "client"} (default: "server")
        Who clips. With "client" the server sends ``clipping-norm`` and
        rejects updates with norm above ``C (1 + 1e-6)``.
    client_sampling : {"poisson", "fixed"} (default: "poisson")
        Poisson sampling with ``q = fraction_train`` or exactly ``round(q N)``.
    fraction_train : float (default: 1.0)
        ``q``.
    min_train_nodes : int (default: 2)
        Least sample size for fixed-size sampling.
    target_delta : float (default: 1e-5)
        Delta of the reported epsilon.
    target_epsilon : float | None (default: None)
        Budget: a round that would take epsilon above it is not run.
    target_unclipped_quantile, clipping_learning_rate, clipped_count_stddev
        Adaptive clipping's ``gamma``, ``eta_C`` and ``sigma_b`` (``None``: ``m / 20``).
    local_dp_epsilon, local_dp_delta : float | None
        Local DP: clients clip and noise their own update (analytic Gaussian,
        sensitivity ``2C``); the server adds no noise.
    compute_pld : bool (default: True)
        Also report ``epsilon-pld`` (Poisson sampling only).
    random : RandomSource | None (default: None)
        Where every draw comes from; ``None`` is fresh OS entropy per round
        (:class:`~privacy.randomness.SecureRandom`).
    noise_placement : {"central", "distributed"} (default: "central")
        "distributed" (secure aggregation only, fixed clipping): the clients
        add the noise (:mod:`privacy.distributed_noise`), the server adds
        none and charges each round's distributed discrete Gaussian with RDP
        and no sampling amplification (:meth:`release_distributed`).
    """

    # pylint: disable=too-many-arguments,too-many-locals
    def __init__(
        self,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        clipping: ClippingMode = "fixed",
        clipping_side: ClippingSide = "server",
        client_sampling: Sampling = "poisson",
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        target_delta: float = DEFAULT_TARGET_DELTA,
        target_epsilon: float | None = None,
        target_unclipped_quantile: float = DEFAULT_TARGET_UNCLIPPED_QUANTILE,
        clipping_learning_rate: float = DEFAULT_CLIPPING_LEARNING_RATE,
        clipped_count_stddev: float | None = None,
        local_dp_epsilon: float | None = None,
        local_dp_delta: float | None = None,
        compute_pld: bool = True,
        random: RandomSource | None = None,
        noise_placement: NoisePlacement = "central",
    ) -> None:
        if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
            raise ValueError(f"noise-multiplier must be finite and >= 0, got {noise_multiplier}")
        if not math.isfinite(clipping_norm) or clipping_norm <= 0:
            raise ValueError(f"clipping-norm must be positive, got {clipping_norm}")
        if clipping not in ("fixed", "adaptive"):
            raise ValueError(f"clipping must be 'fixed' or 'adaptive', got {clipping!r}")
        if clipping_side not in ("server", "client"):
            raise ValueError(f"clipping-side must be 'server' or 'client', got {clipping_side!r}")
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction-train must be in (0, 1], got {fraction_train}")
        neighboring_relation(client_sampling)  # validates the name
        if target_epsilon is not None and target_epsilon <= 0:
            raise ValueError(f"target-epsilon must be positive, got {target_epsilon}")
        if local_dp_epsilon is not None:
            if local_dp_epsilon <= 0:
                raise ValueError(f"local-dp-epsilon must be positive, got {local_dp_epsilon}")
            if noise_multiplier > 0:
                raise ValueError(
                    "local DP noises each update on the client; the server cannot also "
                    "clip and noise them, so noise-multiplier must be 0 with local-dp-epsilon"
                )
            if clipping != "fixed":
                raise ValueError("local DP needs clipping = 'fixed'")
        if noise_placement not in ("central", "distributed"):
            raise ValueError(f"noise placement must be 'central' or 'distributed', got "
                             f"{noise_placement!r}")
        if noise_placement == "distributed" and (
            clipping != "fixed" or local_dp_epsilon is not None
        ):
            raise ValueError("distributed noise needs clipping = 'fixed' and no local DP")
        self.noise_placement: NoisePlacement = noise_placement
        self.noise_multiplier = float(noise_multiplier)
        self.clipping = clipping
        self.clipping_side: ClippingSide = "client" if local_dp_epsilon else clipping_side
        self.client_sampling: Sampling = client_sampling
        self.fraction_train = float(fraction_train)
        self.min_train_nodes = int(min_train_nodes)
        self.target_epsilon = target_epsilon
        self.local_dp_epsilon = local_dp_epsilon
        self.local_dp_delta = target_delta if local_dp_delta is None else local_dp_delta
        self.random: RandomSource = SecureRandom() if random is None else random
        self.clip_estimator = QuantileClipEstimator(
            clipping_norm=float(clipping_norm),
            target_unclipped_quantile=target_unclipped_quantile,
            learning_rate=clipping_learning_rate if clipping == "adaptive" else 0.0,
            count_stddev=clipped_count_stddev,
        )
        # PLD of a Gaussian is no bound for a distributed discrete Gaussian: RDP only.
        self.ledger = PrivacyLedger(
            client_sampling,
            target_delta,
            compute_pld=compute_pld and local_dp_epsilon is None and noise_placement == "central",
        )
        self.last_round_privacy: dict[str, float] = {}
        self.privacy_history: list[dict[str, float]] = []
        self.projected_epsilon: float | None = None
        # Called as on_privacy_spent(server_round, ledger) right after a round
        # is charged, before its model is released (write-ahead journal).
        self.on_privacy_spent: Callable[[int, PrivacyLedger], None] | None = None

    @property
    def clipping_norm(self) -> float:
        """The norm the next round clips with."""
        return self.clip_estimator.clipping_norm

    @property
    def private(self) -> bool:
        """Whether the guarantee holds: noise on, and no replayable seed."""
        noised = self.noise_multiplier > 0 or self.local_dp_epsilon is not None
        return noised and self.random.private

    @property
    def relation(self) -> str:
        """The neighbouring relation the epsilon is stated for."""
        return RELATION_BY_SAMPLING[self.client_sampling]

    # ------------------------------------------------------------- planning
    def plan_round(self, server_round: int, node_ids: Sequence[int]) -> RoundPlan:
        """The public parameters of a round with ``node_ids`` connected (no side effects)."""
        num_nodes = len(node_ids)
        if num_nodes == 0:
            raise ValueError("no connected node to sample from")
        if self.client_sampling == "fixed":
            sample_size = fixed_sample_size(num_nodes, self.fraction_train, self.min_train_nodes)
            rate = sample_size / num_nodes
        else:
            rate = self.fraction_train
            sample_size = 0
        denominator = expected_clients(self.client_sampling, num_nodes, rate, sample_size)
        clip = self.clipping_norm
        if self.local_dp_epsilon is not None:
            sigma = local_dp_noise_stddev(clip, self.local_dp_epsilon, self.local_dp_delta)
            event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(sigma / (2.0 * clip))
            update_z, count_stddev = 0.0, 0.0
        elif self.noise_placement == "distributed":
            # Before the round: the continuous Gaussian's rho without amplification;
            # release_distributed charges the round's exact (larger) rho.
            update_z, count_stddev = self.noise_multiplier, 0.0
            z = update_z / (2.0 if self.client_sampling == "fixed" else 1.0)
            event = ddg_dp_event(math.inf if z == 0 else 1.0 / (2.0 * z * z))
        else:
            if self.clipping == "adaptive":
                count_stddev = self.clip_estimator.count_stddev_for(
                    denominator, self.noise_multiplier
                )
                update_z = split_noise_multiplier(self.noise_multiplier, count_stddev)
                multipliers = [update_z] + ([2.0 * count_stddev] if update_z > 0 else [])
            else:
                count_stddev, update_z = 0.0, self.noise_multiplier
                multipliers = [update_z]
            event = round_event(
                self.client_sampling,
                multipliers,
                sampling_rate=rate,
                num_nodes=num_nodes,
                sample_size=sample_size or None,
            )
        return RoundPlan(
            server_round=server_round,
            node_ids=list(node_ids),
            sampling_rate=rate,
            sample_size=sample_size,
            denominator=denominator,
            clipping_norm=clip,
            update_noise_multiplier=update_z,
            count_stddev=count_stddev,
            event=event,
        )

    def stop_reason(self, plan: RoundPlan) -> str | None:
        """Why the planned round must not run (budget), or ``None``; public inputs only."""
        if self.target_epsilon is None:
            return None
        after = self.ledger.epsilon_after(plan.event)
        if after > self.target_epsilon:
            return (
                f"round {plan.server_round} would raise epsilon from {self.ledger.epsilon:.4g} "
                f"to {after:.4g}, above target-epsilon {self.target_epsilon:g}"
            )
        return None

    def noise_to_signal(self, node_ids: Sequence[int], num_parameters: int) -> float:
        """:func:`noise_to_signal` of a round with ``node_ids`` connected (0 without noise)."""
        plan = self.plan_round(1, node_ids)
        if self.local_dp_epsilon is not None:
            # Each client's own Gaussian, averaged over m clients: sigma / sqrt(m) on the mean.
            sigma = local_dp_noise_stddev(
                plan.clipping_norm, self.local_dp_epsilon, self.local_dp_delta
            ) / math.sqrt(plan.denominator)
        else:
            sigma = noise_stddev(
                plan.update_noise_multiplier, plan.clipping_norm, plan.denominator
            )
        return noise_to_signal(sigma, plan.clipping_norm, num_parameters)

    def project(self, plan: RoundPlan, rounds: int) -> float:
        """Epsilon after ``rounds`` more rounds like ``plan`` (RDP)."""
        return self.ledger.epsilon_after(plan.event, rounds)

    def sample(self, plan: RoundPlan) -> list[int]:
        """The round's clients, drawn with fresh randomness (amplification needs it secret)."""
        rng = self.random.generator()
        if self.client_sampling == "poisson":
            sampled = poisson_sample(sorted(plan.node_ids), plan.sampling_rate, rng)
        else:
            sampled = fixed_size_sample(plan.node_ids, plan.sample_size, rng)
        plan.sampled = sampled
        return sampled

    def client_config(self, plan: RoundPlan) -> dict[str, float]:
        """What clients must know to clip or noise their own update (protocol key names)."""
        config: dict[str, float] = {}
        if self.clipping_side == "client":
            config["clipping-norm"] = plan.clipping_norm
        if self.local_dp_epsilon is not None:
            config["local-dp-epsilon"] = float(self.local_dp_epsilon)
            config["local-dp-delta"] = float(self.local_dp_delta)
            config["local-dp-noise-stddev"] = local_dp_noise_stddev(
                plan.clipping_norm, self.local_dp_epsilon, self.local_dp_delta
            )
        return config

    # ------------------------------------------------------------- clipping
    def admit(self, norm: float, plan: RoundPlan) -> tuple[float, bool]:
        """An update's clip factor (float64) and whether it counts as unclipped.

        Raises
        ------
        InvalidUpdate
            A non-finite norm, or a norm above ``C (1 + 1e-6)`` when clients clip.
        """
        clip = plan.clipping_norm
        if not math.isfinite(norm):
            raise InvalidUpdate(f"update holds NaN or Inf (norm {norm})")
        if self.local_dp_epsilon is not None:
            return 1.0, norm <= clip
        if self.clipping_side == "client":
            if norm > clip * (1.0 + NORM_TOLERANCE):
                raise InvalidUpdate(
                    f"update norm {norm:.6g} exceeds the clipping norm {clip:.6g} "
                    "(clients must clip)"
                )
            return clip_factor(norm, clip), norm < clip * (1.0 - CLIPPED_BIT_TOLERANCE)
        return clip_factor(norm, clip), norm <= clip

    # ------------------------------------------------------------ releasing
    def release(
        self,
        server_round: int,
        plan: RoundPlan,
        clipped_sum: Mapping[str, np.ndarray],
        unclipped: Sequence[bool],
        num_rejected: int,
    ) -> dict[str, np.ndarray]:
        """The noised mean update of the round; charges the ledger before it is returned.

        ``sum / m + N(0, (z C / m)^2)`` per entry (float64). With adaptive
        clipping the noised unclipped fraction then moves ``C``. The round's
        event is composed into the ledger and ``on_privacy_spent`` is called
        before the update leaves this method, so a crash after it still
        leaves the round charged. :attr:`last_round_privacy` gets the round's
        DP figures.
        """
        rng = self.random.generator()
        stddev = noise_stddev(plan.update_noise_multiplier, plan.clipping_norm, plan.denominator)
        mean = noised_mean_update(clipped_sum, plan.denominator, stddev, rng)
        privacy = self._round_figures(plan, stddev, len(unclipped), num_rejected)
        if unclipped and self.local_dp_epsilon is None:
            # Diagnostic for the (trusted) server, not covered by the DP guarantee.
            privacy["clipped-fraction"] = 1.0 - float(np.mean(unclipped))
        if self.clipping == "adaptive":
            fraction = self.clip_estimator.update(
                list(unclipped), plan.denominator, plan.count_stddev, rng
            )
            privacy["clipped-fraction-noised"] = 1.0 - fraction
            privacy["next-clipping-norm"] = self.clipping_norm
            privacy["update-noise-multiplier"] = plan.update_noise_multiplier
            privacy["count-noise-stddev"] = plan.count_stddev
        self._charge(server_round, plan.event, privacy, len(unclipped), plan, stddev)
        return mean

    def release_distributed(
        self,
        server_round: int,
        plan: RoundPlan,
        noised_sum: Mapping[str, np.ndarray],
        num_contributing: int,
        ddg: DdgRoundPlan,
    ) -> dict[str, np.ndarray]:
        """The mean of a sum the clients already noised; charges the round's DDG event.

        ``noised_sum`` is the unmasked sum of at least ``ddg.min_clients``
        clients' clipped, rounded and noised vectors (in model units). Nothing
        is added here: the guarantee rests on the survivors' noise.
        """
        mean = {key: np.asarray(value, np.float64) / plan.denominator
                for key, value in noised_sum.items()}
        stddev = noise_stddev(self.noise_multiplier, plan.clipping_norm, plan.denominator)
        privacy = self._round_figures(plan, stddev, num_contributing, 0)
        privacy.update({
            "distributed-noise": 1.0,
            "local-noise-stddev": ddg.local_sigma / ddg.scale,
            "noisy-clients-guaranteed": float(ddg.min_clients),
            "rho": ddg.rho,
        })
        self._charge(server_round, ddg.dp_event(), privacy, num_contributing, plan, stddev)
        return mean

    def _round_figures(
        self, plan: RoundPlan, stddev: float, num_contributing: int, num_rejected: int
    ) -> dict[str, float]:
        """The figures every released round reports (``metrics.json``)."""
        return {
            "clipping-norm": plan.clipping_norm,
            "noise-multiplier": self.noise_multiplier,
            "noise-stddev": stddev,
            "sampling-rate": plan.sampling_rate,
            "expected-clients": plan.denominator,
            "num-contributing": float(num_contributing),
            "num-dp-rejected": float(num_rejected),
        }

    def _charge(
        self,
        server_round: int,
        event: dp_accounting.DpEvent,
        privacy: dict[str, float],
        num_contributing: int,
        plan: RoundPlan,
        stddev: float,
    ) -> None:
        """Compose the round's event, then the write-ahead hook, then the round's figures."""
        self.ledger.compose(event)
        if self.on_privacy_spent is not None:
            self.on_privacy_spent(server_round, self.ledger)
        privacy["epsilon"] = self.ledger.epsilon
        privacy["delta"] = self.ledger.target_delta
        if (pld := self.ledger.epsilon_pld) is not None:
            privacy["epsilon-pld"] = pld
        if self.projected_epsilon is not None:
            privacy["epsilon-projected"] = self.projected_epsilon
        if self.local_dp_epsilon is not None:
            privacy["local-dp-epsilon"] = float(self.local_dp_epsilon)
            privacy["local-dp-delta"] = float(self.local_dp_delta)
            privacy["local-dp-noise-stddev"] = local_dp_noise_stddev(
                plan.clipping_norm, self.local_dp_epsilon, self.local_dp_delta
            )
        self.last_round_privacy = privacy
        self.privacy_history.append(dict(privacy, round=float(server_round)))
        _LOGGER.info(
            "Round %d DP: %d contributing of m=%.4g, clip %.4g, noise stddev %.4g%s, "
            "epsilon %.4g (delta %.3g)%s",
            server_round,
            num_contributing,
            plan.denominator,
            plan.clipping_norm,
            stddev,
            " (added by the clients)" if "distributed-noise" in privacy else "",
            privacy["epsilon"],
            privacy["delta"],
            "" if self.random.private else " [NOT PRIVATE: replayable insecure-dp-seed]",
        )

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Clipping norm, ledger and history, JSON-ready. No random state: none exists to save."""
        return {
            "clipping-norm": float(self.clipping_norm),
            "ledger": self.ledger.state_dict(),
            "privacy-history": [dict(entry) for entry in self.privacy_history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into a freshly built mechanism (its ledger empty).

        Raises
        ------
        privacy.accounting.LedgerStateError
            If the ledger does not fit (see :meth:`PrivacyLedger.load_state_dict`).
        """
        self.clip_estimator.clipping_norm = float(state["clipping-norm"])
        self.ledger.load_state_dict(state["ledger"])
        self.privacy_history = [dict(entry) for entry in state.get("privacy-history", [])]
        if self.privacy_history:
            last = dict(self.privacy_history[-1])
            last.pop("round", None)
            self.last_round_privacy = last
