"""Rebuilding many of a round's Shamir-shared secrets at once, equal to Flower's ``combine_shares``.

Flower's ``combine_shares`` runs pycryptodome's ``Shamir.combine`` on every
16-byte chunk of every secret: Lagrange interpolation at 0 in GF(2^128) with
about ``t^2`` multiplications and ``t`` field inversions per chunk, each
multiplication a 128-step bit loop in Python. At 50 clients (threshold 30)
that was 3.7 s of a secure round's 4 s of server CPU
(``bench/results/secure_aggregation.md``). The interpolation weights depend
only on the share indices, which are the same for most of a round's secrets;
so here they are computed once per index set (one batched inversion), and
multiplying a chunk by a fixed weight uses that weight's byte tables (16
lookups). Same field (x^128 + x^7 + x^2 + x + 1, big-endian elements, as
pycryptodome), same share layout and padding as Flower's sharing; the
secrets are public to the server once rebuilt, so nothing here needs to run
in constant time. ``tests/test_secure_aggregation.py`` checks it against
``combine_shares`` byte for byte.
"""

from __future__ import annotations

from Crypto.Util.Padding import unpad

_BITS = 128
_MASK = (1 << _BITS) - 1
_REDUCTION = 0x87  # x^7 + x^2 + x + 1


def _times_x(value: int) -> int:
    value <<= 1
    return (value & _MASK) ^ _REDUCTION if value >> _BITS else value


def gf_multiply(a: int, b: int) -> int:
    """``a * b`` in GF(2^128) (shift-and-add)."""
    result = 0
    while b:
        if b & 1:
            result ^= a
        a = _times_x(a)
        b >>= 1
    return result


def gf_inverse(a: int) -> int:
    """``a^-1 = a^(2^128 - 2)`` (square and multiply); ValueError for 0."""
    if a == 0:
        raise ValueError("zero has no inverse")
    result, power, exponent = 1, a, (1 << _BITS) - 2
    while exponent:
        if exponent & 1:
            result = gf_multiply(result, power)
        power = gf_multiply(power, power)
        exponent >>= 1
    return result


def _byte_tables(weight: int) -> list[list[int]]:
    """``tables[k][b] = (b << 8k) * weight``: multiplication by ``weight`` is linear."""
    bit = [weight]
    for _ in range(_BITS - 1):
        bit.append(_times_x(bit[-1]))
    tables = []
    for k in range(16):
        row = [0] * 256
        for value in range(1, 256):
            low = value & -value
            row[value] = row[value ^ low] ^ bit[8 * k + low.bit_length() - 1]
        tables.append(row)
    return tables


def lagrange_weights(indices: tuple[int, ...]) -> list[int]:
    """``w_j = prod_{m != j} x_m / (x_j + x_m)``: the secret is ``sum_j w_j y_j``."""
    numerators, denominators = [], []
    for j, x_j in enumerate(indices):
        numerator = denominator = 1
        for m, x_m in enumerate(indices):
            if m != j:
                numerator = gf_multiply(numerator, x_m)
                denominator = gf_multiply(denominator, x_j ^ x_m)
        numerators.append(numerator)
        denominators.append(denominator)
    # One inversion for all denominators (Montgomery's trick).
    prefix = [1]
    for denominator in denominators:
        prefix.append(gf_multiply(prefix[-1], denominator))
    inverse = gf_inverse(prefix[-1])
    inverses = [0] * len(denominators)
    for j in range(len(denominators) - 1, -1, -1):
        inverses[j] = gf_multiply(inverse, prefix[j])
        inverse = gf_multiply(inverse, denominators[j])
    return [gf_multiply(n, i) for n, i in zip(numerators, inverses)]


#: Chunks to rebuild with one index set above which per-weight byte tables pay off.
_TABLES_FROM_CHUNKS = 64


def combine_shares_batch(share_lists: list[list[bytes]]) -> list[bytes]:
    """The secret behind each list of shares (Flower's share format: 4-byte index, 16-byte chunks).

    Raises
    ------
    ValueError
        On duplicate or zero indices, ragged shares or bad padding (as
        ``combine_shares``: "Failed to combine shares").
    """
    parsed = []
    chunks_by_indices: dict[tuple[int, ...], int] = {}
    for shares in share_lists:
        if not shares:
            raise ValueError("no shares")
        indices = tuple(int.from_bytes(share[:4], "little") for share in shares)
        if len(set(indices)) != len(indices) or 0 in indices:
            raise ValueError("duplicate or zero share index")
        length = len(shares[0])
        if (length - 4) % 16 or any(len(share) != length for share in shares):
            raise ValueError("shares differ in length or are not whole 16-byte chunks")
        parsed.append((indices, shares, length))
        chunks_by_indices[indices] = chunks_by_indices.get(indices, 0) + (length - 4) // 16
    weights_by_indices = {indices: lagrange_weights(indices) for indices in chunks_by_indices}
    tables_by_indices = {
        indices: [_byte_tables(w) for w in weights_by_indices[indices]]
        for indices, chunks in chunks_by_indices.items()
        if chunks >= _TABLES_FROM_CHUNKS
    }
    secrets = []
    for indices, shares, length in parsed:
        tables = tables_by_indices.get(indices)
        weights = weights_by_indices[indices]
        padded = bytearray()
        for start in range(4, length, 16):
            total = 0
            if tables is None:
                for weight, share in zip(weights, shares):
                    total ^= gf_multiply(weight, int.from_bytes(share[start : start + 16], "big"))
            else:
                for table, share in zip(tables, shares):
                    chunk = share[start : start + 16]
                    for k in range(16):
                        total ^= table[k][chunk[15 - k]]
            padded += total.to_bytes(16, "big")
        try:
            secrets.append(unpad(bytes(padded), 16))
        except ValueError:
            raise ValueError("Failed to combine shares") from None
    return secrets
