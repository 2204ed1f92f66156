"""Aggregation stages: what turns a round's validated replies into the averaged model.

In the manner of TensorFlow Federated's aggregator factories
(``tff.aggregators``: ``MeanFactory`` wrapped by clipping and noising
factories), the FedAvg loop (:class:`~strategies.fedavg.FedAvg`) owns
sampling, messaging, reply triage and the server step, and delegates the
aggregate itself to a stage. :class:`WeightedMean` is FedAvg's
example-weighted mean; :class:`~strategies.dp_aggregation.DPAggregation`
is DP-FedAvg's clip -> uniform mean over a fixed denominator -> Gaussian
noise. Robust aggregators and secure aggregation plug in the same way.

A stage may also shape the round around the aggregate: stop before a round
(a privacy budget), draw the sample itself (DP sampling from secret
randomness), add keys to the train config (client-side clipping). Its state
survives restarts through ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from flwr.common.logger import log

from secagg.parameters import SecAggParameters
from secagg.vectors import WEIGHTED, DecodedSum, VectorSpec, unflatten

from .aggregation import finite_weighted_mean
from .anomaly import ClientFigures
from .validation import TrainReply


@dataclass
class Aggregate:
    """What a stage makes of one round's replies.

    Attributes
    ----------
    arrays : dict of str to ndarray, or None
        The averaged model (``x_t`` plus the aggregated update); ``None``
        leaves the global model as it is.
    used : list of TrainReply
        The replies that entered the aggregate (their metrics are averaged).
    rejected : dict of int to str
        Node id -> why its reply was left out.
    metrics : dict of str to float
        The stage's own figures for the round (DP: epsilon, noise stddev ...).
    down_weighted : dict of int to str
        Node id -> how a valid reply was excluded or down-weighted by a robust
        stage (Krum's exclusions, norm bounding's clipping).
    client_figures : list of ClientFigures, or None
        Every valid reply's norm and cosine, when the stage got them for free
        (Krum, from its Gram matrix); ``None`` lets FedAvg compute them.
    """

    arrays: dict[str, np.ndarray] | None
    used: list[TrainReply]
    rejected: dict[int, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    down_weighted: dict[int, str] = field(default_factory=dict)
    client_figures: list[ClientFigures] | None = None
    #: Secure aggregation: the round's train metrics, from the sum (no reply is seen).
    train_metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class AggregationStage(Protocol):
    """One way to aggregate a round; see the module docstring."""

    #: Whether per-client figures (update norms, similarities) may be released:
    #: False where they would break a guarantee (DP-FedAvg).
    per_client_report: bool

    def summary(self) -> None:
        """Log the stage's settings."""

    def on_start(self, node_ids: Sequence[int], first_round: int, num_rounds: int) -> None:
        """Called once before the first round this process runs (projections, warnings)."""

    def stop_reason(self, server_round: int, node_ids: Sequence[int]) -> str | None:
        """Why round ``server_round`` must not run, or ``None``; public inputs only."""

    def sample(
        self, server_round: int, node_ids: Sequence[int], rng: np.random.Generator
    ) -> list[int] | None:
        """The nodes that train this round, or ``None`` for the loop's own sampling."""

    def client_config(self, server_round: int) -> dict[str, Any]:
        """Keys the round's train config must carry for this stage."""

    def aggregate(
        self,
        server_round: int,
        replies: Sequence[TrainReply],
        reference: Mapping[str, np.ndarray],
    ) -> Aggregate:
        """The averaged model of ``replies``, whose keys and shapes match ``reference``."""

    def account_released_rounds(self, rounds: int, journal: Sequence[Mapping[str, Any]]) -> None:
        """Charge rounds released after the state being resumed (a no-op unless the stage spends privacy)."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state that must survive a restart."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into a freshly built stage."""


@runtime_checkable
class SecureAggregationStage(AggregationStage, Protocol):
    """A stage that can also aggregate from a secure sum (:mod:`strategies.secure_aggregation`)."""

    def secure_vector_spec(
        self, server_round: int, parameters: SecAggParameters, num_parameters: int,
        num_clients: int,
    ) -> VectorSpec:
        """What each client puts into the round's secure sum."""

    def min_survivors(self, parameters: SecAggParameters, num_clients: int) -> int:
        """Survivors below which the round must be voided (beyond the protocol's threshold)."""

    def aggregate_secure(
        self,
        server_round: int,
        decoded: DecodedSum,
        spec: VectorSpec,
        num_contributors: int,
        reference: Mapping[str, np.ndarray],
    ) -> Aggregate:
        """The averaged model from the decoded sum of ``num_contributors`` vectors."""

    def void_secure(self, server_round: int) -> None:
        """A secure round released nothing."""


class StageDefaults:
    """The hooks of a stage that only aggregates: no stop, the loop's sampling, no state.

    A stage inherits these and overrides what it needs (its ``aggregate``).
    """

    per_client_report = True

    def summary(self) -> None:
        """Log the stage."""
        log(INFO, "Aggregator: %r", self)

    def on_start(self, node_ids: Sequence[int], first_round: int, num_rounds: int) -> None:
        """Nothing to project."""

    def stop_reason(self, server_round: int, node_ids: Sequence[int]) -> str | None:
        """Never stops a round."""
        return None

    def sample(
        self, server_round: int, node_ids: Sequence[int], rng: np.random.Generator
    ) -> list[int] | None:
        """The loop's own sampling."""
        return None

    def client_config(self, server_round: int) -> dict[str, Any]:
        """No extra keys."""
        return {}

    def account_released_rounds(self, rounds: int, journal: Sequence[Mapping[str, Any]]) -> None:
        """No privacy is spent."""

    def state_dict(self) -> dict[str, Any]:
        """No state."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """No state."""


class WeightedMean(StageDefaults):
    """FedAvg's aggregate: the mean of the replies' models weighted by num-examples.

    McMahan et al. (2017), "Communication-Efficient Learning of Deep Networks
    from Decentralized Data", https://arxiv.org/abs/1602.05629, Algorithm 1.
    One pass over the replies' bytes both averages and screens for NaN/Inf
    (:func:`~strategies.aggregation.finite_weighted_mean`); a reply holding
    either is left out. No state.
    """

    def summary(self) -> None:
        """Nothing beyond FedAvg's own summary."""

    def aggregate(
        self,
        server_round: int,
        replies: Sequence[TrainReply],
        reference: Mapping[str, np.ndarray],
    ) -> Aggregate:
        """Example-weighted mean of the finite replies (``None`` if none is left)."""
        if not replies:
            return Aggregate(None, [])
        mean, rejected = finite_weighted_mean(
            [reply.arrays for reply in replies], [reply.num_examples for reply in replies]
        )
        dropped = set(rejected)
        return Aggregate(
            mean,
            [reply for index, reply in enumerate(replies) if index not in dropped],
            {replies[index].node_id: "arrays hold NaN or Inf" for index in rejected},
        )

    # ------------------------------------------------------- secure aggregation
    def secure_vector_spec(
        self, server_round: int, parameters: SecAggParameters, num_parameters: int,
        num_clients: int,
    ) -> VectorSpec:
        """Clients send ``(w / W) Delta`` and their capped weight ``w`` into the secure sum."""
        return VectorSpec(
            WEIGHTED,
            parameters.clipping_range,
            parameters.quantization_bits,
            parameters.modulus_bits,
            max_weight=parameters.max_weight,
        )

    def min_survivors(self, parameters: SecAggParameters, num_clients: int) -> int:
        """No floor beyond the protocol's own threshold."""
        return 0

    def aggregate_secure(
        self,
        server_round: int,
        decoded: DecodedSum,
        spec: VectorSpec,
        num_contributors: int,
        reference: Mapping[str, np.ndarray],
    ) -> Aggregate:
        """``x_t + W sum_k (w_k / W) Delta_k / sum_k w_k``: FedAvg's mean from the secure sum."""
        weight = decoded.weight_total or 0
        metrics = {"secagg-clamped-coordinates": float(decoded.num_clamped or 0)}
        if weight <= 0:
            return Aggregate(None, [], metrics=metrics)
        if decoded.num_clamped:
            log(
                WARNING,
                "Round %d: %d update coordinates fell outside secagg-clipping-range %g and "
                "were clamped; raise it if this persists",
                server_round,
                decoded.num_clamped,
                spec.clipping_range,
            )
        mean_update = unflatten(decoded.update_sum * (spec.max_weight / weight), reference)
        averaged = {
            key: (np.asarray(ref, np.float64) + mean_update[key]).astype(np.asarray(ref).dtype)
            for key, ref in reference.items()
        }
        return Aggregate(averaged, [], metrics=metrics,
                         train_metrics={"num-examples": float(weight)})

    def void_secure(self, server_round: int) -> None:
        """Nothing to undo: the mean holds no state."""

    def __repr__(self) -> str:
        return "WeightedMean()"
