"""DPFedAvg end to end with a fake grid: sampling, validation, budget, local DP, no TF."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from collections.abc import Callable

import dp_accounting
import numpy as np
import pytest

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from privacy.accounting import fixed_sample_size, local_dp_epsilon
from privacy.clipping import NORM_TOLERANCE, clip_to_reference, l2_norm
from strategies.dp_fedavg import (
    CONFIG_CLIPPING_NORM,
    CONFIG_LOCAL_DP_DELTA,
    CONFIG_LOCAL_DP_EPSILON,
    DPFedAvg,
)
from privacy.central import poisson_sample
from strategies.fedavg import to_arrayrecord, to_numpy
from privacy.local_dp import local_dp_noise_stddev, privatize_arrays
from strategies.validation import TrainReply

Arrays = dict[str, np.ndarray]
# respond(node_id, global_arrays, config) -> arrays to send, or None for no reply
Responder = Callable[[int, Arrays, ConfigRecord], Arrays | None]


pytestmark = pytest.mark.usefixtures("task_identity")


class FakeGrid:
    """Nodes that answer train messages with ``respond`` and evaluate messages with metrics."""

    def __init__(self, node_ids: list[int], respond: Responder, num_examples: int = 10) -> None:
        self.node_ids = node_ids
        self.respond = respond
        self.num_examples = num_examples
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            if message.metadata.message_type != MessageType.TRAIN:
                metrics = MetricRecord({"num-examples": self.num_examples, "eval-loss": 1.0})
                replies.append(Message(RecordDict({"metrics": metrics}), reply_to=message))
                continue
            self.sent.append(message)
            arrays = to_numpy(message.content.array_records["arrays"])
            config = message.content.config_records["config"]
            out = self.respond(message.metadata.dst_node_id, arrays, config)
            if out is None:
                continue
            content = RecordDict(
                {
                    "arrays": to_arrayrecord(out),
                    "metrics": MetricRecord({"num-examples": self.num_examples, "train-loss": 1.0}),
                }
            )
            replies.append(Message(content, reply_to=message))
        return replies


def initial(dim: int = 8) -> Arrays:
    return {"w": np.zeros((dim // 2, 2), np.float32), "b": np.zeros(dim // 2, np.float32)}


def run_round(strategy: DPFedAvg, grid: FakeGrid, arrays: Arrays, server_round: int = 1):
    messages = list(
        strategy.configure_train(server_round, to_arrayrecord(arrays), ConfigRecord(), grid)
    )
    replies = grid.send_and_receive(messages)
    record, _ = strategy.aggregate_train(server_round, replies)
    return None if record is None else to_numpy(record), messages


def constant_update(value: float) -> Responder:
    def respond(node: int, arrays: Arrays, config: ConfigRecord) -> Arrays:
        return {k: (v + value).astype(v.dtype) for k, v in arrays.items()}

    return respond


# ------------------------------------------------------------------- sampling
def test_poisson_sampling_is_binomial_and_fixed_is_exact() -> None:
    rng = np.random.default_rng(3)
    nodes = list(range(200))
    sizes = [len(poisson_sample(nodes, 0.1, rng)) for _ in range(2000)]
    assert abs(np.mean(sizes) - 20.0) < 0.3  # sd of the mean ~ 0.095
    assert abs(np.var(sizes) - 200 * 0.1 * 0.9) < 2.0
    assert fixed_sample_size(200, 0.1) == 20
    assert fixed_sample_size(10, 0.25) == 3  # round half up: 2.5 -> 3

    strategy = DPFedAvg(
        noise_multiplier=0.0,
        clipping_norm=1.0,
        client_sampling="fixed",
        fraction_train=0.25,
        seed=1,
    )
    grid = FakeGrid(list(range(1, 41)), constant_update(0.0))
    for server_round in range(1, 4):
        _, messages = run_round(strategy, grid, initial(), server_round)
        targets = [m.metadata.dst_node_id for m in messages]
        assert len(targets) == len(set(targets)) == 10
    assert strategy.last_round_privacy["expected-clients"] == 10.0


def test_poisson_denominator_is_expected_count_not_sample_size() -> None:
    sizes = set()
    for seed in range(6):
        strategy = DPFedAvg(noise_multiplier=0.0, clipping_norm=10.0, fraction_train=0.3, seed=seed)
        grid = FakeGrid(list(range(1, 21)), constant_update(0.5))  # every update is within C
        new, messages = run_round(strategy, grid, initial())
        sizes.add(len(messages))
        np.testing.assert_allclose(new["w"], 0.5 * len(messages) / 6.0, rtol=1e-6)  # m = q N = 6
    assert len(sizes) > 1


def test_empty_poisson_sample_still_releases_noise_and_is_accounted() -> None:
    strategy = DPFedAvg(noise_multiplier=1.0, clipping_norm=1.0, fraction_train=1e-9, seed=0)
    grid = FakeGrid([1, 2, 3], constant_update(1.0))
    new, messages = run_round(strategy, grid, initial())
    assert messages == []
    assert new is not None and np.all(new["w"] != 0.0)  # noise only
    assert strategy.ledger.rounds == 1


# ----------------------------------------------------------------- validation
def _setup(strategy: DPFedAvg, nodes: list[int], arrays: Arrays) -> None:
    """Plan and 'send' a round so that aggregate_arrays can be called directly."""
    grid = FakeGrid(nodes, constant_update(0.0))
    list(strategy.configure_train(1, to_arrayrecord(arrays), ConfigRecord(), grid))


def test_zero_nan_inf_and_malformed_updates_do_not_crash_or_leak(caplog) -> None:
    ref = initial()
    strategy = DPFedAvg(
        noise_multiplier=0.0, clipping_norm=1.0, client_sampling="fixed", fraction_train=1.0
    )
    _setup(strategy, [1, 2, 3, 4, 5, 6], ref)
    good = {k: v + 0.1 for k, v in ref.items()}
    nan = {k: v.copy() for k, v in ref.items()}
    nan["w"][0, 0] = np.nan
    inf = {k: v.copy() for k, v in ref.items()}
    inf["b"][1] = np.inf
    wrong_shape = {"w": np.zeros((3, 3), np.float32), "b": ref["b"]}
    wrong_keys = {"w": ref["w"], "c": ref["b"]}
    replies = [
        TrainReply(1, good, 10, {}),
        TrainReply(2, {k: v.copy() for k, v in ref.items()}, 10, {}),  # zero update
        TrainReply(3, nan, 10, {}),
        TrainReply(4, inf, 10, {}),
        TrainReply(5, wrong_shape, 10, {}),
        TrainReply(6, wrong_keys, 10, {}),
    ]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        new = strategy.aggregate_arrays(1, replies)
    for value in new.values():
        assert np.isfinite(value).all()
    # only the good update (norm 0.1 sqrt(8) < C) and the zero one contribute, over m = 6
    np.testing.assert_allclose(new["w"], 0.1 / 6, rtol=1e-6)
    privacy = strategy.last_round_privacy
    assert privacy["num-contributing"] == 2 and privacy["num-dp-rejected"] == 4
    text = caplog.text
    assert "NaN or Inf" in text and "shape" in text and "keys differ" in text


def test_huge_update_is_clipped_not_overflowed() -> None:
    ref = {"w": np.zeros(4, np.float64)}
    assert l2_norm({"w": np.full(4, 1e200)}) == pytest.approx(2e200)
    strategy = DPFedAvg(
        noise_multiplier=0.0, clipping_norm=2.0, client_sampling="fixed", fraction_train=1.0
    )
    _setup(strategy, [1, 2], ref)
    new = strategy.aggregate_arrays(
        1,
        [
            TrainReply(1, {"w": np.full(4, 1e200)}, 10**9, {}),
            TrainReply(2, {"w": np.zeros(4)}, 1, {}),
        ],
    )
    np.testing.assert_allclose(new["w"], 0.5, rtol=1e-12)  # clipped to norm 2 -> entries 1, / m=2


def test_duplicate_and_unsampled_replies_are_rejected() -> None:
    ref = initial()
    strategy = DPFedAvg(
        noise_multiplier=0.0, clipping_norm=10.0, client_sampling="fixed", fraction_train=1.0
    )
    _setup(strategy, [1, 2], ref)
    up = {k: v + 1.0 for k, v in ref.items()}
    new = strategy.aggregate_arrays(
        1, [TrainReply(1, up, 1, {}), TrainReply(1, up, 1, {}), TrainReply(9, up, 1, {})]
    )
    np.testing.assert_allclose(new["w"], 0.5)  # one contribution over m = 2
    assert strategy.last_round_privacy["num-dp-rejected"] == 2


def test_failed_clients_count_as_zero_and_round_is_not_voided() -> None:
    def respond(node: int, arrays: Arrays, config: ConfigRecord) -> Arrays | None:
        if node == 2:
            return None  # no reply
        if node == 3:
            return {"w": arrays["w"], "b": np.full(2, np.nan, np.float32)}  # shape + NaN
        return {k: v + 0.25 for k, v in arrays.items()}

    strategy = DPFedAvg(
        noise_multiplier=0.0, clipping_norm=5.0, client_sampling="fixed", fraction_train=1.0
    )
    new, _ = run_round(strategy, FakeGrid([1, 2, 3, 4], respond), initial())
    np.testing.assert_allclose(new["w"], 0.25 * 2 / 4)
    assert strategy.last_num_rejected == 1 and strategy.ledger.rounds == 1


def test_client_side_clipping_is_verified(caplog) -> None:
    clip = 0.3

    def respond(node: int, arrays: Arrays, config: ConfigRecord) -> Arrays:
        assert config[CONFIG_CLIPPING_NORM] == pytest.approx(clip)
        local = {k: v + 0.7 + 0.01 * node for k, v in arrays.items()}
        if node == 4:  # does not clip
            return local
        return clip_to_reference(local, arrays, float(config[CONFIG_CLIPPING_NORM]))

    strategy = DPFedAvg(
        noise_multiplier=0.0,
        clipping_norm=clip,
        clipping_side="client",
        client_sampling="fixed",
        fraction_train=1.0,
    )
    ref = {"w": np.full((64, 4), 0.37, np.float32), "b": np.full(4, -1.3, np.float32)}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        new, _ = run_round(strategy, FakeGrid([1, 2, 3, 4], respond), ref)
    assert "exceeds the clipping norm" in caplog.text
    assert strategy.last_round_privacy["num-contributing"] == 3
    delta = {k: new[k].astype(np.float64) - ref[k] for k in ref}
    assert l2_norm(delta) <= 3 * clip / 4 * (1 + NORM_TOLERANCE) + 1e-6


def test_server_learning_rate_and_uniform_weights() -> None:
    ref = initial()
    strategy = DPFedAvg(
        noise_multiplier=0.0,
        clipping_norm=100.0,
        client_sampling="fixed",
        fraction_train=1.0,
        server_learning_rate=0.5,
    )
    _setup(strategy, [1, 2], ref)
    a = {k: v + 1.0 for k, v in ref.items()}
    b = {k: v + 3.0 for k, v in ref.items()}
    new = strategy.aggregate_arrays(1, [TrainReply(1, a, 1, {}), TrainReply(2, b, 10_000, {})])
    np.testing.assert_allclose(new["w"], 0.5 * (1.0 + 3.0) / 2)  # num-examples ignored


# --------------------------------------------------------------------- budget
def test_target_epsilon_stops_rounds_and_projection_matches() -> None:
    q, z, delta = 0.5, 1.0, 1e-5
    grid = FakeGrid(list(range(1, 11)), constant_update(0.01))
    free = DPFedAvg(noise_multiplier=z, clipping_norm=1.0, fraction_train=q, compute_pld=False)
    free.start(grid, to_arrayrecord(initial()), num_rounds=6, evaluate_fn=None)
    assert free.ledger.rounds == 6
    assert free.projected_epsilon == pytest.approx(free.ledger.epsilon, abs=1e-9)
    epsilons = [h["epsilon"] for h in free.privacy_history]
    assert epsilons == sorted(epsilons)
    target = 0.5 * (epsilons[2] + epsilons[3])  # affords exactly 3 rounds

    grid = FakeGrid(list(range(1, 11)), constant_update(0.01))
    capped = DPFedAvg(
        noise_multiplier=z,
        clipping_norm=1.0,
        fraction_train=q,
        target_epsilon=target,
        target_delta=delta,
        compute_pld=False,
    )
    assert capped.should_stop(1, grid) is None
    result = capped.start(grid, to_arrayrecord(initial()), num_rounds=6)
    assert capped.ledger.rounds == 3
    assert capped.ledger.epsilon <= target
    assert capped.stop_reason is not None and "target-epsilon" in capped.stop_reason
    assert capped.should_stop(7) is not None  # without a grid: the nodes seen last
    # rounds 4-6 sent nothing
    assert len(grid.sent) == sum(h["num-contributing"] for h in capped.privacy_history)
    assert result.arrays is not None


def test_round_metrics_keys() -> None:
    strategy = DPFedAvg(
        noise_multiplier=1.0,
        clipping_norm=1.0,
        clipping="adaptive",
        fraction_train=1.0,
        clipped_count_stddev=1.0,
    )
    run_round(strategy, FakeGrid(list(range(1, 11)), constant_update(0.1)), initial())
    keys = set(strategy.last_round_privacy)
    assert {
        "epsilon",
        "epsilon-pld",
        "delta",
        "clipping-norm",
        "next-clipping-norm",
        "noise-stddev",
        "noise-multiplier",
        "clipped-fraction",
        "clipped-fraction-noised",
        "sampling-rate",
        "expected-clients",
    } <= keys
    assert all(isinstance(v, float) for v in strategy.last_round_privacy.values())


# ------------------------------------------------------------------- local DP
def test_local_dp_clients_noise_and_ledger_reports_local_guarantee() -> None:
    eps_l, delta_l, clip = 2.0, 1e-5, 0.5
    rng = np.random.default_rng(11)

    def respond(node: int, arrays: Arrays, config: ConfigRecord) -> Arrays:
        local = {k: v + 1.0 for k, v in arrays.items()}
        return privatize_arrays(
            local,
            arrays,
            float(config[CONFIG_CLIPPING_NORM]),
            float(config[CONFIG_LOCAL_DP_EPSILON]),
            float(config[CONFIG_LOCAL_DP_DELTA]),
            rng,
        )

    strategy = DPFedAvg(
        noise_multiplier=0.0,
        clipping_norm=clip,
        local_dp_epsilon=eps_l,
        local_dp_delta=delta_l,
        client_sampling="fixed",
        fraction_train=1.0,
    )
    sigma = local_dp_noise_stddev(clip, eps_l, delta_l)
    ref = {"w": np.zeros(20_000, np.float32)}
    new, _ = run_round(strategy, FakeGrid([1, 2, 3, 4], respond), ref)
    signal = clip / math.sqrt(20_000)  # each clipped update, spread evenly
    assert np.mean(new["w"]) == pytest.approx(signal, abs=5 * sigma / 2 / math.sqrt(20_000))
    assert np.std(new["w"]) == pytest.approx(sigma / 2, rel=0.02)  # mean of 4 noises
    privacy = strategy.last_round_privacy
    assert privacy["local-dp-epsilon"] == eps_l and privacy["noise-stddev"] == 0.0
    assert privacy["epsilon"] == pytest.approx(
        local_dp_epsilon(sigma / (2 * clip), 1, strategy.ledger.target_delta), abs=1e-9
    )
    assert "epsilon-pld" not in privacy
    independent = dp_accounting.rdp.RdpAccountant()
    independent.compose(dp_accounting.GaussianDpEvent(sigma / (2 * clip)))
    assert privacy["epsilon"] == pytest.approx(independent.get_epsilon(1e-5), abs=1e-9)


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        DPFedAvg(noise_multiplier=1.0, clipping_norm=1.0, local_dp_epsilon=1.0)
    with pytest.raises(ValueError):
        DPFedAvg(noise_multiplier=1.0, clipping_norm=0.0)
    with pytest.raises(ValueError):
        DPFedAvg(noise_multiplier=1.0, clipping_norm=1.0, client_sampling="uniform")  # type: ignore[arg-type]
    strategy = DPFedAvg(noise_multiplier=2.0, clipping_norm=1.0, clipping="adaptive")
    with pytest.raises(ValueError, match="2 \\* count stddev"):
        strategy.plan_round(1, list(range(10)))  # sigma_b = 10/20 = 0.5, z >= 2 sigma_b


def test_strategies_do_not_import_tensorflow() -> None:
    code = (
        "import sys, strategies.dp_fedavg, privacy.local_dp, privacy.accounting; "
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
