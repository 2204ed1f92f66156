"""DP-FedAvg: user-level differential privacy with fixed or adaptive clipping.

Implementation of DP-FedAvg with the fixed-denominator estimator of McMahan,
Ramage, Talwar, Zhang (2018), "Learning Differentially Private Recurrent
Language Models", https://arxiv.org/abs/1710.06963, and of adaptive clipping
from Andrew, Thakkar, McMahan, Ramaswamy (2021), "Differentially Private
Learning with Adaptive Clipping", https://arxiv.org/abs/1905.03871.

Each round:

1. Clients are sampled so that the accountant can trust the sampling:
   ``poisson`` (each connected node independently with probability
   ``q = fraction-train``) or ``fixed`` (exactly ``m = round(q N)`` nodes
   without replacement).
2. Each reply's update ``Delta_k = x_k - x_global`` (all shared arrays as one
   vector) is validated (keys, shapes, NaN/Inf, one reply per sampled node)
   and clipped to L2 norm ``C`` (``clipping-side = server``); with
   ``clipping-side = client`` clients clip and the server rejects any update
   above ``C (1 + 1e-6)``.
3. The clipped updates are averaged with **uniform** weights over a **fixed
   denominator** ``m``: the sample size for ``fixed``, the expected sample size
   ``q N`` for ``poisson`` (McMahan et al. 2018's fixed-denominator estimator,
   so the sensitivity of the mean is ``C / m`` whatever the sample turned out
   to be). A rejected, failed or missing client is a zero contribution; the
   round is not voided.
4. Gaussian noise of stddev ``z C / m`` is added to the mean
   (``z_Delta C / m`` with adaptive clipping, ``C`` being the norm this round
   clipped with), and the global model moves by ``server-learning-rate`` times
   the noised mean; or, with a ``server_optimizer`` (FedAvgM, FedAdam,
   FedYogi of :mod:`strategies.server_optimizers`), the optimiser steps along
   the pseudo-gradient ``-(noised mean)`` instead. Either is post-processing
   of the noised mean, so it costs no privacy; so is ``server_update_fn``
   (e.g. fine-tuning on public server data), applied after it.
5. With adaptive clipping the noised unclipped fraction moves ``C`` for the
   next round; then the round's DP event is composed into the
   :class:`~privacy.accounting.PrivacyLedger`.

Flower 1.42's DP wrappers differ on each of these points (example-weighted
mean under ``z C / m`` noise, adaptive clipping driven by the clipped fraction
and noised with the updated norm, ZeroDivisionError on a zero update, whole
round skipped on one failed client, no sampling amplification in its
accountant); see ``shared/design/STACK.md``.

The server's arithmetic reads each reply twice, block by block in cache and
with no per-client temporary: once for the update norms
(:func:`~strategies.aggregation.update_norms`, which also catches NaN/Inf),
once for the clipped sum (:func:`~strategies.aggregation.scaled_update_sum`).

Client metrics (``train-loss`` ...) are averaged as in FedAvg and are *not*
covered by the DP guarantee; neither is federated evaluation. The guarantee is
about the sequence of global models (trusted-server, central DP).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Literal

import dp_accounting
import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from privacy.accounting import (
    DEFAULT_TARGET_DELTA,
    PrivacyLedger,
    Sampling,
    delta_warning,
    fixed_sample_size,
    neighboring_relation,
    round_event,
)
from privacy.adaptive_clipping import (
    DEFAULT_CLIPPING_LEARNING_RATE,
    DEFAULT_TARGET_UNCLIPPED_QUANTILE,
    QuantileClipEstimator,
    split_noise_multiplier,
)
from . import protocol
from .aggregation import scaled_update_sum, update_norms, weighted_metrics
from privacy.clipping import (
    NORM_TOLERANCE,
    InvalidUpdate,
    add_gaussian_noise,
    check_update,
    clip_factor,
)
from .fedavg import EvaluateFn, FedAvg, RoundListener, ServerUpdateFn, to_arrayrecord
from privacy.local_dp import local_dp_noise_stddev
from .sampling import sample_without_replacement, wait_for_nodes
from .server_optimizers import ServerOptimizer
from .validation import TrainReply

ClippingMode = Literal["fixed", "adaptive"]
ClippingSide = Literal["server", "client"]

#: A client-clipped update with norm at least ``C (1 - this)`` counts as clipped
#: for adaptive clipping (float32 rounding of updates clipped to exactly ``C``).
CLIPPED_BIT_TOLERANCE = 1e-4

# Train-config keys sent to clients that must clip or noise their own update.
CONFIG_CLIPPING_NORM = protocol.CLIPPING_NORM
CONFIG_LOCAL_DP_EPSILON = protocol.LOCAL_DP_EPSILON
CONFIG_LOCAL_DP_DELTA = protocol.LOCAL_DP_DELTA
CONFIG_LOCAL_DP_STDDEV = protocol.LOCAL_DP_STDDEV


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


def poisson_sample(
    node_ids: list[int], sampling_rate: float, rng: np.random.Generator
) -> list[int]:
    """Each node independently with probability ``q`` (may be empty)."""
    draws = rng.random(len(node_ids))
    return [node for node, u in zip(node_ids, draws, strict=True) if u < sampling_rate]


def noised_mean_update(
    clipped_sum: dict[str, np.ndarray],
    denominator: float,
    stddev: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``sum / m + N(0, stddev^2)`` per entry, float64."""
    mean = {key: value / denominator for key, value in clipped_sum.items()}
    return add_gaussian_noise(mean, stddev, rng)


def apply_update(
    reference: dict[str, np.ndarray],
    mean_update: dict[str, np.ndarray],
    server_learning_rate: float,
) -> dict[str, np.ndarray]:
    """``x + eta_s * mean_update`` in float64, returned in the reference's dtypes."""
    return {
        key: (np.asarray(ref, dtype=np.float64) + server_learning_rate * mean_update[key]).astype(
            np.asarray(ref).dtype
        )
        for key, ref in reference.items()
    }


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


@dataclass
class _Contributions:
    total: dict[str, np.ndarray]
    norms: list[float] = field(default_factory=list)
    unclipped: list[bool] = field(default_factory=list)
    rejected: int = 0


# ------------------------------------------------------------------- strategy
# pylint: disable=too-many-instance-attributes
class DPFedAvg(FedAvg):
    """Federated Averaging with user-level differential privacy (DP-FedAvg).

    See the module docstring for the algorithm. After every aggregated round
    :attr:`last_round_privacy` holds that round's DP metrics (kebab-case keys,
    floats) and :attr:`ledger` the running epsilon.

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
        Who clips. With "client" the server sends ``clipping-norm`` in the train
        config and rejects updates with norm above ``C (1 + 1e-6)``.
    server_learning_rate : float (default: 1.0)
        ``eta_s``: the global model moves by ``eta_s`` times the noised mean
        update. Not used when ``server_optimizer`` is given (the optimiser's
        own learning rate applies).
    client_sampling : {"poisson", "fixed"} (default: "poisson")
        Poisson sampling with ``q = fraction_train`` (add/remove-one DP) or
        exactly ``round(q N)`` nodes (replace-one DP).
    target_delta : float (default: 1e-5)
        Delta of the reported epsilon.
    target_epsilon : float | None (default: None)
        Budget: a round that would take epsilon above it is not run (see
        :meth:`should_stop`).
    target_unclipped_quantile : float (default: 0.5)
        ``gamma`` for adaptive clipping: fraction of updates left unclipped.
    clipping_learning_rate : float (default: 0.2)
        ``eta_C`` of the geometric clipping-norm update.
    clipped_count_stddev : float | None (default: None)
        ``sigma_b``; ``None`` means expected clients per round / 20.
    local_dp_epsilon : float | None (default: None)
        Local DP: clients clip to ``C`` and add Gaussian noise calibrated to
        (``local_dp_epsilon``, ``local_dp_delta``) per round (analytic Gaussian,
        sensitivity ``2C``, :mod:`privacy.local_dp`); the server adds no
        noise (``noise_multiplier`` must be 0) and its ledger reports the
        composition of the local guarantee over rounds.
    local_dp_delta : float | None (default: None)
        Per-round delta of local DP; defaults to ``target_delta``.
    compute_pld : bool (default: True)
        Also report ``epsilon-pld`` (Poisson sampling only).
    server_optimizer : ServerOptimizer | None (default: None)
        Server optimiser applied to the noised mean update (as the
        pseudo-gradient ``-mean``) instead of the ``server_learning_rate``
        step; post-processing, no privacy cost (Reddi et al. 2021,
        https://arxiv.org/abs/2003.00295).
    server_update_fn : ServerUpdateFn | None (default: None)
        As in :class:`~strategies.fedavg.FedAvg`, applied to the released
        (post-noise) model; it must use only public data for the guarantee to hold.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, node_wait_timeout, seed
        As in :class:`~strategies.fedavg.FedAvg`. ``fraction_train`` is ``q``;
        ``min_train_nodes`` is how many nodes must be connected before a round
        starts (and, for fixed-size sampling, the least sample size).

    Notes
    -----
    The noise comes from a numpy ``Generator`` spawned from the strategy's
    seeded ``rng`` (reproducible runs). numpy's PCG64 is not a CSPRNG; a
    production deployment should seed the noise generator from the OS
    (``secrets``) or use a discrete Gaussian.
    """

    # pylint: disable=too-many-arguments,too-many-locals
    def __init__(
        self,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        clipping: ClippingMode = "fixed",
        clipping_side: ClippingSide = "server",
        server_learning_rate: float = 1.0,
        client_sampling: Sampling = "poisson",
        target_delta: float = DEFAULT_TARGET_DELTA,
        target_epsilon: float | None = None,
        target_unclipped_quantile: float = DEFAULT_TARGET_UNCLIPPED_QUANTILE,
        clipping_learning_rate: float = DEFAULT_CLIPPING_LEARNING_RATE,
        clipped_count_stddev: float | None = None,
        local_dp_epsilon: float | None = None,
        local_dp_delta: float | None = None,
        compute_pld: bool = True,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        node_wait_timeout: float = 120.0,
        seed: int = 0,
        server_optimizer: ServerOptimizer | None = None,
        server_update_fn: ServerUpdateFn | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            node_wait_timeout=node_wait_timeout,
            seed=seed,
            server_optimizer=server_optimizer,
            server_update_fn=server_update_fn,
        )
        if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
            raise ValueError(f"noise-multiplier must be finite and >= 0, got {noise_multiplier}")
        if not math.isfinite(clipping_norm) or clipping_norm <= 0:
            raise ValueError(f"clipping-norm must be positive, got {clipping_norm}")
        if clipping not in ("fixed", "adaptive"):
            raise ValueError(f"clipping must be 'fixed' or 'adaptive', got {clipping!r}")
        if clipping_side not in ("server", "client"):
            raise ValueError(f"clipping-side must be 'server' or 'client', got {clipping_side!r}")
        if not server_learning_rate > 0:
            raise ValueError(f"server-learning-rate must be positive, got {server_learning_rate}")
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
        self.noise_multiplier = float(noise_multiplier)
        self.clipping = clipping
        self.clipping_side: ClippingSide = "client" if local_dp_epsilon else clipping_side
        self.server_learning_rate = float(server_learning_rate)
        self.client_sampling: Sampling = client_sampling
        self.target_epsilon = target_epsilon
        self.local_dp_epsilon = local_dp_epsilon
        self.local_dp_delta = target_delta if local_dp_delta is None else local_dp_delta
        self.clip_estimator = QuantileClipEstimator(
            clipping_norm=float(clipping_norm),
            target_unclipped_quantile=target_unclipped_quantile,
            learning_rate=clipping_learning_rate if clipping == "adaptive" else 0.0,
            count_stddev=clipped_count_stddev,
        )
        self.ledger = PrivacyLedger(
            client_sampling, target_delta, compute_pld=compute_pld and local_dp_epsilon is None
        )
        self.noise_rng: np.random.Generator = self.rng.spawn(1)[0]
        self.last_round_privacy: dict[str, float] = {}
        self.privacy_history: list[dict[str, float]] = []
        self.projected_epsilon: float | None = None
        self.stop_reason: str | None = None
        # Called as on_privacy_spent(server_round, ledger) right after a round
        # is charged, before its model leaves aggregate_train.
        self.on_privacy_spent: Callable[[int, PrivacyLedger], None] | None = None
        self._plan: RoundPlan | None = None
        self._pending_nodes: tuple[int, list[int]] | None = None
        self._last_nodes: list[int] | None = None

    @property
    def clipping_norm(self) -> float:
        """The norm the next round clips with."""
        return self.clip_estimator.clipping_norm

    def summary(self) -> None:
        """Log the DP settings, then FedAvg's."""
        log(
            INFO,
            "DP-FedAvg: noise-multiplier %.4g, clipping %s (norm %.4g, %s side), "
            "client-sampling %s (q %.4g), server-learning-rate %.4g, target-delta %.3g, "
            "target-epsilon %s%s",
            self.noise_multiplier,
            self.clipping,
            self.clipping_norm,
            self.clipping_side,
            self.client_sampling,
            self.fraction_train,
            self.server_learning_rate,
            self.ledger.target_delta,
            "none" if self.target_epsilon is None else f"{self.target_epsilon:g}",
            ""
            if self.local_dp_epsilon is None
            else f", local DP epsilon {self.local_dp_epsilon:g} delta {self.local_dp_delta:g}",
        )
        if self.noise_multiplier == 0 and self.local_dp_epsilon is None:
            log(WARNING, "DP-FedAvg: noise-multiplier 0 gives no privacy (epsilon = inf)")
        super().summary()

    # ------------------------------------------------------------- planning
    def _connected_nodes(self, server_round: int, grid: Grid | None) -> list[int]:
        if self._pending_nodes is not None and self._pending_nodes[0] == server_round:
            return self._pending_nodes[1]
        if grid is None:  # no grid at hand: the nodes seen last
            if self._last_nodes is None:
                raise RuntimeError("no grid to count the connected nodes")
            nodes = self._last_nodes
        else:
            nodes = wait_for_nodes(grid, self.min_train_nodes, self.node_wait_timeout)
        self._pending_nodes = (server_round, nodes)
        self._last_nodes = nodes
        return nodes

    def plan_round(self, server_round: int, node_ids: list[int]) -> RoundPlan:
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

    def should_stop(self, server_round: int, grid: Grid | None = None) -> str | None:
        """Why round ``server_round`` must not run (privacy budget), or ``None``.

        Meant to be called by the training loop at the top of each round; the
        decision depends only on public parameters (``q``, ``z``, ``N``, the
        ledger), never on client data. :meth:`configure_train` checks it too
        and sends no message for a round that must not run.
        """
        if self.target_epsilon is None:
            return None
        plan = self.plan_round(server_round, self._connected_nodes(server_round, grid))
        after = self.ledger.epsilon_after(plan.event)
        if after > self.target_epsilon:
            return (
                f"round {server_round} would raise epsilon from {self.ledger.epsilon:.4g} "
                f"to {after:.4g}, above target-epsilon {self.target_epsilon:g}"
            )
        return None

    def project(self, num_rounds: int, node_ids: list[int]) -> float:
        """Epsilon after ``num_rounds`` more rounds like the next one (RDP)."""
        return self.ledger.epsilon_after(self.plan_round(1, node_ids).event, num_rounds)

    # ------------------------------------------------------------- sampling
    def sample_train_nodes(self, grid: Grid) -> list[int]:
        """Poisson or fixed-size sample of the nodes of the current plan."""
        plan = self._plan
        if plan is None or plan.sampled is not None:
            plan = self._plan = self.plan_round(0, self._connected_nodes(0, grid))
        if self.client_sampling == "poisson":
            sampled = poisson_sample(plan.node_ids, plan.sampling_rate, self.rng)
        else:
            sampled = sample_without_replacement(plan.node_ids, plan.sample_size, self.rng)
        plan.sampled = sampled
        return sampled

    # ------------------------------------------------------------- training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Plan the round (budget check), sample, and send the DP client config."""
        reason = self.should_stop(server_round, grid)
        node_ids = self._connected_nodes(server_round, grid)
        self._pending_nodes = None
        if reason is not None:
            self.stop_reason = reason
            self._plan = None
            self.last_num_sampled = 0
            self._train_messages = []
            log(WARNING, "Round %d not run: %s", server_round, reason)
            return []
        self._plan = self.plan_round(server_round, node_ids)
        config = ConfigRecord(dict(config))
        if self.clipping_side == "client":
            config[CONFIG_CLIPPING_NORM] = self._plan.clipping_norm
        if self.local_dp_epsilon is not None:
            config[CONFIG_LOCAL_DP_EPSILON] = float(self.local_dp_epsilon)
            config[CONFIG_LOCAL_DP_DELTA] = float(self.local_dp_delta)
            config[CONFIG_LOCAL_DP_STDDEV] = local_dp_noise_stddev(
                self._plan.clipping_norm, self.local_dp_epsilon, self.local_dp_delta
            )
        if warning := delta_warning(self.ledger.target_delta, self._plan.num_nodes):
            log(WARNING, "DP-FedAvg: %s", warning)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, clip, average over the fixed denominator, noise; always releases.

        Unlike FedAvg, a round whose replies all failed still releases a
        (noise-only) model: skipping it would depend on the clients' data.
        Only a round that :meth:`configure_train` did not run returns nothing.
        """
        replies = list(replies)
        if self._plan is None:
            self.last_num_rejected = 0
            return None, None
        accepted = self.accept_train_replies(server_round, replies)
        arrays = self.aggregate_arrays(server_round, accepted)
        self.log_train_failures(server_round, int(self.last_round_privacy["num-contributing"]))
        if self.server_update_fn is not None:
            arrays = self.server_update_fn(server_round, arrays)
        metrics = (
            weighted_metrics(
                [reply.metrics for reply in accepted],
                [reply.num_examples for reply in accepted],
            )
            if accepted
            else {}
        )
        return to_arrayrecord(arrays), MetricRecord(metrics)

    def _collect(
        self, server_round: int, replies: list[TrainReply], plan: RoundPlan
    ) -> _Contributions:
        """Check, measure and clip every update; sum the clipped updates.

        Keys and shapes are checked first (no data read); then the norms of
        all updates come from one blocked pass (:func:`update_norms`: NaN or
        Inf gives a non-finite norm, rejected here), and the clipped sum from
        one more (:func:`scaled_update_sum`). A node's second reply is rejected
        when its first one counted. Each rejection is logged, counted and
        added to :attr:`last_failures`.
        """
        reference = self._sent_arrays
        clip = plan.clipping_norm
        local_dp = self.local_dp_epsilon is not None
        sampled = None if plan.sampled is None else set(plan.sampled)
        rejected = 0

        def reject(node: int, reason: InvalidUpdate) -> None:
            nonlocal rejected
            rejected += 1
            self.last_failures[node] = f"update rejected, counts as zero: {reason}"
            log(
                WARNING,
                "Round %d: rejected update from node %d (counts as zero): %s",
                server_round,
                node,
                reason,
            )

        candidates: list[TrainReply] = []
        for reply in replies:
            try:
                if sampled is not None and reply.node_id not in sampled:
                    raise InvalidUpdate("node was not sampled this round")
                check_update(reply.arrays, reference, check_finite=False)
            except InvalidUpdate as reason:
                reject(reply.node_id, reason)
                continue
            candidates.append(reply)
        norms = update_norms([reply.arrays for reply in candidates], reference)

        kept: list[dict[str, np.ndarray]] = []
        factors: list[float] = []
        result = _Contributions({})
        seen: set[int] = set()
        for reply, norm in zip(candidates, norms):
            try:
                if reply.node_id in seen:
                    raise InvalidUpdate("more than one reply from this node")
                if not math.isfinite(norm):
                    raise InvalidUpdate(f"update holds NaN or Inf (norm {norm})")
                if self.clipping_side == "client" and not local_dp:
                    if norm > clip * (1.0 + NORM_TOLERANCE):
                        raise InvalidUpdate(
                            f"update norm {norm:.6g} exceeds the clipping norm {clip:.6g} "
                            "(clients must clip)"
                        )
                    unclipped = norm < clip * (1.0 - CLIPPED_BIT_TOLERANCE)
                else:
                    unclipped = norm <= clip
            except InvalidUpdate as reason:
                reject(reply.node_id, reason)
                continue
            seen.add(reply.node_id)
            kept.append(reply.arrays)
            factors.append(1.0 if local_dp else clip_factor(norm, clip))
            result.norms.append(norm)
            result.unclipped.append(bool(unclipped))
        result.total = scaled_update_sum(kept, reference, factors)
        result.rejected = rejected
        return result

    def aggregate_arrays(
        self, server_round: int, replies: list[TrainReply]
    ) -> dict[str, np.ndarray]:
        """New global arrays: ``x + eta_s (sum_k clip(Delta_k) / m + N(0, (z C / m)^2))``.

        With a server optimiser: ``opt.step(x, x + noised mean)`` instead.
        """
        plan = self._plan
        if plan is None:
            raise RuntimeError("aggregate_arrays needs a planned round (configure_train)")
        contributions = self._collect(server_round, replies, plan)
        self.last_num_rejected += contributions.rejected
        stddev = noise_stddev(plan.update_noise_multiplier, plan.clipping_norm, plan.denominator)
        mean = noised_mean_update(contributions.total, plan.denominator, stddev, self.noise_rng)
        if self.server_optimizer is None:
            arrays = apply_update(self._sent_arrays, mean, self.server_learning_rate)
        else:
            # Post-processing of the noised mean: x_t + mean is the "averaged"
            # model the optimiser's pseudo-gradient is taken against.
            averaged = {
                key: np.asarray(ref, dtype=np.float64) + mean[key]
                for key, ref in self._sent_arrays.items()
            }
            arrays = self.server_optimizer.step(self._sent_arrays, averaged)

        privacy: dict[str, float] = {
            "clipping-norm": plan.clipping_norm,
            "noise-multiplier": self.noise_multiplier,
            "noise-stddev": stddev,
            "sampling-rate": plan.sampling_rate,
            "expected-clients": plan.denominator,
            "num-contributing": float(len(contributions.norms)),
            "num-dp-rejected": float(contributions.rejected),
        }
        if contributions.norms and self.local_dp_epsilon is None:
            # Diagnostic for the (trusted) server, not covered by the DP guarantee.
            privacy["clipped-fraction"] = 1.0 - float(np.mean(contributions.unclipped))
        if self.clipping == "adaptive":
            fraction = self.clip_estimator.update(
                contributions.unclipped, plan.denominator, plan.count_stddev, self.noise_rng
            )
            privacy["clipped-fraction-noised"] = 1.0 - fraction
            privacy["next-clipping-norm"] = self.clipping_norm
            privacy["update-noise-multiplier"] = plan.update_noise_multiplier
            privacy["count-noise-stddev"] = plan.count_stddev
        self.ledger.compose(plan.event)
        if self.on_privacy_spent is not None:
            # Before the model is released: a crash after this point still
            # leaves the round charged (write-ahead journal of the ledger).
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
        log(
            INFO,
            "Round %d DP: %d contributing of m=%.4g, clip %.4g, noise stddev %.4g, "
            "epsilon %.4g (delta %.3g)",
            server_round,
            len(contributions.norms),
            plan.denominator,
            plan.clipping_norm,
            stddev,
            privacy["epsilon"],
            privacy["delta"],
        )
        return arrays

    # ------------------------------------------------------------------ loop
    # pylint: disable=too-many-arguments
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        on_round_end: Iterable[RoundListener] = (),
        start_round: int = 1,
    ) -> Result:
        """Log the projected epsilon of the whole run, then run FedAvg's loop.

        When a checkpointed run continues (``start_round`` > 1, ledger
        restored), the projection adds the rounds left to the epsilon spent.
        """
        nodes = self._connected_nodes(max(start_round, 1), grid)
        plan = self.plan_round(max(start_round, 1), nodes)
        remaining = max(num_rounds - max(start_round, 1) + 1, 0)
        self.projected_epsilon = self.ledger.epsilon_after(plan.event, remaining)
        log(
            INFO,
            "DP-FedAvg: projected epsilon after %d rounds: %.4g at delta %.3g "
            "(RDP, %s sampling, q %.4g, N %d)",
            num_rounds,
            self.projected_epsilon,
            self.ledger.target_delta,
            self.client_sampling,
            plan.sampling_rate,
            plan.num_nodes,
        )
        if self.target_epsilon is not None and self.projected_epsilon > self.target_epsilon:
            affordable = self.ledger.affordable_rounds(plan.event, self.target_epsilon, remaining)
            log(
                WARNING,
                "DP-FedAvg: target-epsilon %g allows only %d of %d rounds; later rounds "
                "will not be run",
                self.target_epsilon,
                affordable,
                num_rounds,
            )
        return super().start(
            grid,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
            on_round_end=on_round_end,
            start_round=start_round,
        )
