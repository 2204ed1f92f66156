"""Noise scale and sensitivity of DP-FedAvg's noised mean (McMahan et al. 2018)."""

from __future__ import annotations

import numpy as np
import pytest

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.supercore.differential_privacy import clip_inputs_inplace
from flwr.supercore.task_identity import TaskIdentity

from privacy.clipping import add_gaussian_noise, clip_factor, clip_update, l2_norm
from privacy.central import noise_stddev, noised_mean_update
from strategies.dp_fedavg import DPFedAvg
from strategies.fedavg import to_arrayrecord
from strategies.validation import TrainReply

SHAPES = {"w": (40, 25), "b": (25,)}


pytestmark = pytest.mark.usefixtures("task_identity")


class StaticGrid:
    """Just enough Grid for ``configure_train``: a fixed set of connected nodes."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def reference_clip(update: dict[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    """Flat clipping written out independently of privacy.clipping."""
    flat = np.concatenate([np.ravel(v).astype(np.float64) for v in update.values()])
    norm = np.sqrt(np.sum(flat**2))
    factor = 1.0 if norm <= clip else clip / norm
    return {k: v.astype(np.float64) * factor for k, v in update.items()}


def planned(strategy: DPFedAvg, reference: dict[str, np.ndarray], nodes: list[int]) -> DPFedAvg:
    list(strategy.configure_train(1, to_arrayrecord(reference), ConfigRecord(), StaticGrid(nodes)))
    return strategy


def test_clip_factor_is_defined_for_zero_and_rejects_non_finite() -> None:
    assert clip_factor(0.0, 1.0) == 1.0
    assert clip_factor(4.0, 2.0) == 0.5
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError):
            clip_factor(bad, 1.0)
    clipped, norm = clip_update({"a": np.zeros(3)}, 1.0)
    assert norm == 0.0 and np.all(clipped["a"] == 0.0)
    clipped, norm = clip_update({"a": np.array([3.0, 4.0]), "b": np.array([12.0])}, 1.0)
    assert norm == pytest.approx(13.0) and l2_norm(clipped) == pytest.approx(1.0)


def test_flower_clipping_crashes_on_zero_update() -> None:
    """Flower 1.42's clip divides by the norm: a zero update raises."""
    with pytest.raises(ZeroDivisionError):
        clip_inputs_inplace([np.zeros(3)], 1.0)


def test_pure_noise_std_is_z_c_over_m() -> None:
    rng = np.random.default_rng(0)
    z, clip, m = 1.3, 0.7, 16
    total = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    stddev = noise_stddev(z, clip, m)
    diffs = []
    for _ in range(40):
        noised = noised_mean_update(total, m, stddev, rng)
        diffs.append(np.concatenate([(noised[k] - total[k] / m).ravel() for k in SHAPES]))
    diffs = np.concatenate(diffs)  # 41,000 draws
    assert abs(np.std(diffs) / (z * clip / m) - 1.0) < 0.02
    assert abs(np.mean(diffs)) < 4 * stddev / np.sqrt(diffs.size)


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_strategy_noise_std_over_rounds(sampling: str) -> None:
    """The released model minus the exact clipped mean has std z C / m, m fixed."""
    z, clip, nodes = 0.8, 0.5, list(range(1, 21))
    q = 0.4  # m = 8 either way (Poisson: expected count q N)
    rng = np.random.default_rng(1)
    reference = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    strategy = DPFedAvg(
        noise_multiplier=z,
        clipping_norm=clip,
        client_sampling=sampling,
        fraction_train=q,
        compute_pld=False,
        seed=7,
    )
    diffs = []
    for _ in range(12):
        planned(strategy, reference, nodes)
        sampled = strategy._plan.sampled
        replies = []
        for node in sampled:
            scale = rng.choice([0.01, 10.0])  # half clipped, half not
            arrays = {
                k: (v + scale * rng.normal(size=v.shape)).astype(np.float32)
                for k, v in reference.items()
            }
            replies.append(TrainReply(node, arrays, int(rng.integers(1, 10_000)), {}))
        new = strategy.aggregate_arrays(1, replies)
        clipped_mean = {k: np.zeros(s) for k, s in SHAPES.items()}
        for reply in replies:
            update = {k: reply.arrays[k].astype(np.float64) - reference[k] for k in SHAPES}
            for k, v in reference_clip(update, clip).items():
                clipped_mean[k] += v / 8.0
        diffs.append(
            np.concatenate(
                [
                    (new[k].astype(np.float64) - reference[k] - clipped_mean[k]).ravel()
                    for k in SHAPES
                ]
            )
        )
        assert strategy.last_round_privacy["noise-stddev"] == pytest.approx(z * clip / 8.0)
    diffs = np.concatenate(diffs)  # 12,300 draws (float32 rounding is ~1e-7, negligible)
    assert abs(np.std(diffs) / (z * clip / 8.0) - 1.0) < 0.02


def _noise_only_release(**settings: object) -> np.ndarray:
    """The model a DP round releases when no client replies: x + noise (x = 0)."""
    strategy = planned(
        DPFedAvg(noise_multiplier=1.0, clipping_norm=1.0, fraction_train=1.0, compute_pld=False,
                 **settings),  # type: ignore[arg-type]
        {"w": np.zeros(2000, np.float32)},
        [1, 2, 3],
    )
    return strategy.aggregate_arrays(1, [])["w"].astype(np.float64)


def test_the_run_seed_does_not_determine_the_noise() -> None:
    """Defect: the noise came from the run-config seed; anyone with metrics.json replayed it.

    Two releases with the same ``seed`` must carry independent noise: their
    difference has std sqrt(2) z C / m (here m = 3), not 0.
    """
    sigma = 1.0 * 1.0 / 3.0
    a, b = _noise_only_release(seed=7), _noise_only_release(seed=7)
    assert not np.array_equal(a, b)
    assert abs(np.std(a - b) / (np.sqrt(2.0) * sigma) - 1.0) < 0.05  # 2000 draws: sd ~1.6%
    assert abs(np.std(a) / sigma - 1.0) < 0.05


def test_only_the_insecure_seed_replays_noise_and_is_stamped_not_private() -> None:
    replay = _noise_only_release(insecure_dp_seed=3)
    assert np.array_equal(replay, _noise_only_release(insecure_dp_seed=3))
    assert not np.array_equal(replay, _noise_only_release(insecure_dp_seed=4))
    assert not DPFedAvg(noise_multiplier=1.0, clipping_norm=1.0, insecure_dp_seed=3).private
    assert DPFedAvg(noise_multiplier=1.0, clipping_norm=1.0, seed=3).private
    a = add_gaussian_noise({"x": np.zeros(5)}, 1.0, np.random.default_rng(9))["x"]
    assert np.array_equal(a, np.random.default_rng(9).normal(0.0, 1.0, 5))


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_one_client_moves_the_mean_by_at_most_c_over_m(sampling: str) -> None:
    """Sensitivity: replacing, zeroing or removing one (huge, heavily weighted) client."""
    clip, nodes = 1.5, [1, 2, 3, 4, 5]
    rng = np.random.default_rng(2)
    reference = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    others = [
        TrainReply(
            n,
            {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in reference.items()},
            5,
            {},
        )
        for n in (1, 2, 3, 4)
    ]
    victims = {
        "huge": {k: (v + 1e30).astype(np.float32) for k, v in reference.items()},
        "opposite": {k: (v - 1e6).astype(np.float32) for k, v in reference.items()},
        "zero": {k: v.copy() for k, v in reference.items()},
    }

    def release(victim: dict[str, np.ndarray] | None, weight: int = 1) -> dict[str, np.ndarray]:
        strategy = planned(
            DPFedAvg(
                noise_multiplier=0.0,
                clipping_norm=clip,
                client_sampling=sampling,
                fraction_train=1.0,
                compute_pld=False,
            ),
            reference,
            nodes,
        )
        replies = list(others)
        if victim is not None:
            replies.append(TrainReply(5, victim, weight, {}))
        return strategy.aggregate_arrays(1, replies)

    def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
        return l2_norm({k: a[k].astype(np.float64) - b[k] for k in a})

    m = 5.0
    absent = release(None)
    released = {name: release(v, weight=10**9) for name, v in victims.items()}
    for name, value in released.items():
        assert distance(value, absent) <= clip / m * (1 + 1e-5), name  # add/remove one
    # replace one: at most 2C/m, and the huge and opposite updates get there
    assert distance(released["huge"], released["opposite"]) <= 2 * clip / m * (1 + 1e-5)
    assert distance(released["huge"], released["opposite"]) > 1.9 * clip / m
    # weights are ignored
    assert distance(release(victims["huge"], 1), released["huge"]) < 1e-6


def _flower_reply(
    instruction: Message, arrays: dict[str, np.ndarray], num_examples: int
) -> Message:
    content = RecordDict(
        {"arrays": to_arrayrecord(arrays), "metrics": MetricRecord({"num-examples": num_examples})}
    )
    return Message(content, reply_to=instruction)


def test_flower_fixed_clipping_lets_a_weighted_client_exceed_c_over_m() -> None:
    """Flower 1.42: noise is z C / m for an unweighted mean, but the mean is weighted."""
    clip, m = 1.0, 4
    reference = {"w": np.zeros(10, np.float32)}
    wrapper = DifferentialPrivacyServerSideFixedClipping(
        FlowerFedAvg(), noise_multiplier=0.0, clipping_norm=clip, num_sampled_clients=m
    )
    wrapper.current_arrays = to_arrayrecord(reference)  # what configure_train would store
    instructions = [
        Message(
            RecordDict({"arrays": to_arrayrecord(reference)}), dst_node_id=n, message_type="train"
        )
        for n in range(1, m + 1)
    ]

    def released(big_weight: int) -> np.ndarray:
        # (not exactly zero: Flower's clipping would divide by zero)
        replies = [
            _flower_reply(instructions[i], {"w": np.full(10, 1e-6, np.float32)}, 1)
            for i in range(m - 1)
        ]
        replies.append(
            _flower_reply(instructions[-1], {"w": np.full(10, 100.0, np.float32)}, big_weight)
        )
        arrays, _ = wrapper.aggregate_train(1, replies)
        return arrays["w"].numpy()

    moved = np.linalg.norm(released(1000))
    assert moved > 0.99 * clip  # nearly C, not C / m = 0.25
    assert moved > 3 * clip / m


@pytest.mark.parametrize(
    ("clip", "entries"),
    [
        # Crafted (the audit's case): true factor 7.3e-46 is below float32's
        # smallest subnormal 1.4e-45; as float32 it rounds up and the update
        # contributed 1.92 C.
        (1e-7, np.array([1.3719e38], np.float32)),
        (1.0, np.full(1000, 1e38, np.float32)),  # 1e38 entries
        (1e-30, np.ones(100, np.float32)),  # tiny C
        (1e-44, np.full(50, 1e-43, np.float32)),  # subnormal entries and norm
        (1e-38, np.full(50, 1e-44, np.float32)),  # unclipped subnormal update
        (3.0, np.linspace(-3e38, 3e38, 64).astype(np.float32)),
    ],
)
def test_no_single_contribution_exceeds_c_whatever_its_values(
    clip: float, entries: np.ndarray
) -> None:
    """Defect: the clip factor was applied in float32; it underflowed for huge updates."""
    reference = {"w": np.zeros(entries.shape, np.float32)}
    strategy = planned(
        DPFedAvg(noise_multiplier=0.0, clipping_norm=clip, client_sampling="fixed",
                 fraction_train=1.0, min_train_nodes=1, compute_pld=False),
        reference,
        [1],
    )
    averaged, used = strategy.aggregate_replies(1, [TrainReply(1, {"w": entries}, 1, {})])
    assert len(used) == 1
    contribution = np.asarray(averaged["w"], np.float64) * 1.0  # m = 1, reference 0
    assert np.linalg.norm(contribution) <= clip * (1 + 1e-6)
    assert np.linalg.norm(contribution) >= clip * (1 - 1e-6) * min(
        1.0, float(np.linalg.norm(entries.astype(np.float64))) / clip
    )
