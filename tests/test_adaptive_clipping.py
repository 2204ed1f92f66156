"""Adaptive clipping (Andrew et al. 2021): convergence, tf-privacy parity, Flower's defect."""

from __future__ import annotations

import sys

import dp_accounting
import numpy as np
import pytest

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import dp_adaptive_clipping as flower_adaptive
from flwr.supercore.task_identity import TaskIdentity

from privacy.accounting import PrivacyLedger, effective_noise_multiplier, round_event
from privacy.adaptive_clipping import (
    QuantileClipEstimator,
    geometric_update,
    noised_unclipped_fraction,
    split_noise_multiplier,
)
from privacy.clipping import clip_update, sum_arrays
from strategies.dp_fedavg import DPFedAvg
from strategies.fedavg import to_arrayrecord
from strategies.validation import TrainReply

DIM = 6
LOW, HIGH = 1.0, 10.0  # update norms ~ U(1, 10): the gamma-quantile is 1 + 9 gamma


pytestmark = pytest.mark.usefixtures("task_identity")


class StaticGrid:
    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def updates_with_norms(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    directions = rng.normal(size=(count, DIM))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return list(directions * rng.uniform(LOW, HIGH, size=(count, 1)))


# ------------------------------------------------------------------ formulas
def test_noise_split_keeps_the_total_multiplier() -> None:
    for z, sigma_b in [(1.0, 5.0), (0.5, 0.3), (3.0, 10.0)]:
        z_update = split_noise_multiplier(z, sigma_b)
        assert z_update > z
        assert z_update**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2, rel=1e-12)
        assert effective_noise_multiplier([z_update, 2 * sigma_b]) == pytest.approx(z, rel=1e-12)
    with pytest.raises(ValueError):
        split_noise_multiplier(1.0, 0.5)  # z >= 2 sigma_b: impossible
    assert split_noise_multiplier(0.0, 1.0) == 0.0


def test_geometric_update_direction_uses_unclipped_fraction() -> None:
    # more updates unclipped than the target: the norm must shrink, and vice versa
    assert geometric_update(5.0, 0.9, 0.5, 0.2) < 5.0
    assert geometric_update(5.0, 0.1, 0.5, 0.2) > 5.0
    assert geometric_update(5.0, 0.5, 0.5, 0.2) == 5.0
    rng = np.random.default_rng(0)
    assert noised_unclipped_fraction([True] * 10, 10, 0.0, rng) == 1.0
    # a missing client (expected 10, 9 reports) counts half: (5 - 4.5 + 0) / 10 + 0.5
    assert noised_unclipped_fraction([True] * 5 + [False] * 4, 10, 0.0, rng) == pytest.approx(0.55)


# ----------------------------------------------------------------- convergence
@pytest.mark.parametrize("gamma", [0.5, 0.8])
@pytest.mark.parametrize("initial", [0.1, 100.0])
def test_estimator_converges_to_target_quantile_from_both_sides(
    gamma: float, initial: float
) -> None:
    rng = np.random.default_rng(int(initial * 10 + gamma * 100))
    m = 100
    estimator = QuantileClipEstimator(initial, target_unclipped_quantile=gamma, learning_rate=0.2)
    history = []
    for _ in range(150):
        norms = rng.uniform(LOW, HIGH, size=m)
        estimator.update(norms <= estimator.clipping_norm, m, m / 20, rng)
        history.append(estimator.clipping_norm)
    quantile = LOW + (HIGH - LOW) * gamma
    assert np.mean(history[-50:]) == pytest.approx(quantile, rel=0.08)
    if initial < quantile:  # monotone approach from below for the first rounds
        assert history[20] > history[0] and history[20] < quantile
    else:
        assert history[20] < history[0] and history[20] > quantile


@pytest.mark.parametrize("initial", [0.2, 50.0])
def test_dp_fedavg_adaptive_clipping_converges_and_noises_with_the_clip_used(
    initial: float,
) -> None:
    m, z, rounds = 100, 0.5, 100
    nodes = list(range(1, m + 1))
    reference = {"u": np.zeros(DIM, np.float64)}
    strategy = DPFedAvg(
        noise_multiplier=z,
        clipping_norm=initial,
        clipping="adaptive",
        client_sampling="fixed",
        fraction_train=1.0,
        compute_pld=False,
        seed=3,
    )
    rng = np.random.default_rng(8)
    z_update = split_noise_multiplier(z, m / 20)
    norms_used = []
    for server_round in range(1, rounds + 1):
        clip_before = strategy.clipping_norm
        list(
            strategy.configure_train(
                server_round, to_arrayrecord(reference), ConfigRecord(), StaticGrid(nodes)
            )
        )
        replies = [
            TrainReply(n, {"u": u}, 1, {})
            for n, u in zip(nodes, updates_with_norms(rng, m), strict=True)
        ]
        strategy.aggregate_arrays(server_round, replies)
        privacy = strategy.last_round_privacy
        assert privacy["clipping-norm"] == clip_before  # this round's noise uses this norm
        assert privacy["noise-stddev"] == pytest.approx(z_update * clip_before / m, rel=1e-12)
        assert privacy["next-clipping-norm"] == strategy.clipping_norm
        norms_used.append(clip_before)
    assert np.mean(norms_used[-40:]) == pytest.approx(5.5, rel=0.08)
    assert np.mean(
        [h["clipped-fraction"] for h in strategy.privacy_history[-40:]]
    ) == pytest.approx(0.5, abs=0.08)
    # accounting: z overall, whatever the split
    independent = PrivacyLedger("fixed", compute_pld=False)
    for _ in range(rounds):
        independent.compose(round_event("fixed", z, num_nodes=m, sample_size=m))
    assert strategy.ledger.epsilon == pytest.approx(independent.epsilon, rel=1e-9)


# ----------------------------------------------------------- tensorflow-privacy
def test_matches_tensorflow_privacy_quantile_adaptive_clip_sum_query() -> None:
    sys.skip_tf_privacy_import = True
    tf = pytest.importorskip("tensorflow")
    from tensorflow_privacy.privacy.dp_query.quantile_adaptive_clip_sum_query import (  # pylint: disable=import-outside-toplevel
        QuantileAdaptiveClipSumQuery,
    )

    expected, initial, gamma, lr = 10, 2.0, 0.5, 0.2
    query = QuantileAdaptiveClipSumQuery(
        initial_l2_norm_clip=initial,
        noise_multiplier=0.0,
        target_unclipped_quantile=gamma,
        learning_rate=lr,
        clipped_count_stddev=0.0,
        expected_num_records=expected,
        geometric_update=True,
    )
    state = query.initial_global_state()
    ours = QuantileClipEstimator(initial, target_unclipped_quantile=gamma, learning_rate=lr)
    rng = np.random.default_rng(5)
    for count in (10, 9, 10, 7, 10, 10):  # some rounds with clients missing
        records = [
            {"a": rng.normal(size=(3, 2)) * rng.uniform(0.2, 3.0), "b": rng.normal(size=4)}
            for _ in range(count)
        ]
        params = query.derive_sample_params(state)
        sample = query.initial_sample_state(
            {k: tf.zeros(v.shape, tf.float32) for k, v in records[0].items()}
        )
        for record in records:
            tf_record = {k: tf.constant(v, tf.float32) for k, v in record.items()}
            sample = query.accumulate_preprocessed_record(
                sample, query.preprocess_record(params, tf_record)
            )
        tf_sum, state, event = query.get_noised_result(sample, state)

        clip = ours.clipping_norm
        clipped = [clip_update(r, clip) for r in records]
        our_sum = sum_arrays((c for c, _ in clipped), records[0])
        ours.update([norm <= clip for _, norm in clipped], expected, 0.0, rng)
        for key in our_sum:
            np.testing.assert_allclose(tf_sum[key].numpy(), our_sum[key], rtol=2e-5, atol=1e-5)
        assert float(state.sum_state.l2_norm_clip) == pytest.approx(ours.clipping_norm, rel=1e-5)
    assert isinstance(event, dp_accounting.ComposedDpEvent)

    # the DP event of a noised round: same effective multiplier as ours
    z, sigma_b = 1.2, 2.0
    z_update = split_noise_multiplier(z, sigma_b)
    noisy = QuantileAdaptiveClipSumQuery(initial, z_update, gamma, lr, sigma_b, expected, True)
    noisy_state = noisy.initial_global_state()
    _, _, tf_event = noisy.get_noised_result(
        noisy.initial_sample_state({"a": tf.zeros(2)}), noisy_state
    )
    # tf-privacy's event holds float32 tensors; the accountant needs Python floats
    multipliers = [float(e.noise_multiplier) for e in tf_event.events]
    assert multipliers == pytest.approx([z_update, 2 * sigma_b], rel=1e-6)
    tf_accountant = dp_accounting.rdp.RdpAccountant()
    tf_accountant.compose(
        dp_accounting.PoissonSampledDpEvent(
            0.1,
            dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(x) for x in multipliers]),
        ),
        20,
    )
    ledger = PrivacyLedger("poisson", compute_pld=False)
    for _ in range(20):
        ledger.compose(round_event("poisson", [z_update, 2 * sigma_b], sampling_rate=0.1))
    assert ledger.epsilon == pytest.approx(tf_accountant.get_epsilon(1e-5), rel=1e-5)


# ----------------------------------------------------------------- Flower 1.42
def _flower_round(wrapper, rng: np.random.Generator, m: int, server_round: int) -> None:
    reference = {"u": np.zeros(DIM, np.float32)}
    wrapper.current_arrays = to_arrayrecord(reference)  # as its configure_train does
    replies = []
    for node, update in enumerate(updates_with_norms(rng, m), start=1):
        instruction = Message(
            RecordDict({"arrays": to_arrayrecord(reference)}),
            dst_node_id=node,
            message_type="train",
        )
        content = RecordDict(
            {
                "arrays": to_arrayrecord({"u": update.astype(np.float32)}),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )
        replies.append(Message(content, reply_to=instruction))
    wrapper.aggregate_train(server_round, replies)


@pytest.mark.parametrize("initial", [3.0, 8.0])
def test_flower_adaptive_clipping_does_not_converge(initial: float) -> None:
    """Flower's wrapper, asked for the median, runs away from it in either direction.

    It plugs the *clipped* fraction into Andrew et al.'s update, so the target
    quantile is a repelling point: starting below the median (5.5) the norm
    falls below every update norm (all clipped), starting above it grows past
    every norm (none clipped). Ours converges from the same starts.
    """
    m = 40
    wrapper = DifferentialPrivacyServerSideAdaptiveClipping(
        FlowerFedAvg(),
        noise_multiplier=0.0,
        num_sampled_clients=m,
        initial_clipping_norm=initial,
        target_clipped_quantile=0.5,
        clip_norm_lr=0.2,
    )
    rng = np.random.default_rng(1)
    for server_round in range(1, 41):
        _flower_round(wrapper, rng, m, server_round)
    if initial < 5.5:
        assert wrapper.clipping_norm < LOW  # every update clipped
    else:
        assert wrapper.clipping_norm > HIGH  # no update clipped

    ours = QuantileClipEstimator(initial, target_unclipped_quantile=0.5, learning_rate=0.2)
    for _ in range(40):
        norms = rng.uniform(LOW, HIGH, size=m)
        ours.update(norms <= ours.clipping_norm, m, 0.0, rng)
    assert ours.clipping_norm == pytest.approx(5.5, rel=0.15)


def test_flower_adaptive_clipping_noises_with_the_updated_norm(monkeypatch) -> None:
    m = 40
    wrapper = DifferentialPrivacyServerSideAdaptiveClipping(
        FlowerFedAvg(),
        noise_multiplier=1.0,
        num_sampled_clients=m,
        initial_clipping_norm=20.0,
        target_clipped_quantile=0.5,
        clip_norm_lr=0.2,
    )
    seen: list[float] = []
    real = flower_adaptive.compute_stdv

    def spy(noise_multiplier: float, clipping_norm: float, num_sampled_clients: int) -> float:
        seen.append(clipping_norm)
        return real(noise_multiplier, clipping_norm, num_sampled_clients)

    monkeypatch.setattr(flower_adaptive, "compute_stdv", spy)
    _flower_round(wrapper, np.random.default_rng(2), m, 1)
    assert seen == [wrapper.clipping_norm]
    assert seen[0] != 20.0  # the round was clipped with 20.0, noised with another norm
