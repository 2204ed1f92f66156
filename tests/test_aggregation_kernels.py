"""Issue #10: the BLAS kernels the strategies aggregate with, against float64 references.

The same results must come out of the BLAS path (scipy's axpy, one thread), the
numpy fallback (no scipy or threadpoolctl) and the small-array path; the
one-copy serialisation must give Flower's bytes.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from flwr.app import Array

import strategies.aggregation as aggregation
from strategies.aggregation import (
    BLOCK,
    GROUP,
    SMALL,
    group_size,
    scaled_update_sum,
    single_threaded_blas,
    update_norm,
    update_norms,
    weighted_mean,
)
from privacy.clipping import l2_norm, model_update
from strategies.validation import decode_array, encode_array


def _reference_mean(arrays, weights):
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return {k: sum(wk * np.asarray(a[k], np.float64) for wk, a in zip(w, arrays))
            for k in arrays[0]}


@pytest.fixture
def numpy_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without scipy or threadpoolctl."""
    monkeypatch.setattr(aggregation, "_blas", None)
    monkeypatch.setattr(aggregation, "_blas_loaded", True)


def _clients(num: int, seed: int, shapes: dict[str, tuple[int, ...]], dtype=np.float32):
    local = np.random.default_rng(seed)
    return [{k: local.normal(size=s).astype(dtype) for k, s in shapes.items()} for _ in range(num)]


SHAPES = {"big": (BLOCK + 7,), "medium": (SMALL + 1,), "small": (SMALL,), "tiny": (3, 2),
          "scalar": ()}


def test_blas_is_available_here() -> None:
    """The speed figures of issue #10 assume the BLAS path; the app's dependencies bring it."""
    assert aggregation._load_blas() is not None
    with single_threaded_blas():  # from the main thread, OpenBLAS takes the setting
        assert aggregation._single_thread_axpys() is not None


@pytest.mark.parametrize("num_clients", [1, 2, GROUP + 1, 2 * GROUP + 3])
@pytest.mark.parametrize("equal_weights", [False, True])
def test_blas_and_numpy_paths_agree_with_float64(num_clients, equal_weights, monkeypatch) -> None:
    arrays = _clients(num_clients, num_clients, SHAPES)
    weights = [7] * num_clients if equal_weights else list(range(1, num_clients + 1))
    expected = _reference_mean(arrays, weights)
    blas = weighted_mean(arrays, weights)
    monkeypatch.setattr(aggregation, "_blas", None)
    monkeypatch.setattr(aggregation, "_blas_loaded", True)
    numpy = weighted_mean(arrays, weights)
    for key, shape in SHAPES.items():
        for ours in (blas[key], numpy[key]):
            assert ours.dtype == np.float32 and ours.shape == shape
            np.testing.assert_allclose(ours, expected[key], rtol=0, atol=1e-6)


def test_many_clients_use_square_root_groups() -> None:
    assert group_size(1) == group_size(GROUP * GROUP) == GROUP
    assert group_size(GROUP * GROUP + 1) == 17 and group_size(1000) == 32
    arrays = _clients(300, 5, {"w": (SMALL * 2,)})
    weights = np.random.default_rng(6).integers(1, 1000, size=300)
    expected = _reference_mean(arrays, weights)["w"]
    np.testing.assert_allclose(weighted_mean(arrays, weights)["w"], expected, rtol=0, atol=1e-6)


def test_float64_arrays_and_mixed_dtypes() -> None:
    arrays = _clients(GROUP + 2, 8, SHAPES, dtype=np.float64)
    expected = _reference_mean(arrays, range(1, GROUP + 3))
    ours = weighted_mean(arrays, range(1, GROUP + 3))
    for key in SHAPES:
        assert ours[key].dtype == np.float64
        np.testing.assert_allclose(ours[key], expected[key], rtol=0, atol=1e-12)
    mixed = [{"s": np.ones(4, np.float32)}, {"s": np.full(4, 3.0)}, {"s": np.full(4, 5)}]
    for key_size in (4, BLOCK + 1):
        clients = [{"s": np.resize(c["s"], key_size)} for c in mixed]
        out = weighted_mean(clients, [1, 1, 2])["s"]
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, (1 + 3 + 10) / 4)


def test_a_mismatched_shape_is_named_on_every_path() -> None:
    for size in (3, BLOCK + 1):
        with pytest.raises(ValueError, match="client 1 has shape"):
            weighted_mean(
                [{"x": np.zeros(size, np.float32)}, {"x": np.zeros(size + 1, np.float32)}], [1, 1]
            )


@pytest.mark.parametrize("num_clients", [0, 1, GROUP + 3])
def test_scaled_update_sum_numpy_fallback(num_clients: int, numpy_only) -> None:
    local = np.random.default_rng(num_clients)
    reference = {"k": local.normal(0, 0.1, size=BLOCK + 5).astype(np.float32),
                 "b": local.normal(size=3).astype(np.float32)}
    clients = [{k: (v + local.normal(0, 0.01, size=v.shape)).astype(np.float32)
                for k, v in reference.items()} for _ in range(num_clients)]
    factors = local.uniform(0.1, 1.0, size=num_clients)
    factors[::2] = 1.0
    ours = scaled_update_sum(clients, reference, factors)
    for key, ref in reference.items():
        expected = sum((f * np.subtract(c[key], ref, dtype=np.float64)
                        for c, f in zip(clients, factors)), np.zeros(ref.shape))
        np.testing.assert_allclose(ours[key], expected, rtol=0, atol=1e-7)


def test_update_norm_is_nan_when_the_only_change_is_a_nan() -> None:
    """The rescaling fallback kept 0.0 over NaN (``max(0.0, nan)``): a NaN update looked zero."""
    reference = {"w": np.zeros(4, np.float32), "b": np.zeros(3, np.float32)}
    bad = {"w": np.array([np.nan, 0, 0, 0], np.float32), "b": np.zeros(3, np.float32)}
    assert math.isnan(update_norm(bad, reference))
    bad["w"][0] = -np.inf
    assert update_norm(bad, reference) == np.inf


def test_update_norms_of_many_clients_equal_each_clients_norm() -> None:
    local = np.random.default_rng(4)
    reference = {"k": local.normal(size=aggregation.NORM_BLOCK * 2 + 9), "s": np.array(0.5)}
    clients = [{k: v + local.normal(0, 0.1, size=np.shape(v)) for k, v in reference.items()}
               for _ in range(5)]
    clients[2] = dict(clients[2], s=np.array(np.nan))
    norms = update_norms(clients, reference)
    for index, client in enumerate(clients):
        expected = l2_norm(model_update(client, reference))
        if index == 2:
            assert math.isnan(norms[index])
        else:
            assert norms[index] == pytest.approx(expected, rel=1e-12)
    assert update_norms([], reference) == []


def _blas_threads() -> list[int]:
    return [lib.get_num_threads() for lib in aggregation._load_blas()[1].lib_controllers]


def test_single_threaded_blas_is_reentrant_and_restores_the_thread_counts() -> None:
    before = _blas_threads()
    with single_threaded_blas():
        assert set(_blas_threads()) == {1}
        with single_threaded_blas():
            assert set(_blas_threads()) == {1}
        assert set(_blas_threads()) == {1}  # still inside the outer block
    assert _blas_threads() == before
    with pytest.raises(RuntimeError), single_threaded_blas():
        raise RuntimeError("restored on errors too")
    assert _blas_threads() == before


def test_single_threaded_blas_across_threads() -> None:
    """The thread that set the counts restores them; the counts are never left at one thread."""
    before = _blas_threads()
    inside, release = threading.Event(), threading.Event()
    seen: list[list[int]] = []

    def hold() -> None:
        with single_threaded_blas():
            seen.append(_blas_threads())
            inside.set()
            release.wait(10)

    with single_threaded_blas():  # the main thread sets first
        worker = threading.Thread(target=hold)
        worker.start()
        assert inside.wait(10)
        assert set(seen[0]) == {1}
    assert _blas_threads() == before  # restored by its owner, the worker still inside
    release.set()
    worker.join(10)
    assert _blas_threads() == before

    # A thread other than the main one first in (OpenBLAS may ignore it): nothing is left changed.
    inside.clear()
    release.clear()
    worker = threading.Thread(target=hold)
    worker.start()
    assert inside.wait(10)
    with single_threaded_blas():
        pass
    release.set()
    worker.join(10)
    assert _blas_threads() == before


def test_kernels_are_right_where_blas_ignores_the_thread_setting() -> None:
    """OpenBLAS ignores the setting from a thread that is not the main one (Flower's
    simulation runs the ServerApp in a thread): the kernels then run on numpy."""
    arrays = _clients(GROUP + 3, 11, SHAPES)
    weights = list(range(1, GROUP + 4))
    expected = weighted_mean(arrays, weights)
    seen: dict[str, object] = {}

    def run() -> None:
        with single_threaded_blas():
            seen["mean"] = weighted_mean(arrays, weights)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(60)
    for key in SHAPES:  # BLAS or numpy, whichever ran

        np.testing.assert_allclose(seen["mean"][key], expected[key], rtol=0, atol=1e-6)


ENCODED = {
    "float32 matrix": np.random.default_rng(0).normal(size=(64, 33)).astype(np.float32),
    "float64 scalar": np.array(3.25),
    "empty": np.zeros((0, 3), np.float32),
    "int8": np.arange(-5, 5, dtype=np.int8).reshape(2, 5),
    "big-endian": np.arange(5, dtype=">f4"),
    "bool": np.array([True, False, True]),
    "complex64": np.array([1 + 2j, 3j], np.complex64),
    "float16": np.array([1.5, -2.0], np.float16),
    "fortran order": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "structured": np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
}


@pytest.mark.parametrize("name", list(ENCODED))
def test_encode_array_gives_flowers_bytes(name: str) -> None:
    value = ENCODED[name]
    ours, flowers = encode_array(value), Array(value)
    assert (ours.dtype, ours.shape, ours.stype) == (flowers.dtype, flowers.shape, flowers.stype)
    assert ours.data == flowers.data
    np.testing.assert_array_equal(decode_array(ours), value)
