"""DP-FedAvg: FedAvg composed with the central Gaussian mechanism as its aggregation stage.

Implementation of DP-FedAvg with the fixed-denominator estimator of McMahan,
Ramage, Talwar, Zhang (2018), "Learning Differentially Private Recurrent
Language Models", https://arxiv.org/abs/1710.06963, and of adaptive clipping
from Andrew, Thakkar, McMahan, Ramaswamy (2021), "Differentially Private
Learning with Adaptive Clipping", https://arxiv.org/abs/1905.03871.

Each round the budget is checked on public parameters, clients are sampled
(Poisson with ``q = fraction-train``, or exactly ``round(q N)``) from secret
OS randomness, each update is clipped to ``C`` (on the server, or by the
clients with ``clipping-side = client``), the clipped updates are averaged
with uniform weights over a fixed denominator ``m`` (``q N`` or the sample
size), so that a client's influence is ``C / m`` whatever it reports, and
``N(0, (z C / m)^2)`` noise is added; a server optimiser (or the server
learning rate) then steps along the noised mean, which is post-processing.
With adaptive clipping the noised unclipped fraction moves ``C``. The
mechanism is :class:`privacy.central.CentralGaussian`; the stage that feeds
it from replies is :class:`strategies.dp_aggregation.DPAggregation`; the loop
is :class:`strategies.fedavg.FedAvg`, unchanged.

The guarantee covers the sequence of released global models (user level,
trusted server); not the client metrics, federated evaluation, or the counts
of sampled/accepted clients (see README, "Threat model").

Flower 1.42's DP wrappers differ on each of these points (example-weighted
mean under ``z C / m`` noise, adaptive clipping driven by the clipped fraction
and noised with the updated norm, ZeroDivisionError on a zero update, whole
round skipped on one failed client, no sampling amplification in its
accountant).

The server's arithmetic reads each reply twice, block by block in cache and
with no per-client temporary: once for the update norms
(:func:`~strategies.aggregation.update_norms`, which also catches NaN/Inf),
once for the clipped sum (:func:`~strategies.aggregation.scaled_update_sum`).

Client metrics (``train-loss`` ...) are averaged as in FedAvg and are *not*
covered by the DP guarantee; neither is federated evaluation. The guarantee is
about the sequence of global models (trusted-server, central DP).
"""

from __future__ import annotations

from collections.abc import Callable


from privacy.accounting import DEFAULT_TARGET_DELTA, PrivacyLedger, Sampling
from privacy.adaptive_clipping import (
    DEFAULT_CLIPPING_LEARNING_RATE,
    DEFAULT_TARGET_UNCLIPPED_QUANTILE,
    QuantileClipEstimator,
)
from privacy.central import (
    CentralGaussian,
    ClippingMode,
    ClippingSide,
    NoisePlacement,
    RoundPlan,
)
from privacy.randomness import random_source

from . import protocol
from .dp_aggregation import DPAggregation
from .fedavg import FedAvg, ServerUpdateFn
from .secure_aggregation import SecAggPlus
from .server_optimizers import ServerOptimizer, ServerSGD

# Train-config keys sent to clients that must clip or noise their own update.
CONFIG_CLIPPING_NORM = protocol.CLIPPING_NORM
CONFIG_LOCAL_DP_EPSILON = protocol.LOCAL_DP_EPSILON
CONFIG_LOCAL_DP_DELTA = protocol.LOCAL_DP_DELTA
CONFIG_LOCAL_DP_STDDEV = protocol.LOCAL_DP_STDDEV


# pylint: disable=too-many-instance-attributes
class DPFedAvg(FedAvg):
    """Federated Averaging with user-level differential privacy (DP-FedAvg).

    :class:`~strategies.fedavg.FedAvg` built with a
    :class:`~strategies.dp_aggregation.DPAggregation` stage around a
    :class:`~privacy.central.CentralGaussian` mechanism; this class only
    assembles them from keyword settings and names their figures. After every
    aggregated round :attr:`last_round_privacy` holds that round's DP metrics
    and :attr:`ledger` the running epsilon.

    Parameters
    ----------
    noise_multiplier, clipping_norm, clipping, clipping_side, client_sampling,
    target_delta, target_epsilon, target_unclipped_quantile, clipping_learning_rate,
    clipped_count_stddev, local_dp_epsilon, local_dp_delta, compute_pld
        As in :class:`~privacy.central.CentralGaussian`.
    server_learning_rate : float (default: 1.0)
        ``eta_s``: the global model moves by ``eta_s`` times the noised mean
        update (a :class:`~strategies.server_optimizers.ServerSGD` step). Not
        used when ``server_optimizer`` is given.
    server_optimizer : ServerOptimizer | None (default: None)
        Server optimiser stepping along the noised mean (post-processing).
    server_update_fn : ServerUpdateFn | None (default: None)
        As in FedAvg, applied to the released model; it must use only public
        data for the guarantee to hold.
    insecure_dp_seed : int | None (default: None)
        FOR TESTS ONLY: draw the DP noise and sampling from a generator seeded
        with this value, so anyone knowing it replays the noise: the run is
        NOT PRIVATE and says so. ``None`` (always, in real runs): fresh OS
        entropy every round, never saved, never replayed.
    secure_aggregation : SecAggPlus | None (default: None)
        Train through SecAgg+: clients clip (``clipping_side`` is then
        "client") and mask; the server adds the noise to the unmasked sum.
    noise_placement : {"central", "distributed"} (default: "central")
        With secure aggregation, "distributed" has each client add its share
        of a distributed discrete Gaussian before masking (Kairouz, Liu,
        Steinke 2021, https://arxiv.org/abs/2102.06387): no party sees a
        noiseless sum. Fixed clipping only.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, node_wait_timeout, seed
        As in FedAvg. ``fraction_train`` is ``q``; ``seed`` seeds only what is
        not privacy-relevant (evaluation sampling).
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
        insecure_dp_seed: int | None = None,
        secure_aggregation: SecAggPlus | None = None,
        noise_placement: NoisePlacement = "central",
    ) -> None:
        if not server_learning_rate > 0:
            raise ValueError(f"server-learning-rate must be positive, got {server_learning_rate}")
        mechanism = CentralGaussian(
            noise_multiplier=noise_multiplier,
            clipping_norm=clipping_norm,
            clipping=clipping,
            # Under secure aggregation the server never holds an update to clip.
            clipping_side="client" if secure_aggregation is not None else clipping_side,
            client_sampling=client_sampling,
            fraction_train=fraction_train,
            min_train_nodes=min_train_nodes,
            target_delta=target_delta,
            target_epsilon=target_epsilon,
            target_unclipped_quantile=target_unclipped_quantile,
            clipping_learning_rate=clipping_learning_rate,
            clipped_count_stddev=clipped_count_stddev,
            local_dp_epsilon=local_dp_epsilon,
            local_dp_delta=local_dp_delta,
            compute_pld=compute_pld,
            random=random_source(insecure_dp_seed),
            noise_placement=noise_placement,
        )
        if noise_placement == "distributed" and secure_aggregation is None:
            raise ValueError("distributed noise needs secure aggregation")
        if server_optimizer is None and server_learning_rate != 1.0:
            server_optimizer = ServerSGD(float(server_learning_rate))
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            node_wait_timeout=node_wait_timeout,
            seed=seed,
            server_optimizer=server_optimizer,
            server_update_fn=server_update_fn,
            aggregator=DPAggregation(mechanism),
            secure_aggregation=secure_aggregation,
        )
        self.mechanism = mechanism
        self.server_learning_rate = float(server_learning_rate)

    # ---------------------------------------------------- the mechanism's figures
    @property
    def stage(self) -> DPAggregation:
        """The DP aggregation stage."""
        assert isinstance(self.aggregator, DPAggregation)
        return self.aggregator

    @property
    def ledger(self) -> PrivacyLedger:
        """The running user-level epsilon."""
        return self.mechanism.ledger

    @property
    def last_round_privacy(self) -> dict[str, float]:
        """The last released round's DP figures (kebab-case keys, floats)."""
        return self.mechanism.last_round_privacy

    @property
    def privacy_history(self) -> list[dict[str, float]]:
        """Every released round's DP figures, with its ``round``."""
        return self.mechanism.privacy_history

    @property
    def clip_estimator(self) -> QuantileClipEstimator:
        """The clipping norm's state."""
        return self.mechanism.clip_estimator

    @property
    def clipping_norm(self) -> float:
        """The norm the next round clips with."""
        return self.mechanism.clipping_norm

    @property
    def client_sampling(self) -> Sampling:
        """``poisson`` or ``fixed``."""
        return self.mechanism.client_sampling

    @property
    def noise_multiplier(self) -> float:
        """``z``."""
        return self.mechanism.noise_multiplier

    @property
    def projected_epsilon(self) -> float | None:
        """Epsilon projected at the start for the whole run."""
        return self.mechanism.projected_epsilon

    @property
    def private(self) -> bool:
        """Whether the guarantee holds (noise on, no replayable seed)."""
        return self.mechanism.private

    @property
    def on_privacy_spent(self) -> Callable[[int, PrivacyLedger], None] | None:
        """Called as ``(server_round, ledger)`` after a round is charged, before its release."""
        return self.mechanism.on_privacy_spent

    @on_privacy_spent.setter
    def on_privacy_spent(self, hook: Callable[[int, PrivacyLedger], None] | None) -> None:
        self.mechanism.on_privacy_spent = hook

    @property
    def _plan(self) -> RoundPlan | None:
        """The planned round (tests and benchmarks plan rounds by hand)."""
        return self.stage._plan  # pylint: disable=protected-access

    @_plan.setter
    def _plan(self, plan: RoundPlan | None) -> None:
        self.stage._plan = plan  # pylint: disable=protected-access
        self._round_skipped = plan is None

    def plan_round(self, server_round: int, node_ids: list[int]) -> RoundPlan:
        """The public parameters of a round with ``node_ids`` connected (no side effects)."""
        return self.mechanism.plan_round(server_round, node_ids)

    def project(self, num_rounds: int, node_ids: list[int]) -> float:
        """Epsilon after ``num_rounds`` more rounds like the next one (RDP)."""
        return self.mechanism.project(self.plan_round(1, node_ids), num_rounds)


__all__ = ["DPFedAvg"]
