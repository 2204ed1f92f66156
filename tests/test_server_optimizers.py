"""Server optimisers (Reddi et al. 2021): hand-computed steps, Flower parity, composition."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

from strategies.dp_fedavg import DPFedAvg
from strategies.fedavg import FedAvg, to_arrayrecord, to_numpy
from strategies.server_optimizers import (
    DEFAULT_LEARNING_RATES,
    SERVER_OPTIMIZERS,
    ServerAdam,
    ServerMomentum,
    ServerOptimizer,
    ServerSGD,
    ServerYogi,
    make_server_optimizer,
    pseudo_gradient,
)
from strategies.validation import TrainReply, array_specs
from tests.messages import reply

Arrays = dict[str, np.ndarray]


def arrays_of(value: float | list[float]) -> Arrays:
    return {"w": np.array(value, dtype=np.float64).reshape(-1)}


# ------------------------------------------------------------ hand computations
def test_pseudo_gradient_sign_is_current_minus_averaged() -> None:
    g = pseudo_gradient({"w": np.array([1.0, 2.0])}, {"w": np.array([0.5, 3.0])})
    np.testing.assert_array_equal(g["w"], [0.5, -1.0])
    with pytest.raises(ValueError, match="different keys"):
        pseudo_gradient({"w": np.zeros(2)}, {"v": np.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        pseudo_gradient({"w": np.zeros(2)}, {"w": np.zeros(3)})


def test_sgd_first_steps() -> None:
    opt = ServerSGD(learning_rate=0.5)
    x = opt.step(arrays_of([1.0, -2.0]), arrays_of([3.0, -1.0]))  # g = (-2, -1)
    np.testing.assert_allclose(x["w"], [2.0, -1.5])
    x = opt.step(x, arrays_of([0.0, 0.5]))  # g = (2, -2)
    np.testing.assert_allclose(x["w"], [1.0, -0.5])
    # eta = 1 is FedAvg: the averaged arrays themselves, in the current dtype.
    current = {"w": np.array([0.1, 0.2], np.float32)}
    averaged = {"w": np.array([0.3, 0.7], np.float32)}
    out = ServerSGD().step(current, averaged)
    assert out["w"].dtype == np.float32
    assert out["w"].tobytes() == averaged["w"].tobytes()


def test_momentum_first_steps() -> None:
    opt = ServerMomentum(learning_rate=0.5, momentum=0.9)
    x0 = arrays_of(1.0)
    x1 = opt.step(x0, arrays_of(0.0))  # g1 = 1, m1 = 1, x1 = 1 - 0.5
    np.testing.assert_allclose(x1["w"], [0.5])
    x2 = opt.step(x1, arrays_of(0.25))  # g2 = 0.25, m2 = 0.9 + 0.25 = 1.15
    np.testing.assert_allclose(x2["w"], [0.5 - 0.5 * 1.15])
    x3 = opt.step(x2, x2)  # g3 = 0, m3 = 1.035: momentum keeps moving
    np.testing.assert_allclose(x3["w"], [x2["w"][0] - 0.5 * 1.035])


def test_adam_first_steps_with_flower_bias_correction() -> None:
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = ServerAdam(learning_rate=eta, beta1=b1, beta2=b2, tau=tau)
    x1 = opt.step(arrays_of(1.0), arrays_of(0.0))  # g1 = 1
    m1, v1 = 0.1, 0.01
    eta1 = eta * math.sqrt(1 - b2**2) / (1 - b1**2)  # Flower: exponent round + 1
    np.testing.assert_allclose(x1["w"], [1.0 - eta1 * m1 / (math.sqrt(v1) + tau)], rtol=1e-12)
    x2 = opt.step(x1, {"w": x1["w"] + 2.0})  # g2 = -2
    m2 = 0.9 * m1 + 0.1 * -2.0
    v2 = 0.99 * v1 + 0.01 * 4.0
    eta2 = eta * math.sqrt(1 - b2**3) / (1 - b1**3)
    np.testing.assert_allclose(
        x2["w"], [x1["w"][0] - eta2 * m2 / (math.sqrt(v2) + tau)], rtol=1e-12
    )
    # Kingma and Ba: s = t, so the first step is about eta * sign(g) (up to tau).
    kingma = ServerAdam(learning_rate=eta, beta2=0.999, bias_correction="kingma")
    y1 = kingma.step(arrays_of(1.0), arrays_of(0.0))
    step = eta * math.sqrt(0.001) / 0.1 * 0.1 / (math.sqrt(0.001) + tau)
    np.testing.assert_allclose(y1["w"], [1.0 - step], rtol=1e-12)
    assert abs(step - eta) < 0.04 * eta
    # Reddi et al.'s Algorithm 2 as printed: no correction.
    plain = ServerAdam(learning_rate=eta, beta2=0.999, bias_correction="none")
    z1 = plain.step(arrays_of(1.0), arrays_of(0.0))
    np.testing.assert_allclose(z1["w"], [1.0 - eta * 0.1 / (math.sqrt(0.001) + tau)], rtol=1e-12)


def test_yogi_first_steps() -> None:
    eta, tau = 0.01, 1e-3
    opt = ServerYogi(learning_rate=eta, tau=tau)
    x1 = opt.step(arrays_of(1.0), arrays_of(-1.0))  # g1 = 2
    m1 = 0.1 * 2.0
    v1 = 0.0 - 0.01 * 4.0 * np.sign(0.0 - 4.0)  # = 0.04
    np.testing.assert_allclose(x1["w"], [1.0 - eta * m1 / (math.sqrt(v1) + tau)], rtol=1e-12)
    x2 = opt.step(x1, {"w": x1["w"] - 0.1})  # g2 = 0.1: v shrinks additively
    m2 = 0.9 * m1 + 0.1 * 0.1
    v2 = v1 - 0.01 * 0.01 * np.sign(v1 - 0.01)
    assert v2 < v1
    np.testing.assert_allclose(
        x2["w"], [x1["w"][0] - eta * m2 / (math.sqrt(v2) + tau)], rtol=1e-12
    )


# --------------------------------------------------------------- Flower parity
def _flower_round(strategy, server_round: int, clients: list[Arrays], counts: list[int]) -> Arrays:
    replies = [
        reply(
            RecordDict(
                {
                    "arrays": to_arrayrecord(a),
                    "metrics": MetricRecord({"num-examples": n}),
                }
            ),
            node_id=k + 1,
        )
        for k, (a, n) in enumerate(zip(clients, counts, strict=True))
    ]
    record, _ = strategy.aggregate_train(server_round, replies)
    return to_numpy(record)


def _weighted(clients: list[Arrays], counts: list[int]) -> Arrays:
    w = np.asarray(counts, np.float64) / sum(counts)
    return {k: sum(wi * c[k] for wi, c in zip(w, clients)) for k in clients[0]}


@pytest.mark.parametrize("name", ["momentum", "adam", "yogi"])
def test_matches_flower_on_the_same_inputs(name: str) -> None:
    rng = np.random.default_rng(7)
    shapes = {"dense/kernel": (4, 3), "dense/bias": (3,)}
    current = {k: rng.normal(size=s) for k, s in shapes.items()}  # float64 on both sides
    if name == "momentum":
        flower = FedAvgM(server_learning_rate=0.7, server_momentum=0.9)
        flower.current_arrays = to_arrayrecord(current)
        ours: ServerOptimizer = make_server_optimizer("momentum", 0.7, momentum=0.9)
    elif name == "adam":
        flower = FedAdam(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2)
        ours = make_server_optimizer("adam", 0.05, beta1=0.8, beta2=0.95, tau=1e-2)
    else:
        flower = FedYogi(eta=0.03, beta_1=0.85, beta_2=0.9, tau=1e-2)
        ours = make_server_optimizer("yogi", 0.03, beta1=0.85, beta2=0.9, tau=1e-2)
    for server_round in range(1, 5):
        clients = [
            {k: v + rng.normal(scale=0.3, size=v.shape) for k, v in current.items()}
            for _ in range(3)
        ]
        counts = [int(c) for c in rng.integers(1, 100, size=3)]
        if name != "momentum":
            flower.current_arrays = {k: v.copy() for k, v in current.items()}
        theirs = _flower_round(flower, server_round, clients, counts)
        mine = ours.step(current, _weighted(clients, counts))
        for key in shapes:
            np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-10, atol=1e-12)
        assert not np.allclose(mine["dense/bias"], current["dense/bias"])  # it moved
        current = mine


def test_flower_defaults() -> None:
    assert make_server_optimizer("adam").learning_rate == FedAdam().eta == 0.1
    assert make_server_optimizer("yogi").learning_rate == FedYogi().eta == 0.01
    adam = ServerAdam()
    assert (adam.beta1, adam.beta2, adam.tau) == (FedAdam().beta_1, FedAdam().beta_2, FedAdam().tau)
    yogi = ServerYogi()
    assert (yogi.beta1, yogi.beta2, yogi.tau) == (FedYogi().beta_1, FedYogi().beta_2, FedYogi().tau)
    assert make_server_optimizer("momentum").learning_rate == FedAvgM().server_learning_rate
    assert set(DEFAULT_LEARNING_RATES) == set(SERVER_OPTIMIZERS)


# ----------------------------------------------------------------------- state
@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_state_round_trip_continues_identically(name: str) -> None:
    rng = np.random.default_rng(1)
    first = make_server_optimizer(name, 0.3)
    x = {"a/kernel": rng.normal(size=(2, 2)), "b": rng.normal(size=3)}
    for _ in range(2):
        x = first.step(x, {k: v + rng.normal(size=v.shape) for k, v in x.items()})
    state = first.state_dict()
    scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    json.dumps(scalars)  # JSON-able
    assert scalars["name"] == name and scalars["step"] == 2
    if name != "sgd":
        assert "m/a/kernel" in state and state["m/a/kernel"].shape == (2, 2)

    second = make_server_optimizer(name, 99.0)  # hyperparameters come from the state
    second.load_state_dict(state)
    assert second.learning_rate == 0.3
    target = {k: v + 1.0 for k, v in x.items()}
    a, b = first.step(x, target), second.step(x, target)
    for key in x:
        np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="state of optimiser"):
        make_server_optimizer("sgd" if name != "sgd" else "adam").load_state_dict(state)


def test_state_from_another_model_is_refused() -> None:
    opt = ServerAdam()
    opt.step(arrays_of(1.0), arrays_of(0.0))
    with pytest.raises(ValueError, match="different keys"):
        opt.step({"other": np.zeros(1)}, {"other": np.ones(1)})


def test_bad_names_and_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="not one of"):
        make_server_optimizer("adagrad")
    with pytest.raises(ValueError, match="takes no"):
        make_server_optimizer("sgd", 1.0, momentum=0.9)
    with pytest.raises(ValueError):
        make_server_optimizer("momentum", 1.0, momentum=1.0)
    with pytest.raises(ValueError):
        make_server_optimizer("adam", -0.1)
    with pytest.raises(ValueError):
        ServerYogi(tau=0.0)
    with pytest.raises(ValueError):
        ServerAdam(bias_correction="torch")  # type: ignore[arg-type]


def test_non_float_arrays_pass_through_and_dtype_is_kept() -> None:
    opt = ServerAdam()
    current = {"w": np.ones(2, np.float32), "count": np.array([3], np.int64)}
    averaged = {"w": np.zeros(2, np.float32), "count": np.array([5], np.int64)}
    out = opt.step(current, averaged)
    assert out["w"].dtype == np.float32 and out["count"].dtype == np.int64
    np.testing.assert_array_equal(out["count"], [5])
    assert "m/count" not in opt.state_dict()


# ----------------------------------------------------------------- composition
def _fedavg_round(strategy: FedAvg, sent: Arrays, clients: list[Arrays], server_round: int = 1):
    record = to_arrayrecord(sent)
    strategy._sent_specs = array_specs(record)
    strategy._sent_arrays = to_numpy(record)
    replies = [
        reply(
            RecordDict(
                {"arrays": to_arrayrecord(a), "metrics": MetricRecord({"num-examples": 10})}
            ),
            node_id=k + 1,
        )
        for k, a in enumerate(clients)
    ]
    out, _ = strategy.aggregate_train(server_round, replies)
    return to_numpy(out)


def test_fedavg_without_optimiser_is_unchanged_and_with_one_steps_on_the_mean() -> None:
    rng = np.random.default_rng(3)
    sent = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
    clients = [{"w": (sent["w"] + rng.normal(size=(3, 2))).astype(np.float32)} for _ in range(2)]
    mean = {"w": ((clients[0]["w"].astype(np.float64) + clients[1]["w"]) / 2).astype(np.float32)}

    plain = _fedavg_round(FedAvg(), sent, clients)
    assert plain["w"].tobytes() == mean["w"].tobytes()
    with_sgd1 = _fedavg_round(FedAvg(server_optimizer=ServerSGD()), sent, clients)
    assert with_sgd1["w"].tobytes() == plain["w"].tobytes()

    reference = ServerMomentum(learning_rate=0.5, momentum=0.9)
    strategy = FedAvg(server_optimizer=ServerMomentum(learning_rate=0.5, momentum=0.9))
    out = _fedavg_round(strategy, sent, clients)
    np.testing.assert_allclose(out["w"], reference.step(sent, mean)["w"], rtol=1e-6)
    assert not np.allclose(out["w"], mean["w"])


def test_server_update_fn_runs_after_the_optimiser() -> None:
    calls: list[tuple[int, Arrays]] = []

    def server_update(server_round: int, arrays: Arrays) -> Arrays:
        calls.append((server_round, {k: v.copy() for k, v in arrays.items()}))
        return {k: v + 100.0 for k, v in arrays.items()}

    sent = {"w": np.zeros(2, np.float32)}
    clients = [{"w": np.ones(2, np.float32)}]
    strategy = FedAvg(server_optimizer=ServerSGD(0.5), server_update_fn=server_update)
    out = _fedavg_round(strategy, sent, clients, server_round=4)
    assert calls[0][0] == 4
    np.testing.assert_allclose(calls[0][1]["w"], [0.5, 0.5])  # it saw the optimiser's output
    np.testing.assert_allclose(out["w"], [100.5, 100.5])


def _dp_round(strategy: DPFedAvg, sent: Arrays, delta: float, server_round: int) -> Arrays:
    strategy._plan = strategy.plan_round(server_round, [1, 2])
    strategy._plan.sampled = [1, 2]
    record = to_arrayrecord(sent)
    strategy._sent_specs = array_specs(record)
    strategy._sent_arrays = to_numpy(record)
    replies = [TrainReply(n, {k: v + delta for k, v in sent.items()}, 1, {}) for n in (1, 2)]
    return strategy.aggregate_arrays(server_round, replies)


def _dp(**kwargs) -> DPFedAvg:
    return DPFedAvg(
        clipping_norm=100.0, client_sampling="fixed", fraction_train=1.0, insecure_dp_seed=5,
        **kwargs,
    )


def test_dp_fedavg_sends_the_noised_mean_through_the_optimiser() -> None:
    sent = {"w": np.zeros(4, np.float32)}
    # No noise: the mean update is +1 on every entry, so g_t = -1.
    base = _dp_round(_dp(noise_multiplier=0.0), sent, 1.0, 1)
    sgd1 = _dp_round(_dp(noise_multiplier=0.0, server_optimizer=ServerSGD()), sent, 1.0, 1)
    assert sgd1["w"].tobytes() == base["w"].tobytes()

    momentum = _dp(noise_multiplier=0.0, server_optimizer=ServerMomentum(0.5, momentum=0.9))
    x1 = _dp_round(momentum, sent, 1.0, 1)
    np.testing.assert_allclose(x1["w"], 0.5)
    x2 = _dp_round(momentum, x1, 1.0, 2)  # m2 = 0.9 * -1 + -1
    np.testing.assert_allclose(x2["w"], 0.5 + 0.5 * 1.9)

    # With noise: the optimiser is post-processing of the same noised mean, at no privacy cost.
    noisy = _dp(noise_multiplier=1.0, server_learning_rate=0.3)
    noisy_sgd = _dp(noise_multiplier=1.0, server_optimizer=ServerSGD(0.3))
    a, b = _dp_round(noisy, sent, 1.0, 1), _dp_round(noisy_sgd, sent, 1.0, 1)
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
    assert noisy.ledger.epsilon == noisy_sgd.ledger.epsilon
    assert a["w"].dtype == np.float32


def test_dp_fedavg_applies_the_server_update_after_noise() -> None:
    seen: list[Arrays] = []

    def server_update(server_round: int, arrays: Arrays) -> Arrays:
        seen.append(arrays)
        return {k: np.zeros_like(v) for k, v in arrays.items()}

    strategy = _dp(noise_multiplier=1.0, server_update_fn=server_update)
    sent = {"w": np.zeros(4, np.float32)}
    strategy._plan = strategy.plan_round(1, [1, 2])
    strategy._plan.sampled = [1, 2]
    record = to_arrayrecord(sent)
    strategy._sent_specs = array_specs(record)
    strategy._sent_arrays = to_numpy(record)
    content = RecordDict(
        {
            "arrays": to_arrayrecord({"w": np.ones(4, np.float32)}),
            "metrics": MetricRecord({"num-examples": 3}),
        }
    )
    out, _ = strategy.aggregate_train(1, [reply(content, 1), reply(content, 2)])
    assert len(seen) == 1 and np.all(seen[0]["w"] != 1.0)  # the released model carries noise
    assert isinstance(out, ArrayRecord)
    np.testing.assert_array_equal(to_numpy(out)["w"], 0.0)
