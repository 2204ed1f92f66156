"""DP-FedAvg's aggregation stage: clip each update, sum, hand the sum to the Gaussian mechanism.

The mechanism itself (plan, sampling, clip rule, noise, accounting) is
:class:`privacy.central.CentralGaussian`; this stage only feeds it from the
round's replies with the fast blocked kernels of :mod:`strategies.aggregation`:
one pass for the update norms (which also catches NaN/Inf), one for the
clipped sum. McMahan et al. (2018), https://arxiv.org/abs/1710.06963.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common.logger import log

from privacy.accounting import delta_warning
from privacy.central import CentralGaussian, RoundPlan
from privacy.clipping import InvalidUpdate, check_update

from secagg.parameters import SecAggParameters
from privacy.distributed_noise import DdgRoundPlan, ddg_round_plan
from secagg.vectors import (
    CLIPPED,
    DISTRIBUTED,
    DecodedSum,
    VectorSpec,
    clip_margin,
    unflatten,
)

from .aggregation import scaled_update_sum, update_norms
from .stages import Aggregate
from .validation import TrainReply


class DPAggregation:
    """Aggregation stage of DP-FedAvg: ``x_t + sum_k clip(Delta_k) / m + N(0, (zC/m)^2)``.

    Every update that fails a check (keys, shapes, NaN/Inf, a node not
    sampled, a second reply of a node, a norm above ``C`` when clients clip)
    is a zero contribution: the denominator ``m`` is fixed before the round,
    so the round is never voided and always releases (a noise-only model if
    nothing came back), which keeps the release independent of the data.

    Parameters
    ----------
    mechanism : CentralGaussian
        The DP mechanism of the run (its settings, ledger and randomness).
    """

    #: Per-client norms and similarities are statistics of the clients' data
    #: that the guarantee does not cover: never released.
    per_client_report = False

    #: Conditional randomised rounding's beta (Kairouz, Liu, Steinke 2021's default,
    #: e^-1/2): it sets the rounded norm bound, hence the sensitivity; not a privacy knob.
    DDG_BETA = math.exp(-0.5)
    #: Standard deviations of summed noise kept clear of the modulus.
    DDG_WRAP_SIGMAS = 12.0

    def __init__(self, mechanism: CentralGaussian) -> None:
        self.mechanism = mechanism
        self._plan: RoundPlan | None = None
        self._ddg: DdgRoundPlan | None = None

    def summary(self) -> None:
        """Log the DP settings and what the guarantee covers."""
        m = self.mechanism
        log(
            INFO,
            "DP-FedAvg: noise-multiplier %.4g, clipping %s (norm %.4g, %s side), "
            "client-sampling %s (q %.4g), target-delta %.3g, target-epsilon %s%s",
            m.noise_multiplier,
            m.clipping,
            m.clipping_norm,
            m.clipping_side,
            m.client_sampling,
            m.fraction_train,
            m.ledger.target_delta,
            "none" if m.target_epsilon is None else f"{m.target_epsilon:g}",
            ""
            if m.local_dp_epsilon is None
            else f", local DP epsilon {m.local_dp_epsilon:g} delta {m.local_dp_delta:g}",
        )
        log(INFO, "DP-FedAvg: user-level epsilon under the %s relation", m.relation)
        if m.noise_multiplier == 0 and m.local_dp_epsilon is None:
            log(WARNING, "DP-FedAvg: noise-multiplier 0 gives no privacy (epsilon = inf)")
        if not m.random.private:
            log(
                WARNING,
                "DP-FedAvg: NOT PRIVATE: the DP noise and sampling come from %r, which anyone "
                "knowing the seed replays; for tests only",
                m.random,
            )

    def on_start(self, node_ids: Sequence[int], first_round: int, num_rounds: int) -> None:
        """Log the projected epsilon of the rounds left, and what a budget allows."""
        m = self.mechanism
        plan = m.plan_round(first_round, node_ids)
        remaining = max(num_rounds - first_round + 1, 0)
        m.projected_epsilon = m.project(plan, remaining)
        log(
            INFO,
            "DP-FedAvg: projected epsilon after %d rounds: %.4g at delta %.3g "
            "(RDP, %s sampling, q %.4g, N %d)",
            num_rounds,
            m.projected_epsilon,
            m.ledger.target_delta,
            m.client_sampling,
            plan.sampling_rate,
            plan.num_nodes,
        )
        if m.target_epsilon is not None and m.projected_epsilon > m.target_epsilon:
            affordable = m.ledger.affordable_rounds(plan.event, m.target_epsilon, remaining)
            log(
                WARNING,
                "DP-FedAvg: target-epsilon %g allows only %d of %d rounds; later rounds "
                "will not be run",
                m.target_epsilon,
                affordable,
                num_rounds,
            )

    def stop_reason(self, server_round: int, node_ids: Sequence[int]) -> str | None:
        """Why the round would break the budget; plans the round otherwise."""
        plan = self.mechanism.plan_round(server_round, node_ids)
        reason = self.mechanism.stop_reason(plan)
        self._plan = None if reason is not None else plan
        if reason is None and (
            warning := delta_warning(self.mechanism.ledger.target_delta, plan.num_nodes)
        ):
            log(WARNING, "DP-FedAvg: %s", warning)
        return reason

    def sample(
        self, server_round: int, node_ids: Sequence[int], rng: np.random.Generator
    ) -> list[int]:
        """Poisson or fixed-size sample from secret randomness (``rng`` is not used)."""
        plan = self._plan
        if plan is None or plan.server_round != server_round or plan.sampled is not None:
            plan = self._plan = self.mechanism.plan_round(server_round, node_ids)
        return self.mechanism.sample(plan)

    def client_config(self, server_round: int) -> dict[str, Any]:
        """``clipping-norm`` (client-side clipping) and the local-DP keys."""
        if self._plan is None:
            raise RuntimeError("client_config needs a planned round")
        return self.mechanism.client_config(self._plan)

    @property
    def planned(self) -> bool:
        """Whether a round is planned (else the round was not run)."""
        return self._plan is not None

    def aggregate(
        self,
        server_round: int,
        replies: Sequence[TrainReply],
        reference: Mapping[str, np.ndarray],
    ) -> Aggregate:
        """Check, measure and clip every update; the noised averaged model (float64)."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("aggregate needs a planned round (configure_train)")
        sampled = None if plan.sampled is None else set(plan.sampled)
        rejected: dict[int, str] = {}

        def reject(node: int, reason: InvalidUpdate) -> None:
            rejected[node] = f"update rejected, counts as zero: {reason}"
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

        kept: list[TrainReply] = []
        kept_norms: list[float] = []
        factors: list[float] = []
        unclipped: list[bool] = []
        seen: set[int] = set()
        for reply, norm in zip(candidates, norms):
            try:
                if reply.node_id in seen:
                    raise InvalidUpdate("more than one reply from this node")
                factor, is_unclipped = self.mechanism.admit(float(norm), plan)
            except InvalidUpdate as reason:
                reject(reply.node_id, reason)
                continue
            seen.add(reply.node_id)
            kept.append(reply)
            kept_norms.append(float(norm))
            factors.append(factor)
            unclipped.append(bool(is_unclipped))
        clipped_sum = scaled_update_sum(
            [reply.arrays for reply in kept], reference, factors, kept_norms
        )
        mean = self.mechanism.release(server_round, plan, clipped_sum, unclipped, len(rejected))
        averaged = {
            key: np.asarray(ref, dtype=np.float64) + mean[key] for key, ref in reference.items()
        }
        return Aggregate(averaged, kept, rejected, dict(self.mechanism.last_round_privacy))

    # ------------------------------------------------------- secure aggregation
    def secure_vector_spec(
        self, server_round: int, parameters: SecAggParameters, num_parameters: int,
        num_clients: int,
    ) -> VectorSpec:
        """Clients clip to ``C`` (less the rounding margin) and send the clip bit into the sum.

        The quantisation range is ``C`` itself: no coordinate of a clipped
        update exceeds it, so nothing is clamped and the sensitivity stays ``C``.
        """
        plan = self._plan
        if plan is None:
            raise RuntimeError("secure_vector_spec needs a planned round (configure_train)")
        if self.mechanism.noise_placement == "distributed":
            return self._distributed_spec(parameters, num_parameters, num_clients)
        spec = VectorSpec(
            CLIPPED, plan.clipping_norm, parameters.quantization_bits, parameters.modulus_bits
        )
        if clip_margin(spec, num_parameters) > plan.clipping_norm / 2:
            raise ValueError(
                f"secagg-quantization-bits {parameters.quantization_bits} is too coarse for "
                f"{num_parameters} parameters: stochastic rounding could add "
                f"{clip_margin(spec, num_parameters):.3g} to a norm clipped to "
                f"{plan.clipping_norm:.3g}"
            )
        return spec

    def check_secure(
        self, parameters: SecAggParameters, num_parameters: int, num_nodes: int
    ) -> None:
        """ValueError unless a secure round of all ``num_nodes`` can be encoded (before round 1)."""
        saved = self._plan, self._ddg
        try:
            self._plan = self.mechanism.plan_round(1, list(range(num_nodes)))
            self.secure_vector_spec(1, parameters, num_parameters, num_nodes)
        finally:
            self._plan, self._ddg = saved

    def min_survivors(self, parameters: SecAggParameters, num_clients: int) -> int:
        """Distributed noise: the survivors whose noise the accounting counts on (else 0)."""
        if self.mechanism.noise_placement != "distributed":
            return 0
        return parameters.threshold_of(num_clients)

    def _distributed_spec(
        self, parameters: SecAggParameters, num_parameters: int, num_clients: int
    ) -> VectorSpec:
        """The DDG encoding: ``s = 2^(b-1) / C``; each client's share of ``z s C`` noise.

        The noise is sized for the ``t`` survivors the round is guaranteed
        (:meth:`min_survivors`); more survivors only add noise. Refused when
        the sum of ``num_clients`` vectors could wrap around the modulus.
        """
        plan = self._plan
        assert plan is not None
        clip = plan.clipping_norm
        scale = parameters.half_range / clip
        ddg = ddg_round_plan(
            clip, num_parameters, scale, self.DDG_BETA, self.mechanism.noise_multiplier,
            self.min_survivors(parameters, num_clients),
            replace_one=self.mechanism.client_sampling == "fixed",
        )
        reach = num_clients * ddg.rounding_bound + self.DDG_WRAP_SIGMAS * math.sqrt(
            num_clients
        ) * ddg.local_sigma
        if reach >= parameters.modulus // 2:
            raise ValueError(
                f"the noised sum of {num_clients} clients could reach {reach:.3g}, beyond "
                f"the modulus 2^{parameters.modulus_bits} / 2: lower secagg-quantization-bits "
                "or raise secagg-modulus-bits"
            )
        self._ddg = ddg
        return VectorSpec(
            DISTRIBUTED, clip, parameters.quantization_bits, parameters.modulus_bits,
            scale=scale, norm_bound=ddg.rounding_bound, local_noise_stddev=ddg.local_sigma,
        )

    def aggregate_secure(
        self,
        server_round: int,
        decoded: DecodedSum,
        spec: VectorSpec,
        num_contributors: int,
        reference: Mapping[str, np.ndarray],
    ) -> Aggregate:
        """Noise on the unmasked sum of clipped updates and charge the ledger, as without SecAgg.

        The server never sees one update: it cannot reject any (clients
        clipped their own); adaptive clipping gets the number of unclipped
        updates from the secure sum, not who they were.
        """
        plan = self._plan
        if plan is None:
            raise RuntimeError("aggregate_secure needs a planned round (configure_train)")
        if spec.kind == DISTRIBUTED:
            assert self._ddg is not None
            if num_contributors < self._ddg.min_clients:
                raise RuntimeError("fewer survivors than the noise was sized for")
            mean = self.mechanism.release_distributed(
                server_round, plan, unflatten(decoded.update_sum, reference), num_contributors,
                self._ddg,
            )
            averaged = {
                key: np.asarray(ref, dtype=np.float64) + mean[key]
                for key, ref in reference.items()
            }
            return Aggregate(averaged, [], {}, dict(self.mechanism.last_round_privacy))
        unclipped_count = int(decoded.num_unclipped or 0)
        if not 0 <= unclipped_count <= num_contributors:
            # Only a client sending a clip "bit" other than 0/1 gets here.
            log(WARNING, "Round %d: the secure sum holds %d unclipped bits for %d "
                "contributors (a client sent a bad bit); clamped", server_round,
                unclipped_count, num_contributors)
            unclipped_count = min(max(unclipped_count, 0), num_contributors)
        unclipped = [True] * unclipped_count + [False] * (num_contributors - unclipped_count)
        clipped_sum = unflatten(decoded.update_sum, reference)
        mean = self.mechanism.release(server_round, plan, clipped_sum, unclipped, 0)
        averaged = {
            key: np.asarray(ref, dtype=np.float64) + mean[key] for key, ref in reference.items()
        }
        return Aggregate(averaged, [], {}, dict(self.mechanism.last_round_privacy))

    def void_secure(self, server_round: int) -> None:
        """A voided secure round releases nothing, so nothing is charged."""
        log(INFO, "Round %d: nothing released, no privacy spent", server_round)

    def account_released_rounds(self, rounds: int, journal: Sequence[Mapping[str, Any]]) -> None:
        """Charge released rounds the resumed state lacks (:meth:`PrivacyLedger.charge_released`)."""
        self.mechanism.ledger.charge_released(rounds, journal)

    def state_dict(self) -> dict[str, Any]:
        """The mechanism's state (no random state exists)."""
        return self.mechanism.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the mechanism's state."""
        self.mechanism.load_state_dict(state)
