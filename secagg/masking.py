"""Quantisation to the integers modulo ``2^b`` and the masks that hide each client's vector.

A client's vector is quantised (unbiased stochastic rounding), mapped into the
ring ``Z_M`` (``M = 2^modulus_bits``, two's complement), and masked by adding
pseudo-random ring elements; the server's sum of all masked vectors minus the
masks it can rebuild is the sum of the quantised vectors, decoded back to
signed integers while ``|sum| < M / 2`` (:meth:`SecAggParameters.max_clients`).

The mask generator is ours, not Flower's ``pseudo_rand_gen``: that one seeds
numpy's Mersenne Twister with the XOR of the seed's 32-bit words, so every
mask has at most 2^32 possible values and anyone can enumerate them
(``tests/test_secagg_masking.py`` shows two different 32-byte seeds giving the
same mask). Here the 32-byte seed keys AES-256 in counter mode and the
keystream is the mask: one block cipher call per 16 bytes, 2^256 seeds.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: Every mask's key length (bytes).
SEED_BYTES = 32
_NONCE = bytes(16)  # each seed keys exactly one mask (fresh keys every round)


def ring_dtype(modulus_bits: int) -> type[np.unsignedinteger]:
    """The smallest unsigned dtype that holds ring elements (what goes on the wire)."""
    return np.uint32 if modulus_bits <= 32 else np.uint64


def prg_mask(seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """``length`` uniform elements of ``Z_(2^modulus_bits)`` from AES-256-CTR keyed by ``seed``.

    Returned as uint64 (the arithmetic dtype).
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    width = 4 if modulus_bits <= 32 else 8
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_NONCE)).encryptor()
    stream = encryptor.update(bytes(width * length)) + encryptor.finalize()
    words = np.frombuffer(stream, dtype=f"<u{width}").astype(np.uint64)
    if modulus_bits not in (32, 64):
        words &= np.uint64((1 << modulus_bits) - 1)
    return words


def reduce(values: np.ndarray, modulus_bits: int) -> np.ndarray:
    """``values mod 2^modulus_bits`` as uint64 (uint64 addition already wraps mod 2^64)."""
    out = values.astype(np.uint64, copy=False)
    if modulus_bits < 64:
        out = out & np.uint64((1 << modulus_bits) - 1)
    return out


def to_ring(signed: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Signed integers into ``Z_M`` (two's complement), as uint64."""
    return reduce(signed.astype(np.int64).view(np.uint64), modulus_bits)


def from_ring(elements: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Ring elements back to the signed integers in ``[-M/2, M/2)`` (int64)."""
    elements = reduce(elements, modulus_bits)
    half = np.uint64(1 << (modulus_bits - 1))
    signed = elements.astype(np.int64)
    return np.where(elements >= half, signed - np.int64(1 << modulus_bits), signed) if (
        modulus_bits < 64
    ) else elements.view(np.int64)


def stochastic_round(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unbiased randomised rounding to int64: ``floor(x) + Bernoulli(x - floor(x))``."""
    floor = np.floor(values)
    return (floor + (rng.random(values.shape) < (values - floor))).astype(np.int64)


def quantize(
    values: np.ndarray, clipping_range: float, quantization_bits: int, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Clamp to ``[-range, range]``, scale to ``+-2^(b-1)``, round stochastically.

    Returns the int64 vector and how many coordinates the clamp changed.
    """
    values = np.asarray(values, dtype=np.float64)
    clamped = np.clip(values, -clipping_range, clipping_range)
    num_clamped = int(np.count_nonzero(clamped != values))
    scale = (1 << (quantization_bits - 1)) / clipping_range
    return stochastic_round(clamped * scale, rng), num_clamped


def dequantize(
    signed: np.ndarray, clipping_range: float, quantization_bits: int
) -> np.ndarray:
    """Integers (a sum of quantised vectors) back to float64."""
    return signed.astype(np.float64) * (clipping_range / (1 << (quantization_bits - 1)))


def quantization_step(clipping_range: float, quantization_bits: int) -> float:
    """One integer step in model units: stochastic rounding moves a value by less than it."""
    return clipping_range / (1 << (quantization_bits - 1))


def mask_sign(own: int, other: int) -> int:
    """+1 for the smaller node id of a pair, -1 for the larger: the pair's masks cancel."""
    return 1 if own < other else -1


def apply_masks(
    vector: np.ndarray,
    self_seed: bytes,
    pair_seeds: dict[int, bytes],
    own_id: int,
    modulus_bits: int,
) -> np.ndarray:
    """``vector + PRG(b_u) + sum_v +-PRG(s_uv)`` in ``Z_M`` (uint64)."""
    masked = vector.astype(np.uint64) + prg_mask(self_seed, vector.size, modulus_bits)
    for other, seed in pair_seeds.items():
        mask = prg_mask(seed, vector.size, modulus_bits)
        if mask_sign(own_id, other) > 0:
            masked += mask
        else:
            masked -= mask
    return reduce(masked, modulus_bits)
