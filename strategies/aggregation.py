"""Weighted averaging of client arrays and metrics (McMahan et al. 2017, Algorithm 1).

The array mean reads each client byte once, block by block in cache, with no
full-size temporaries (see :func:`weighted_mean`); its speed against numpy's
floor and Flower's ``aggregate_arrayrecords`` is in ``bench/results/aggregation.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def normalized_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Return ``weights / sum(weights)`` as float64; all must be positive and finite."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError("need a non-empty 1-D sequence of weights")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be positive and finite, got {w.tolist()}")
    return w / w.sum()


#: Elements per block: a block of every client's array is reduced while the
#: block's partial sums stay in the CPU cache (64 Ki float32 = 256 KiB).
BLOCK = 65_536
#: Clients summed in the input precision before their partial sum joins the
#: float64 accumulator: float32 rounding never compounds over more than this
#: many terms, however many clients there are.
GROUP = 16


def weighted_mean(
    arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float] | np.ndarray
) -> dict[str, np.ndarray]:
    """Weighted mean, key by key, of several clients' arrays.

    Parameters
    ----------
    arrays : sequence of mapping str -> np.ndarray
        One mapping per client, all with the same keys, shapes and dtypes
        (read-only views are fine: the inputs are never written).
    weights : sequence of float
        Positive weight per client (e.g. its number of training examples);
        normalised here.

    Returns
    -------
    dict
        ``sum_k w_k x_k / sum_k w_k`` per key, in the first client's dtype.

    Notes
    -----
    For float32/float64 arrays the reduction runs block by block
    (:data:`BLOCK` elements): for each block, every client's slice is scaled
    and added into a cache-resident partial sum, so each client byte is read
    from memory exactly once and no full-size temporary is ever allocated.
    Products and partial sums of up to :data:`GROUP` clients are formed in the
    input precision and then added into a float64 accumulator, so the error is
    that of a :data:`GROUP`-term float32 sum (about 1e-7 relative), not one that
    grows with the number of clients. Other dtypes (integers, float16) take a
    float64 path whose result is cast back, as before.
    """
    w = normalized_weights(weights)
    if len(arrays) != len(w):
        raise ValueError(f"{len(arrays)} clients but {len(w)} weights")
    result: dict[str, np.ndarray] = {}
    for key, first in arrays[0].items():
        first = np.asarray(first)
        values = [np.asarray(client[key]) for client in arrays]
        for index, value in enumerate(values):
            if value.shape != first.shape:
                raise ValueError(
                    f"array '{key}' of client {index} has shape {value.shape}, "
                    f"client 0's has {first.shape}"
                )
        same_dtype = all(value.dtype == first.dtype for value in values)
        if same_dtype and first.dtype in (np.float32, np.float64):
            flats = [value.ravel() for value in values]  # views when C-contiguous
            result[key] = _blocked_weighted_sum(flats, w, first.dtype).reshape(first.shape)
        else:
            result[key] = _float64_weighted_sum(values, w).astype(first.dtype, copy=False)
    return result


def _float64_weighted_sum(values: Sequence[np.ndarray], w: np.ndarray) -> np.ndarray:
    """``sum_k w_k x_k`` accumulated in float64, whole arrays at a time (any numeric dtype)."""
    acc = np.multiply(values[0], w[0], dtype=np.float64)
    scratch = np.empty_like(acc)
    for value, wk in zip(values[1:], w[1:]):
        np.multiply(value, wk, out=scratch)
        acc += scratch
    return acc


def _blocked_weighted_sum(flats: Sequence[np.ndarray], w: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``sum_k w_k x_k`` of 1-D float32/float64 arrays, block by block (see :func:`weighted_mean`).

    With equal weights (equal-sized partitions, DP's uniform mean) the blocks
    are summed unscaled and scaled once at the end: one ufunc call per client
    block instead of two.
    """
    size = flats[0].size
    out = np.empty(size, dtype=dtype)
    num = len(flats)
    if size == 0:
        return out
    block = min(BLOCK, size)
    uniform = bool(np.all(w == w[0]))
    wk_in = w.astype(dtype)
    partial = np.empty(block, dtype=dtype)
    scratch = np.empty(block, dtype=dtype)
    grouped = num > GROUP and dtype != np.float64
    acc = np.empty(block, dtype=np.float64) if grouped else partial
    group = GROUP if grouped else num
    for start in range(0, size, block):
        stop = min(start + block, size)
        n = stop - start
        part, tmp, total = partial[:n], scratch[:n], acc[:n]
        for first in range(0, num, group):
            last = min(first + group, num)
            if uniform:
                np.copyto(part, flats[first][start:stop])
                for k in range(first + 1, last):
                    np.add(part, flats[k][start:stop], out=part)
            else:
                np.multiply(flats[first][start:stop], wk_in[first], out=part)
                for k in range(first + 1, last):
                    np.multiply(flats[k][start:stop], wk_in[k], out=tmp)
                    np.add(part, tmp, out=part)
            if not grouped:
                pass  # total is part
            elif first == 0:
                total[...] = part
            else:
                np.add(total, part, out=total)
        if uniform:
            np.multiply(total, w[0], out=out[start:stop])
        else:
            out[start:stop] = total
    return out


def finite_weighted_mean(
    arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float] | np.ndarray
) -> tuple[dict[str, np.ndarray] | None, list[int]]:
    """:func:`weighted_mean` that also rejects clients holding NaN/Inf, in the same pass.

    A weighted mean with positive weights of finite values is finite, and any
    NaN/Inf in an input makes it non-finite; so the clients are averaged first
    and only a non-finite mean (one extra pass over the model-sized result,
    not over every client) triggers the per-client check. The mean is then
    recomputed over the finite clients.

    Returns
    -------
    tuple
        ``(mean, rejected)``: the mean over the clients with finite arrays
        (``None`` if there is none) and the indices of the clients that held
        NaN or Inf, in order.
    """
    from .validation import all_finite  # local: validation imports nothing from here

    with np.errstate(all="ignore"):
        mean = weighted_mean(arrays, weights)
    if all(all_finite(value) for value in mean.values()):
        return mean, []
    rejected = [
        index
        for index, client in enumerate(arrays)
        if not all(all_finite(value) for value in client.values())
    ]
    keep = [index for index in range(len(arrays)) if index not in rejected]
    if not keep:
        return None, rejected
    w = np.asarray(weights, dtype=np.float64)
    if rejected:
        with np.errstate(all="ignore"):
            mean = weighted_mean([arrays[i] for i in keep], w[keep])
    if not all(all_finite(value) for value in mean.values()):
        # Finite inputs whose float32 partial sums overflowed: redo it in float64.
        mean = {
            key: _float64_weighted_sum(
                [np.asarray(arrays[i][key]) for i in keep], normalized_weights(w[keep])
            ).astype(np.asarray(arrays[keep[0]][key]).dtype)
            for key in arrays[keep[0]]
        }
    return mean, rejected


#: Elements per block of the update norm: the float64 differences stay in L1/L2
#: and each BLAS dot stays below OpenBLAS's threading threshold (a threaded dot
#: can stall for milliseconds on a busy machine).
NORM_BLOCK = 8192


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm of ``arrays - reference`` (all keys as one vector), without temporaries.

    Equal (to float64 rounding) to ``clipping.l2_norm(clipping.model_update(arrays,
    reference))``, but block by block: the differences are formed in float64
    (exact for float32 inputs) :data:`NORM_BLOCK` elements at a time and
    squared-summed with a BLAS dot, so each client byte is read once and no
    full-size update is ever allocated. NaN or Inf anywhere gives a non-finite
    norm (which callers reject); only keys of ``reference`` are read.

    Raises
    ------
    ValueError
        If a key of ``reference`` is missing from ``arrays`` or a shape differs.
    """
    total = 0.0
    scratch = np.empty(NORM_BLOCK, dtype=np.float64)
    for key, ref in reference.items():
        if key not in arrays:
            raise ValueError(f"array '{key}' is missing")
        value, ref = np.asarray(arrays[key]), np.asarray(ref)
        if value.shape != ref.shape:
            raise ValueError(f"array '{key}' has shape {value.shape}, expected {ref.shape}")
        x, r = value.ravel(), ref.ravel()
        with np.errstate(all="ignore"):
            for start in range(0, x.size, NORM_BLOCK):
                stop = min(start + NORM_BLOCK, x.size)
                d = scratch[: stop - start]
                np.subtract(x[start:stop], r[start:stop], out=d, dtype=np.float64)
                total += float(np.dot(d, d))
    if math.isfinite(total):
        return math.sqrt(total)
    # NaN/Inf input (returned as such), or float64 entries so large their squares overflow.
    scale = 0.0
    with np.errstate(all="ignore"):
        for key, ref in reference.items():
            diff = np.subtract(arrays[key], ref, dtype=np.float64)
            if diff.size:
                scale = max(scale, float(np.max(np.abs(diff))))
    if not math.isfinite(scale) or scale == 0.0:
        return scale
    total = 0.0
    for key, ref in reference.items():
        diff = np.subtract(arrays[key], ref, dtype=np.float64).ravel() / scale
        total += float(np.dot(diff, diff))
    return scale * math.sqrt(total)


def scaled_update_sum(
    arrays: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    factors: Sequence[float] | np.ndarray,
) -> dict[str, np.ndarray]:
    """``sum_k factors_k (arrays_k - reference)`` per key of ``reference``, in float64.

    The clipped-update sum of DP-FedAvg (``factors_k = min(1, C / norm_k)``,
    from :func:`update_norm`), computed like :func:`weighted_mean`: block by
    block in cache, the differences and their scaled partial sums over up to
    :data:`GROUP` clients in the input precision (float32 subtraction of
    nearby values is exact), then added into float64. Each client byte is read
    once; no per-client update array is allocated. With no client, zeros.
    """
    f = np.asarray(factors, dtype=np.float64)
    if f.ndim != 1 or len(f) != len(arrays):
        raise ValueError(f"{len(arrays)} clients but {f.size} factors")
    result: dict[str, np.ndarray] = {}
    for key, ref in reference.items():
        ref = np.asarray(ref)
        out = np.zeros(ref.size, dtype=np.float64)
        if not len(arrays) or ref.size == 0:
            result[key] = out.reshape(ref.shape)
            continue
        values = [np.asarray(client[key]) for client in arrays]
        for index, value in enumerate(values):
            if value.shape != ref.shape:
                raise ValueError(
                    f"array '{key}' of client {index} has shape {value.shape}, expected {ref.shape}"
                )
        dtype = ref.dtype if ref.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        if any(value.dtype != dtype for value in values):
            dtype = np.dtype(np.float64)
        flats, r = [value.ravel() for value in values], ref.ravel()
        fk = f.astype(dtype)
        block = min(BLOCK, ref.size)
        partial, scratch = np.empty(block, dtype=dtype), np.empty(block, dtype=dtype)
        for start in range(0, ref.size, block):
            stop = min(start + block, ref.size)
            n = stop - start
            part, tmp, total = partial[:n], scratch[:n], out[start:stop]
            rb = r[start:stop]
            for first in range(0, len(flats), GROUP):
                np.subtract(flats[first][start:stop], rb, out=part)
                if f[first] != 1.0:
                    np.multiply(part, fk[first], out=part)
                for k in range(first + 1, min(first + GROUP, len(flats))):
                    np.subtract(flats[k][start:stop], rb, out=tmp)
                    if f[k] != 1.0:
                        np.multiply(tmp, fk[k], out=tmp)
                    np.add(part, tmp, out=part)
                np.add(total, part, out=total)
        result[key] = out.reshape(ref.shape)
    return result


def weighted_metrics(
    metrics: Sequence[Mapping[str, float]], weights: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """Weighted mean of each scalar metric over the clients that report it."""
    w = np.asarray(weights, dtype=np.float64)
    keys = sorted({key for record in metrics for key in record})
    result: dict[str, float] = {}
    for key in keys:
        pairs = [
            (float(record[key]), wk)
            for record, wk in zip(metrics, w)
            if key in record and isinstance(record[key], (int, float))
        ]
        if pairs:
            values, ws = np.array(pairs).T
            result[key] = float(np.dot(values, ws) / ws.sum())
    return result
