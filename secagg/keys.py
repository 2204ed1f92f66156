"""Key agreement, secret sharing and share encryption of SecAgg+, from Flower's building blocks.

Each client makes two elliptic-curve key pairs per round (``flwr.supercore``'s
SECP384R1 pairs): one agrees an encryption key with each neighbour (its
Shamir shares travel through the server encrypted under it), the other agrees
the seed of the pair's mask. The self-mask seed and the mask private key are
split with Flower's Shamir sharing (``flwr.common.secure_aggregation``).
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    generate_key_pairs,
    public_key_to_bytes,
)

from .masking import SEED_BYTES
from .shamir import combine_shares_batch

_CURVE = ec.SECP384R1()
_SCALAR_BYTES = 48

__all__ = [
    "combine_shares",
    "combine_shares_batch",
    "commitment",
    "create_shares",
    "decrypt_share",
    "encrypt_share",
    "generate_key_pairs",
    "load_public_key",
    "mask_seed",
    "new_self_seed",
    "private_key_from_bytes",
    "private_key_to_bytes",
    "public_key_to_bytes",
]


def new_self_seed() -> bytes:
    """A fresh self-mask seed ``b_u`` from the OS (never a user seed)."""
    return os.urandom(SEED_BYTES)


def commitment(seed: bytes) -> bytes:
    """SHA-256 of a self-mask seed: lets the server check a rebuilt seed (a bad share shows)."""
    return hashlib.sha256(seed).digest()


def private_key_to_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private scalar, 48 bytes (what is Shamir-shared: short, so sharing is cheap)."""
    return key.private_numbers().private_value.to_bytes(_SCALAR_BYTES, "big")


def private_key_from_bytes(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Inverse of :func:`private_key_to_bytes`."""
    if len(data) != _SCALAR_BYTES:
        raise ValueError(f"a private key is {_SCALAR_BYTES} bytes, got {len(data)}")
    return ec.derive_private_key(int.from_bytes(data, "big"), _CURVE)


def load_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """A peer's public key; ValueError if the bytes are not a SECP384R1 key."""
    try:
        key = bytes_to_public_key(data)
    except Exception as error:  # cryptography raises several types for junk
        raise ValueError(f"not a public key: {error}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != _CURVE.name:
        raise ValueError("not a SECP384R1 public key")
    return key


def mask_seed(own: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """The pair's 32-byte mask seed: ECDH, then HKDF-SHA256 (Flower's key derivation)."""
    return base64.urlsafe_b64decode(generate_shared_key(own, peer))


def encrypt_share(
    own: ec.EllipticCurvePrivateKey,
    peer: ec.EllipticCurvePublicKey,
    src: int,
    dst: int,
    seed_share: bytes,
    key_share: bytes,
) -> bytes:
    """The shares ``src`` gives ``dst``, authenticated-encrypted (Fernet) under their agreed key."""
    plaintext = share_keys_plaintext_concat(src, dst, seed_share, key_share)
    return encrypt(generate_shared_key(own, peer), plaintext)


def decrypt_share(
    own: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey, ciphertext: bytes
) -> tuple[int, int, bytes, bytes]:
    """``(src, dst, seed_share, key_share)``; ValueError if it does not decrypt."""
    try:
        plaintext = decrypt(generate_shared_key(own, peer), ciphertext)
    except Exception:  # cryptography.fernet.InvalidToken and malformed tokens
        raise ValueError("share does not decrypt under the agreed key") from None
    return share_keys_plaintext_separate(plaintext)
