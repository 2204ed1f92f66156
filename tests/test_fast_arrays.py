"""Zero-copy decoding of Flower Arrays, the NaN/Inf screen and the blocked weighted mean."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from strategies.aggregation import (
    BLOCK,
    GROUP,
    NORM_BLOCK,
    finite_weighted_mean,
    scaled_update_sum,
    update_norm,
    weighted_mean,
)
from privacy.clipping import l2_norm, model_update
from strategies.validation import (
    ArraySpec,
    InvalidReply,
    all_finite,
    check_train_reply,
    decode_array,
)
from tests.messages import reply

rng = np.random.default_rng(0)
ARRAYS = {
    "float32 matrix": rng.normal(size=(3, 4)).astype(np.float32),
    "float64 3-d": rng.normal(size=(2, 3, 4)),
    "float16": rng.normal(size=7).astype(np.float16),
    "int8": rng.integers(-100, 100, size=(5, 2), dtype=np.int8),
    "int64": rng.integers(0, 2**40, size=9),
    "uint8": rng.integers(0, 255, size=(2, 2), dtype=np.uint8),
    "bool": rng.random(6) > 0.5,
    "complex64": (rng.normal(size=3) + 1j * rng.normal(size=3)).astype(np.complex64),
    "big-endian float32": rng.normal(size=5).astype(">f4"),
    "scalar": np.array(3.25),
    "empty": np.zeros((0, 3), np.float32),
    "fortran order": np.asfortranarray(rng.normal(size=(3, 5)).astype(np.float32)),
    "structured": np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
}


def _raw_array(payload: bytes, dtype: str = "float32", shape: tuple[int, ...] = (4,)) -> Array:
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=payload)


@pytest.mark.parametrize("name", list(ARRAYS))
def test_decode_equals_flowers_numpy(name: str) -> None:
    array = Array(ARRAYS[name])
    ours, flowers = decode_array(array), array.numpy()
    assert ours.dtype == flowers.dtype and ours.shape == flowers.shape
    np.testing.assert_array_equal(ours, flowers)
    assert ours.flags.f_contiguous == flowers.flags.f_contiguous
    assert ours.flags.c_contiguous == flowers.flags.c_contiguous


def test_decode_is_a_read_only_view_of_the_message_bytes() -> None:
    array = Array(rng.normal(size=1000).astype(np.float32))
    value = decode_array(array)
    assert not value.flags.writeable
    assert not value.flags.owndata
    with pytest.raises(ValueError):
        value[0] = 1.0


def test_decode_reads_npy_version_2_headers() -> None:
    value = rng.normal(size=(4, 3)).astype(np.float32)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, value, version=(2, 0))
    decoded = decode_array(_raw_array(buffer.getvalue(), shape=(4, 3)))
    np.testing.assert_array_equal(decoded, value)


def test_decode_refuses_object_dtype_like_np_load() -> None:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([1, "a"], dtype=object), allow_pickle=True)
    array = _raw_array(buffer.getvalue(), dtype="object", shape=(2,))
    with pytest.raises(ValueError):
        array.numpy()
    with pytest.raises(ValueError, match="object dtype"):
        decode_array(array)


@pytest.mark.parametrize(
    "mangle, reason",
    [
        (lambda data: data[:-1], "payload holds"),
        (lambda data: data + b"\0\0\0\0", "payload holds"),
        (lambda data: data[:20], "truncated .npy header"),
        (lambda data: data[:8], "bad magic"),
        (lambda data: b"\x94" + data[1:], "bad magic"),
        (lambda data: data[:6] + b"\x07\x00" + data[8:], "version 7.0"),
    ],
)
def test_decode_refuses_malformed_payloads(mangle, reason: str) -> None:
    data = Array(np.zeros(4, np.float32)).data
    with pytest.raises(ValueError, match=reason):
        decode_array(_raw_array(mangle(data)))


def test_decode_refuses_other_serialisations() -> None:
    array = Array(dtype="float32", shape=(4,), stype="torch.raw", data=b"\0" * 16)
    with pytest.raises(ValueError, match="unsupported serialisation"):
        decode_array(array)


def test_check_train_reply_rejects_data_that_contradicts_the_metadata() -> None:
    lying = Array(dtype="float32", shape=(4,), stype="numpy.ndarray",
                  data=Array(np.zeros(5, np.float32)).data)
    content = RecordDict({"arrays": ArrayRecord({"w": lying}),
                          "metrics": MetricRecord({"num-examples": 3})})
    with pytest.raises(InvalidReply, match="w"):
        check_train_reply(reply(content, 5), {"w": ArraySpec((4,), "float32")})


def test_check_train_reply_can_leave_the_finiteness_check_to_the_aggregation() -> None:
    nan = np.array([np.nan, 0, 0, 0], np.float32)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(nan)}),
                          "metrics": MetricRecord({"num-examples": 3})})
    spec = {"w": ArraySpec((4,), "float32")}
    with pytest.raises(InvalidReply, match="NaN or Inf"):
        check_train_reply(reply(content, 5), spec)
    accepted = check_train_reply(reply(content, 5), spec, check_finite=False)
    assert np.isnan(accepted.arrays["w"][0])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.complex64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("position", [0, 77, -1])
def test_all_finite_finds_every_nan_and_inf(dtype, bad: float, position: int) -> None:
    value = np.ones(5000, dtype=dtype)  # above the size where the BLAS screen is used
    assert all_finite(value)
    value[position] = bad
    assert not all_finite(value)
    assert not all_finite(value.reshape(50, 100).T)  # Fortran-contiguous view
    assert not all_finite(value[::-1])  # not contiguous
    assert not all_finite(value[position:][:10])  # small: exact check


def test_all_finite_is_exact_when_squares_overflow() -> None:
    assert all_finite(np.full(5000, 3e38, np.float32))
    assert all_finite(np.full(5000, 1e200))
    assert all_finite(np.arange(10))
    assert all_finite(np.zeros(0, np.float32))


def _reference(arrays, weights):
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return {k: sum(wk * np.asarray(a[k], np.float64) for wk, a in zip(w, arrays)) for k in arrays[0]}


@pytest.mark.parametrize("num_clients", [1, 3, GROUP, GROUP + 1, 3 * GROUP + 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocked_weighted_mean_matches_float64_reference(num_clients: int, dtype) -> None:
    local = np.random.default_rng(num_clients)
    shapes = {"big": (BLOCK + 3,), "matrix": (7, 9), "scalar": (), "empty": (0,)}
    arrays = [{k: local.normal(size=s).astype(dtype) for k, s in shapes.items()}
              for _ in range(num_clients)]
    weights = local.integers(1, 1000, size=num_clients)
    ours, expected = weighted_mean(arrays, weights), _reference(arrays, weights)
    for key, shape in shapes.items():
        assert ours[key].dtype == dtype and ours[key].shape == shape
        np.testing.assert_allclose(ours[key], expected[key], rtol=0,
                                   atol=1e-6 if dtype == np.float32 else 1e-12)


def test_weighted_mean_of_many_clients_equals_flowers_fedavg() -> None:
    local = np.random.default_rng(3)
    arrays = [{"w": local.normal(size=(300, 7)).astype(np.float32)} for _ in range(100)]
    counts = local.integers(1, 5000, size=100)
    flowers = aggregate_arrayrecords(
        [RecordDict({"a": ArrayRecord({"w": Array(a["w"])}),
                     "m": MetricRecord({"num-examples": int(n)})}) for a, n in zip(arrays, counts)],
        "num-examples",
    )
    np.testing.assert_allclose(weighted_mean(arrays, counts)["w"], flowers["w"].numpy(), atol=1e-6)


def test_weighted_mean_takes_read_only_fortran_and_integer_arrays() -> None:
    a = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    a.flags.writeable = False
    b = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(weighted_mean([{"x": a}, {"x": b}], [1, 1])["x"], (a + b) / 2)
    ints = weighted_mean([{"n": np.array([2, 4])}, {"n": np.array([4, 8])}], [1, 1])["n"]
    assert ints.dtype == np.int64 and ints.tolist() == [3, 6]


def test_weighted_mean_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        weighted_mean([{"x": np.zeros(3)}, {"x": np.zeros(4)}], [1, 1])


def test_finite_weighted_mean_rejects_nan_and_inf_clients_and_averages_the_rest() -> None:
    local = np.random.default_rng(9)
    arrays = [{"w": local.normal(size=BLOCK + 10).astype(np.float32), "b": np.ones(3, np.float32)}
              for _ in range(20)]
    weights = local.integers(1, 100, size=20)
    arrays[4] = dict(arrays[4], b=np.array([0, np.nan, 0], np.float32))
    arrays[11] = dict(arrays[11], w=np.full(BLOCK + 10, np.inf, np.float32))
    mean, rejected = finite_weighted_mean(arrays, weights)
    assert rejected == [4, 11]
    keep = [i for i in range(20) if i not in (4, 11)]
    expected = weighted_mean([arrays[i] for i in keep], weights[keep])
    for key in expected:
        np.testing.assert_array_equal(mean[key], expected[key])
    clean, none_rejected = finite_weighted_mean([arrays[0], arrays[1]], [1, 2])
    assert none_rejected == [] and all(np.isfinite(v).all() for v in clean.values())


def test_finite_weighted_mean_with_no_finite_client() -> None:
    mean, rejected = finite_weighted_mean([{"w": np.array([np.nan])}, {"w": np.array([np.inf])}], [1, 1])
    assert mean is None and rejected == [0, 1]


def test_finite_weighted_mean_never_overflows_on_finite_extremes() -> None:
    big = np.finfo(np.float32).max
    arrays = [{"w": np.full(5, big, np.float32)} for _ in range(GROUP + 3)]
    mean, rejected = finite_weighted_mean(arrays, np.arange(1, GROUP + 4))
    assert rejected == [] and np.isfinite(mean["w"]).all()
    np.testing.assert_allclose(mean["w"], big, rtol=1e-6)


@pytest.mark.parametrize("num_clients", [1, 5, GROUP + 1, 2 * GROUP + 3])
def test_equal_weights_take_the_unscaled_sum_path_and_stay_exact(num_clients: int) -> None:
    local = np.random.default_rng(num_clients + 100)
    arrays = [{"w": local.normal(size=BLOCK + 5).astype(np.float32)} for _ in range(num_clients)]
    weights = [600] * num_clients
    np.testing.assert_allclose(weighted_mean(arrays, weights)["w"],
                               _reference(arrays, weights)["w"], rtol=0, atol=1e-6)


def _client_models(num: int, seed: int, dtype=np.float32):
    local = np.random.default_rng(seed)
    shapes = {"k": (NORM_BLOCK * 2 + 17,), "m": (13, 7), "s": ()}
    reference = {k: local.normal(0, 0.1, size=s).astype(dtype) for k, s in shapes.items()}
    clients = [
        {k: (v + local.normal(0, 10.0 ** -local.integers(1, 4), size=v.shape)).astype(dtype)
         for k, v in reference.items()}
        for _ in range(num)
    ]
    return reference, clients


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_norm_equals_the_float64_norm_of_the_update(dtype) -> None:
    reference, clients = _client_models(5, 1, dtype)
    for client in clients:
        expected = l2_norm(model_update(client, reference))
        assert update_norm(client, reference) == pytest.approx(expected, rel=1e-12)
    assert update_norm(reference, reference) == 0.0


def test_update_norm_is_not_finite_for_nan_or_inf_and_exact_for_huge_values() -> None:
    reference, clients = _client_models(1, 2)
    bad = dict(clients[0], k=clients[0]["k"].copy())
    bad["k"][NORM_BLOCK + 3] = np.nan
    assert math.isnan(update_norm(bad, reference))
    bad["k"][NORM_BLOCK + 3] = np.inf
    assert update_norm(bad, reference) == np.inf
    huge = {"w": np.full(3, 1e300)}
    assert update_norm(huge, {"w": np.zeros(3)}) == pytest.approx(math.sqrt(3) * 1e300)
    with pytest.raises(ValueError, match="shape"):
        update_norm({"w": np.zeros(2)}, {"w": np.zeros(3)})
    with pytest.raises(ValueError, match="missing"):
        update_norm({}, {"w": np.zeros(3)})


@pytest.mark.parametrize("num_clients", [0, 1, GROUP, GROUP + 3])
def test_scaled_update_sum_equals_the_float64_clipped_sum(num_clients: int) -> None:
    reference, clients = _client_models(num_clients, 3)
    norms = [update_norm(c, reference) for c in clients]
    factors = [min(1.0, 0.05 / n) for n in norms]
    ours = scaled_update_sum(clients, reference, factors)
    for key, ref in reference.items():
        expected = sum(
            (f * np.subtract(c[key], ref, dtype=np.float64) for c, f in zip(clients, factors)),
            np.zeros(ref.shape),
        )
        assert ours[key].dtype == np.float64 and ours[key].shape == ref.shape
        scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1e-30)
        np.testing.assert_allclose(ours[key], expected, rtol=0, atol=1e-6 * scale)
    with pytest.raises(ValueError, match="factors"):
        scaled_update_sum(clients, reference, [1.0] * (num_clients + 1))
