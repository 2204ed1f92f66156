"""Robust aggregation stages: known outputs, breakdown points, Krum's choice, norm bounding."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.anomaly import client_figures
from strategies.robust import (
    CoordinateMedian,
    Krum,
    NormBound,
    TrimmedMean,
    krum_scores,
    pairwise_sq_distances,
)
from strategies.validation import TrainReply

SHAPES = {"w": (3, 4), "b": (4,)}


def _replies(models: list[dict[str, np.ndarray]], counts: list[int] | None = None) -> list[TrainReply]:
    counts = counts or [1] * len(models)
    return [TrainReply(i + 1, m, c, {}) for i, (m, c) in enumerate(zip(models, counts))]


def _models(rng: np.random.Generator, n: int, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    return [
        {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(n)
    ]


REFERENCE = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}


def test_median_and_trimmed_mean_equal_numpy_on_small_arrays() -> None:
    rng = np.random.default_rng(0)
    models = _models(rng, 7)
    replies = _replies(models, counts=[1, 5, 100, 2, 3, 9, 1])  # weights must not matter
    median = CoordinateMedian().aggregate(1, replies, REFERENCE).arrays
    trimmed = TrimmedMean(0.2).aggregate(1, replies, REFERENCE)
    for key in SHAPES:
        stack = np.stack([m[key].astype(np.float64) for m in models])
        np.testing.assert_allclose(median[key], np.median(stack, axis=0), rtol=0, atol=0)
        expected = np.sort(stack, axis=0)[1:6].mean(axis=0)  # floor(0.2 * 7) = 1 per side
        np.testing.assert_allclose(trimmed.arrays[key], expected, rtol=1e-12)
    assert trimmed.metrics["trimmed-per-side"] == 1.0


@pytest.mark.parametrize("stage", [CoordinateMedian(), TrimmedMean(0.3)])
def test_breakdown_point_holds_against_huge_updates(stage) -> None:
    """With f < n/2 arbitrary updates of norm 1e6, each coordinate stays in the honest range."""
    rng = np.random.default_rng(1)
    honest = _models(rng, 7)
    attackers = [
        {k: np.full(s, sign * 1e6 / np.sqrt(16.0), np.float32) for k, s in SHAPES.items()}
        for sign in (1.0, -1.0, 1.0)
    ]  # 3 of 10 (< n/2 and <= beta n for beta 0.3)
    out = stage.aggregate(1, _replies(honest + attackers), REFERENCE).arrays
    for key in SHAPES:
        stack = np.stack([m[key] for m in honest])
        assert np.all(out[key] >= stack.min(axis=0) - 1e-6)
        assert np.all(out[key] <= stack.max(axis=0) + 1e-6)


def test_krum_picks_the_planted_honest_cluster() -> None:
    rng = np.random.default_rng(2)
    centre = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    honest = [{k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in centre.items()}
              for _ in range(7)]
    byzantine = [{k: (v + 5.0 + rng.normal(size=v.shape)).astype(np.float32)
                  for k, v in centre.items()} for _ in range(2)]
    replies = _replies(honest + byzantine)
    krum = Krum(byzantine_clients=2).aggregate(1, replies, REFERENCE)
    assert len(krum.used) == 1 and krum.used[0].node_id <= 7
    assert set(krum.down_weighted) == set(range(1, 10)) - {krum.used[0].node_id}
    multi = Krum(byzantine_clients=2, keep=None).aggregate(1, replies, REFERENCE)
    assert sorted(r.node_id for r in multi.used) == list(range(1, 8))
    for key, value in centre.items():
        np.testing.assert_allclose(multi.arrays[key], value, atol=0.02)


def test_krum_scores_match_a_brute_force_computation() -> None:
    rng = np.random.default_rng(3)
    models = _models(rng, 6)
    distances = pairwise_sq_distances(_replies(models), REFERENCE)
    flat = [np.concatenate([m[k].ravel().astype(np.float64) for k in SHAPES]) for m in models]
    brute = np.array([[np.sum((a - b) ** 2) for b in flat] for a in flat])
    np.testing.assert_allclose(distances, brute, rtol=1e-5, atol=1e-5)  # float32 Gram
    f = 1
    expected = [sorted(brute[i][j] for j in range(6) if j != i)[: 6 - f - 2] for i in range(6)]
    np.testing.assert_allclose(krum_scores(brute, f), [sum(e) for e in expected], rtol=1e-12)


def test_float32_gram_distances_stay_close_to_float64_for_similar_updates() -> None:
    """The hard case for a float32 Gram: honest updates with pairwise cosine ~0.99."""
    rng = np.random.default_rng(4)
    size = 50_000
    reference = {"w": (0.05 * rng.normal(size=size)).astype(np.float32)}
    common = 0.003 * rng.normal(size=size)
    models = [
        {"w": (reference["w"] + common + 0.0003 * rng.normal(size=size)).astype(np.float32)}
        for _ in range(12)
    ]
    distances = pairwise_sq_distances(_replies(models), reference)
    updates = np.stack([m["w"].astype(np.float64) - reference["w"] for m in models])
    exact = ((updates[:, None, :] - updates[None, :, :]) ** 2).sum(axis=2)
    off = ~np.eye(12, dtype=bool)
    assert np.max(np.abs(distances - exact)[off] / exact[off]) < 1e-3
    # float64 replies take the float64 path: exact to rounding.
    models64 = [{"w": m["w"].astype(np.float64)} for m in models]
    ref64 = {"w": reference["w"].astype(np.float64)}
    np.testing.assert_allclose(pairwise_sq_distances(_replies(models64), ref64)[off], exact[off],
                               rtol=1e-9)


def test_an_update_too_large_for_float32_squares_is_measured_not_rejected() -> None:
    rng = np.random.default_rng(6)
    models = _models(rng, 6, scale=0.01)
    models[0] = {k: np.full(s, 1e25, np.float32) for k, s in SHAPES.items()}  # finite, huge
    out = Krum(byzantine_clients=1).aggregate(1, _replies(models), REFERENCE)
    assert out.rejected == {} and 1 in out.down_weighted


def test_norm_bound_limits_each_contribution_and_keeps_the_weighted_mean_otherwise() -> None:
    rng = np.random.default_rng(4)
    small = _models(rng, 3, scale=0.01)
    huge = {k: np.full(s, 100.0, np.float32) for k, s in SHAPES.items()}
    replies = _replies(small + [huge], counts=[1, 2, 3, 4])
    out = NormBound(1.0).aggregate(1, replies, REFERENCE)
    flat_huge = np.concatenate([huge[k].ravel() for k in SHAPES]).astype(np.float64)
    clipped_huge = {k: huge[k] / np.linalg.norm(flat_huge) for k in SHAPES}
    for key in SHAPES:
        expected = (sum(c * m[key] for c, m in zip([1, 2, 3], small)) + 4 * clipped_huge[key]) / 10
        np.testing.assert_allclose(out.arrays[key], expected, rtol=1e-6, atol=1e-9)
    assert list(out.down_weighted) == [4] and out.metrics["num-clipped"] == 1.0
    adaptive = NormBound(1.0, adaptive=True)
    adaptive.aggregate(1, replies, REFERENCE)
    assert adaptive.bound < 1.0  # 3 of 4 norms are far below the bound: it shrinks
    restored = NormBound(5.0)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.bound == adaptive.bound


@pytest.mark.parametrize("n", [6, 7])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_from_one_sort_equals_numpy_bit_for_bit(n: int, dtype: type) -> None:
    """Even and odd counts, float32 and float64 replies: exactly ``np.median`` of float64 copies."""
    rng = np.random.default_rng(n)
    models = [{k: v.astype(dtype) for k, v in m.items()} for m in _models(rng, n)]
    reference = {k: v.astype(dtype) for k, v in REFERENCE.items()}
    median = CoordinateMedian().aggregate(1, _replies(models), reference).arrays
    for key in SHAPES:
        stack = np.stack([m[key].astype(np.float64) for m in models])
        assert median[key].dtype == np.float64
        np.testing.assert_array_equal(median[key], np.median(stack, axis=0))


@pytest.mark.parametrize("stage", [CoordinateMedian(), TrimmedMean(0.2), Krum(1), NormBound(1.0)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_replies_are_rejected_and_named(stage, bad: float) -> None:
    rng = np.random.default_rng(5)
    models = _models(rng, 5)
    models[2]["w"][0, 0] = bad
    out = stage.aggregate(1, _replies(models), REFERENCE)
    assert 3 in out.rejected and all(r.node_id != 3 for r in out.used)
    assert all(np.isfinite(v).all() for v in out.arrays.values())


def test_client_figures_spot_a_scaled_and_a_flipped_update() -> None:
    rng = np.random.default_rng(6)
    direction = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    models = [{k: (v * (1 + 0.05 * rng.normal())).astype(np.float32) for k, v in direction.items()}
              for _ in range(4)]
    models.append({k: -v for k, v in direction.items()})  # sign-flipped
    models.append({k: 100 * v for k, v in direction.items()})  # scaled
    replies = _replies(models)
    averaged = CoordinateMedian().aggregate(1, replies, REFERENCE).arrays
    figures = {f.node_id: f for f in client_figures(replies, REFERENCE, averaged, {6: "excluded"})}
    norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in direction.values())))
    assert figures[6].norm == pytest.approx(100 * norm, rel=1e-6)
    assert figures[5].cosine == pytest.approx(-1.0, abs=0.01)
    assert all(figures[i].cosine > 0.99 for i in range(1, 5))
    assert figures[6].status == "excluded" and figures[1].status == "used"


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="trim-fraction"):
        TrimmedMean(0.5)
    with pytest.raises(ValueError, match="byzantine-clients"):
        Krum(-1)
    with pytest.raises(ValueError, match="norm bound"):
        NormBound(0.0)


def test_fedavg_reports_every_valid_reply_and_what_krum_excluded() -> None:
    from strategies.fedavg import FedAvg

    rng = np.random.default_rng(7)
    models = _models(rng, 5, scale=0.01)
    models.append({k: np.full(s, 50.0, np.float32) for k, s in SHAPES.items()})  # way off
    strategy = FedAvg(aggregator=Krum(byzantine_clients=1, keep=None), report_clients=True)
    strategy._sent_arrays = dict(REFERENCE)
    averaged, used = strategy.aggregate_replies(1, _replies(models))
    figures = {f.node_id: f for f in strategy.last_client_figures}
    assert set(figures) == set(range(1, 7)) and 6 not in {r.node_id for r in used}
    assert figures[6].status.startswith("excluded") and figures[6].norm > 100
    assert FedAvg(report_clients=False).last_client_figures == []


@pytest.mark.parametrize("keep", [1, None])
def test_krum_figures_from_its_gram_match_the_direct_computation(keep: int | None) -> None:
    """Norms and cosines from Krum's Gram matrix equal client_figures on the arrays."""
    rng = np.random.default_rng(11)
    models = _models(rng, 8, scale=0.1)
    models[3] = {k: -10.0 * v for k, v in models[3].items()}  # one that Krum excludes
    reference = {k: (0.5 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
    replies = _replies(models, counts=[3, 1, 4, 1, 5, 9, 2, 6])
    out = Krum(byzantine_clients=2, keep=keep).aggregate(1, replies, reference)
    assert out.client_figures is not None
    direct = client_figures(replies, reference, out.arrays, out.down_weighted)
    for ours, expected in zip(out.client_figures, direct):
        assert (ours.node_id, ours.status) == (expected.node_id, expected.status)
        assert ours.norm == pytest.approx(expected.norm, rel=1e-5)
        assert ours.cosine == pytest.approx(expected.cosine, rel=1e-5, abs=1e-6)
    assert any(f.status.startswith("excluded") for f in out.client_figures)
