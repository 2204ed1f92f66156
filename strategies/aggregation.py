"""Weighted averaging of client arrays and metrics (McMahan et al. 2017, Algorithm 1).

The kernels behind both strategies' aggregation: the FedAvg mean
(:func:`weighted_mean`, :func:`finite_weighted_mean`, which also screens for
NaN/Inf) and DP-FedAvg's update norms and clipped sum (:func:`update_norms`,
:func:`scaled_update_sum`; McMahan et al. 2018, https://arxiv.org/abs/1710.06963).
Each reads every client byte once per pass, block by block in cache, with no
full-size temporaries, scaling and adding with one BLAS axpy per client block
(scipy's, on one thread: :func:`single_threaded_blas`) where numpy would need
a multiply and an add. Their speed against a one-pass numpy floor and Flower's
``aggregate_arrayrecords`` is in ``bench/results/aggregation.md``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np


def normalized_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Return ``weights / sum(weights)`` as float64; all must be positive and finite."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError("need a non-empty 1-D sequence of weights")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be positive and finite, got {w.tolist()}")
    return w / w.sum()


#: Elements per block (256 Ki float32 = 1 MiB): a block of every client's array
#: is reduced while the block's partial sum stays in cache. Each client is read
#: in runs of a whole block; shorter runs (64 Ki) measured 1.4x slower on the
#: 100-client x 1.7M-parameter cell of ``bench/aggregation.py``.
BLOCK = 262_144
#: Clients summed into one float32 partial sum before it joins the block's total
#: (see :func:`group_size`): float32 rounding compounds over a group and over the
#: partial sums, never over all the clients one after the other.
GROUP = 16
#: Arrays of at most this many elements (biases, small heads), whose per-client
#: calls would cost more than their bytes, are averaged at once: all clients'
#: copies stacked (in float64, at most :data:`SMALL_TOTAL` elements) and
#: multiplied by the weight vector.
SMALL = 4096
SMALL_TOTAL = 1 << 20


def group_size(num_clients: int) -> int:
    """Clients per partial sum: :data:`GROUP`, or ``ceil(sqrt(n))`` for more than 256 clients.

    Every output element is then a float32 sum of at most ``group + ceil(n / group)``
    terms (32 up to 256 clients, ``2 ceil(sqrt(n))`` beyond), where a plain running
    sum (Flower's ``aggregate_arrayrecords``) has ``n``.
    """
    if num_clients <= GROUP * GROUP:
        return GROUP
    return math.isqrt(num_clients - 1) + 1


# ------------------------------------------------------------------ BLAS
# numpy has no fused multiply-add ufunc: ``acc += w * x`` is two ufunc passes
# and a temporary. BLAS axpy (``y += a x``) is one pass, as cheap as the plain
# ``np.add`` of the floor. scipy ships it (a dependency of dp-accounting and
# scikit-learn); without scipy or threadpoolctl the numpy two-pass path runs.
_Axpy = Callable[..., np.ndarray]
_BLAS_LOCK = threading.Lock()
_blas: tuple[dict[np.dtype, _Axpy], Any] | None = None
_blas_loaded = False
# The thread that set BLAS to one thread (see single_threaded_blas), how often it is inside.
_limit_owner: int | None = None
_limit_depth = 0
_saved_threads: list[tuple[Any, int]] = []


def _load_blas() -> tuple[dict[np.dtype, _Axpy], Any] | None:
    """``({float32: saxpy, float64: daxpy}, BLAS thread controller)``, or ``None`` without them."""
    global _blas, _blas_loaded  # pylint: disable=global-statement
    if not _blas_loaded:
        with _BLAS_LOCK:
            if not _blas_loaded:
                try:
                    from scipy.linalg.blas import daxpy, saxpy
                    from threadpoolctl import ThreadpoolController

                    # After the scipy import, so that scipy's OpenBLAS is among the libraries.
                    controller = ThreadpoolController().select(user_api="blas")
                    _blas = ({np.dtype(np.float32): saxpy, np.dtype(np.float64): daxpy}, controller)
                except Exception:  # pylint: disable=broad-exception-caught
                    _blas = None
                _blas_loaded = True
    return _blas


def _single_thread_axpys() -> dict[np.dtype, _Axpy] | None:
    """scipy's BLAS axpy per dtype if every BLAS library runs on one thread now, else ``None``."""
    blas = _load_blas()
    if blas is None or any(lib.get_num_threads() != 1 for lib in blas[1].lib_controllers):
        return None
    return blas[0]


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the BLAS calls inside on one thread where possible; re-entrant, and thread-safe.

    OpenBLAS splits an axpy or a dot of more than 10,000 elements over all
    cores. The kernels here make hundreds of such calls on cache-sized blocks,
    and on a busy machine every threaded call waits for a core: measured 6x
    slower (median) than one thread on the 2 shared cores of our benchmark
    machine. The first thread in sets every BLAS library (numpy's, scipy's) to
    one thread and restores the original counts when it leaves (a few
    microseconds); other threads inside meanwhile leave the counts alone.

    OpenBLAS ignores the setting from a thread other than the main one (or the
    one that started its thread pool), e.g. in Flower's simulation, which runs
    the ServerApp in a thread. The kernels therefore read the counts back and
    use BLAS axpy (and long dot blocks) only when every library runs on one
    thread; otherwise they run on numpy, as they do without scipy or
    threadpoolctl.
    """
    global _limit_owner, _limit_depth, _saved_threads  # pylint: disable=global-statement
    blas = _load_blas()
    if blas is None:
        yield
        return
    me = threading.get_ident()
    with _BLAS_LOCK:
        owner = _limit_owner is None or _limit_owner == me
        if _limit_owner is None:
            _limit_owner = me
            _saved_threads = [(lib, lib.get_num_threads()) for lib in blas[1].lib_controllers]
            for lib, threads in _saved_threads:
                if threads != 1:
                    lib.set_num_threads(1)
        if owner:
            _limit_depth += 1
    try:
        yield
    finally:
        if owner:
            with _BLAS_LOCK:
                _limit_depth -= 1
                if _limit_depth == 0:
                    for lib, threads in _saved_threads:
                        if threads != 1:
                            lib.set_num_threads(threads)
                    _saved_threads = []
                    _limit_owner = None


def _axpy_into(axpy: _Axpy, x: np.ndarray, y: np.ndarray, a: float) -> None:
    """``y += a x`` in place with BLAS (``y`` a contiguous, aligned block)."""
    result = axpy(x, y, a=a)
    if result is not y:  # f2py copied y (not expected for our buffers): write it back
        y[...] = result


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
    (:data:`BLOCK` elements) straight into the output: for each block, every
    client's slice is scaled and added with one BLAS axpy into a
    cache-resident partial sum, so each client byte is read from memory
    exactly once, with one pass, and no full-size temporary is allocated.
    Partial sums cover :func:`group_size` clients and are added into the
    block's total, which bounds the float32 rounding (about 1e-7 relative per
    term) by a sum of ``group + n / group`` terms, not ``n``. Without scipy the
    same runs on numpy (a multiply and an add per client block). Small arrays
    (:data:`SMALL`) are stacked and averaged in float64 with one product by the
    weight vector. Other dtypes (integers, float16) take a float64 path whose
    result is cast back.
    """
    w = normalized_weights(weights)
    num = len(arrays)
    if num != len(w):
        raise ValueError(f"{num} clients but {len(w)} weights")
    result: dict[str, np.ndarray] = {}
    with single_threaded_blas():
        axpys = _single_thread_axpys()
        for key, first in arrays[0].items():
            first = np.asarray(first)
            flats: list[np.ndarray] = []
            same_dtype = True
            for index, client in enumerate(arrays):
                value = np.asarray(client[key])
                if value.shape != first.shape:
                    raise ValueError(
                        f"array '{key}' of client {index} has shape {value.shape}, "
                        f"client 0's has {first.shape}"
                    )
                same_dtype = same_dtype and value.dtype == first.dtype
                flats.append(value.ravel())  # a view when C-contiguous
            if first.dtype.kind == "f" and first.size <= SMALL and first.size * num <= SMALL_TOTAL:
                stacked = np.concatenate(flats, dtype=np.float64).reshape(num, first.size)
                mean = np.dot(w, stacked).astype(first.dtype)
            elif same_dtype and first.dtype in (np.float32, np.float64):
                axpy = None if axpys is None else axpys.get(first.dtype)
                mean = _blocked_weighted_sum(flats, w, first.dtype, axpy)
            else:
                mean = _float64_weighted_sum(flats, w).astype(first.dtype, copy=False)
            result[key] = mean.reshape(first.shape)
    return result


def _float64_weighted_sum(values: Sequence[np.ndarray], w: np.ndarray) -> np.ndarray:
    """``sum_k w_k x_k`` accumulated in float64, whole arrays at a time (any numeric dtype)."""
    acc = np.multiply(values[0], w[0], dtype=np.float64)
    scratch = np.empty_like(acc)
    for value, wk in zip(values[1:], w[1:]):
        np.multiply(value, wk, out=scratch)
        acc += scratch
    return acc


def _blocked_weighted_sum(
    flats: Sequence[np.ndarray], w: np.ndarray, dtype: np.dtype, axpy: _Axpy | None = None
) -> np.ndarray:
    """``sum_k w_k x_k`` of 1-D float32/float64 arrays, block by block (see :func:`weighted_mean`).

    The first group of each block is summed in the output itself, later groups
    in a partial-sum buffer then added to it. With BLAS every client block after
    a group's first is one axpy; on the numpy path, equal weights (equal-sized
    partitions) are summed unscaled and scaled once at the end: one ufunc call
    per client block instead of two.
    """
    size = flats[0].size
    out = np.empty(size, dtype=dtype)
    num = len(flats)
    if size == 0:
        return out
    block = min(BLOCK, size)
    group = group_size(num)
    uniform = axpy is None and bool(np.all(w == w[0]))
    wk_in = w.astype(dtype)
    partial = np.empty(block, dtype=dtype) if num > group else out[:0]
    scratch = np.empty(block, dtype=dtype) if axpy is None and not uniform and num > 1 else out[:0]
    for start in range(0, size, block):
        stop = min(start + block, size)
        total = out[start:stop]
        for first in range(0, num, group):
            part = total if first == 0 else partial[: stop - start]
            if uniform:
                np.copyto(part, flats[first][start:stop])
            else:
                np.multiply(flats[first][start:stop], wk_in[first], out=part)
            for k in range(first + 1, min(first + group, num)):
                if axpy is not None:
                    _axpy_into(axpy, flats[k][start:stop], part, float(w[k]))
                elif uniform:
                    np.add(part, flats[k][start:stop], out=part)
                else:
                    tmp = scratch[: stop - start]
                    np.multiply(flats[k][start:stop], wk_in[k], out=tmp)
                    np.add(part, tmp, out=part)
            if first:
                np.add(total, part, out=total)
        if uniform:
            np.multiply(total, w[0], out=total)
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
    with single_threaded_blas():
        return _finite_weighted_mean(arrays, weights)


def _finite_weighted_mean(
    arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float] | np.ndarray
) -> tuple[dict[str, np.ndarray] | None, list[int]]:
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


#: Elements per block of the update norm: each client is read in runs of 64 Ki
#: elements, whose float64 differences (512 KiB) stay in L2. Where BLAS cannot
#: be held to one thread (see :func:`single_threaded_blas`), blocks of
#: :data:`UNTHREADED_BLOCK` keep every dot below OpenBLAS's threading threshold.
NORM_BLOCK = 65_536
UNTHREADED_BLOCK = 8192


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm of ``arrays - reference`` (all keys as one vector), without temporaries.

    One client's :func:`update_norms`.

    Raises
    ------
    ValueError
        If a key of ``reference`` is missing from ``arrays`` or a shape differs.
    """
    return update_norms([arrays], reference)[0]


def update_norms(
    arrays: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray]
) -> list[float]:
    """Global L2 norm of every client's ``arrays - reference`` (all keys as one vector).

    Equal (to float64 rounding) to ``clipping.l2_norm(clipping.model_update(client,
    reference))`` for each client, but block by block: a block of the reference
    is cast to float64 once for all clients, each client's block is cast to
    float64 (exact for float32), the reference subtracted, and the squares
    summed with a BLAS dot on one thread (:func:`single_threaded_blas`). Each
    client byte is read once and no full-size update is allocated. NaN or Inf
    anywhere gives a non-finite norm (which callers reject); only keys of
    ``reference`` are read.

    Raises
    ------
    ValueError
        If a key of ``reference`` is missing from a client's arrays or a shape differs.
    """
    totals = [0.0] * len(arrays)
    flats_by_key: list[tuple[np.ndarray, list[np.ndarray]]] = []
    for key, ref in reference.items():
        ref = np.asarray(ref)
        flats = []
        for client in arrays:
            if key not in client:
                raise ValueError(f"array '{key}' is missing")
            value = np.asarray(client[key])
            if value.shape != ref.shape:
                raise ValueError(f"array '{key}' has shape {value.shape}, expected {ref.shape}")
            flats.append(value.ravel())
        flats_by_key.append((ref.ravel(), flats))
    largest = max((r.size for r, _ in flats_by_key), default=0)
    with single_threaded_blas(), np.errstate(all="ignore"):
        step = NORM_BLOCK if _single_thread_axpys() is not None else UNTHREADED_BLOCK
        ref_block = np.empty(min(step, largest), dtype=np.float64)
        diff = np.empty_like(ref_block)
        for r, flats in flats_by_key:
            for start in range(0, r.size, step):
                stop = min(start + step, r.size)
                rb, d = ref_block[: stop - start], diff[: stop - start]
                np.copyto(rb, r[start:stop])
                for index, x in enumerate(flats):
                    np.copyto(d, x[start:stop])
                    np.subtract(d, rb, out=d)
                    totals[index] += float(np.dot(d, d))
    return [
        math.sqrt(total) if math.isfinite(total) else _rescaled_norm(client, reference)
        for total, client in zip(totals, arrays)
    ]


def _rescaled_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """Norm of a NaN/Inf update (returned as such), or of entries whose squares overflow."""
    scale = 0.0
    with np.errstate(all="ignore"):
        for key, ref in reference.items():
            diff = np.subtract(arrays[key], ref, dtype=np.float64)
            if diff.size:
                largest = float(np.max(np.abs(diff)))
                if not largest <= scale:  # larger, or NaN (``max`` would keep 0.0 over NaN)
                    scale = largest
                    if not math.isfinite(scale):
                        return scale
    if scale == 0.0:
        return scale
    total = 0.0
    for key, ref in reference.items():
        diff = np.subtract(arrays[key], ref, dtype=np.float64).ravel() / scale
        total += float(np.dot(diff, diff))
    return scale * math.sqrt(total)


#: Smallest clip factor applied in float32 (:func:`scaled_update_sum`); smaller
#: ones, and every client of a huge update, are applied in float64.
FLOAT32_SAFE_FACTOR = 1e-20
#: Smallest scaled-update norm summed in float32 (see :func:`scaled_update_sum`).
FLOAT32_SAFE_NORM = 1e-30


def scaled_update_sum(
    arrays: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    factors: Sequence[float] | np.ndarray,
    norms: Sequence[float] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """``sum_k factors_k (arrays_k - reference)`` per key of ``reference``, in float64.

    ``norms`` (the updates' norms, :func:`update_norms`), when given, route
    every client whose scaled update would be tiny (norm times factor below
    :data:`FLOAT32_SAFE_NORM`) to float64 too, where float32's subnormal
    rounding could otherwise inflate it.

    The clipped-update sum of DP-FedAvg (``factors_k = min(1, C / norm_k)``,
    from :func:`update_norms`), computed like :func:`weighted_mean`: block by
    block in cache, each client's difference formed in the input precision
    (exact for float32 values within a factor 2 of each other, else rounded to
    1e-7 relative) and added, scaled, with one BLAS axpy into a partial sum over
    :data:`GROUP` clients, which is then added into the float64 result. Each
    client byte is read once; no per-client update array is allocated. With no
    client, zeros.
    """
    f = np.asarray(factors, dtype=np.float64)
    if f.ndim != 1 or len(f) != len(arrays):
        raise ValueError(f"{len(arrays)} clients but {f.size} factors")
    # float32 arithmetic is exact enough (1e-7 relative) only while the factor
    # and the scaled entries stay far from float32's overflow and subnormals.
    safe = (f == 1.0) | ((f >= FLOAT32_SAFE_FACTOR) & (f <= 1.0))
    if norms is not None:
        safe &= np.asarray(norms, dtype=np.float64) * f >= FLOAT32_SAFE_NORM
    result: dict[str, np.ndarray] = {}
    with single_threaded_blas():
        axpys = _single_thread_axpys()
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
                        f"array '{key}' of client {index} has shape {value.shape}, "
                        f"expected {ref.shape}"
                    )
            dtype = ref.dtype if ref.dtype in (np.float32, np.float64) else np.dtype(np.float64)
            if any(value.dtype != dtype for value in values):
                dtype = np.dtype(np.float64)
            axpy = None if axpys is None else axpys.get(dtype)
            flats = [value.ravel() for value in values]
            # Clients whose difference or factor leaves float32's safe range
            # (huge entries, a factor near float32's subnormals) are summed in
            # float64 on their own: a float32 factor of 1e-39 is subnormal
            # and rounds, so a crafted update could contribute ~2 C.
            exact = [k for k in range(len(flats)) if dtype == np.float32 and not safe[k]]
            if exact:
                for k in exact:
                    diff = np.subtract(flats[k], ref.ravel(), dtype=np.float64)
                    out += diff * f[k]
                keep = [k for k in range(len(flats)) if k not in set(exact)]
                flats, fk = [flats[k] for k in keep], f[keep]
            else:
                fk = f
            if flats:
                _blocked_update_sum(flats, ref.ravel(), fk, dtype, out, axpy)
            result[key] = out.reshape(ref.shape)
    return result


def _blocked_update_sum(  # pylint: disable=too-many-arguments
    flats: Sequence[np.ndarray],
    r: np.ndarray,
    f: np.ndarray,
    dtype: np.dtype,
    out: np.ndarray,
    axpy: _Axpy | None,
) -> None:
    """``out += sum_k f_k (flats_k - r)``, block by block (see :func:`scaled_update_sum`)."""
    fk = f.astype(dtype)
    block = min(BLOCK, r.size)
    partial, scratch = np.empty(block, dtype=dtype), np.empty(block, dtype=dtype)
    for start in range(0, r.size, block):
        stop = min(start + block, r.size)
        part, tmp, total = partial[: stop - start], scratch[: stop - start], out[start:stop]
        rb = r[start:stop]
        for first in range(0, len(flats), GROUP):
            np.subtract(flats[first][start:stop], rb, out=part)
            if f[first] != 1.0:
                np.multiply(part, fk[first], out=part)
            for k in range(first + 1, min(first + GROUP, len(flats))):
                np.subtract(flats[k][start:stop], rb, out=tmp)
                if axpy is not None:
                    _axpy_into(axpy, tmp, part, float(f[k]))
                elif f[k] != 1.0:
                    np.multiply(tmp, fk[k], out=tmp)
                    np.add(part, tmp, out=part)
                else:
                    np.add(part, tmp, out=part)
            np.add(total, part, out=total)


def weighted_metrics(
    metrics: Sequence[Mapping[str, float]], weights: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """Weighted mean of each scalar metric over the clients that report it.

    A privacy loss (a key containing ``epsilon``, e.g. DP-SGD's per-client
    ``sample-epsilon``) is not averaged: a mean would understate the worst
    client's loss. It is reported as its maximum under ``<key>-max``.
    """
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
            if "epsilon" in key:
                result[f"{key}-max"] = float(values.max())
            else:
                result[key] = float(np.dot(values, ws) / ws.sum())
    return result
