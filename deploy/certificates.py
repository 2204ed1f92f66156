"""Certificates and keys for a Flower deployment, made with the `cryptography` package.

Three kinds of files:

* a private certificate authority (``ca.crt``, ``ca.key``): signs the
  SuperLink's certificate; SuperNodes and the ``flwr`` CLI trust it
  (``--root-certificates`` / ``root-certificates``);
* the SuperLink's TLS certificate and key (``server.pem``, ``server.key``),
  valid for the host names and IP addresses the SuperLink is reached at
  (by default ``localhost`` and ``127.0.0.1``);
* one authentication key pair per SuperNode (``<name>`` and ``<name>.pub``):
  ECDSA on NIST P-384 in OpenSSH format, which is what Flower 1.42 expects
  (``flower-supernode --auth-supernode-private-key`` reads the private key with
  ``load_ssh_private_key``; ``flwr supernode register`` reads the public key
  with ``load_ssh_public_key`` and accepts only NIST curves).

Private keys are written with mode 0600. Run as a script to create the files
for a deployment on separate machines::

    python -m deploy.certificates --out certs --san 10.0.0.5 --san superlink.example.org
    python -m deploy.certificates --out keys --supernode hospital-a --supernode hospital-b
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1")
"""Names the SuperLink certificate is valid for unless told otherwise (loopback)."""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the CA certificate and the SuperLink's certificate and key."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class AuthKeyPair:
    """Paths of one SuperNode's authentication key pair (OpenSSH format)."""

    name: str
    private_key: Path
    public_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _subject_alt_names(names: Iterable[str]) -> x509.SubjectAlternativeName:
    """IP addresses become IP SANs, everything else a DNS SAN."""
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    if not entries:
        raise ValueError("the SuperLink certificate needs at least one host name or IP address")
    return x509.SubjectAlternativeName(entries)


def create_tls_files(
    out_dir: Path, sans: Sequence[str] = DEFAULT_SANS, valid_days: int = 365
) -> TlsFiles:
    """Create a private CA and a SuperLink certificate signed by it, in ``out_dir``.

    Parameters
    ----------
    out_dir : Path
        Folder for ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key``.
    sans : Sequence[str]
        Host names and IP addresses clients use to reach the SuperLink; a
        client refuses the connection when the address it dials is not listed.
    valid_days : int
        Validity of both certificates.
    """
    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(minutes=5)  # tolerate small clock skew
    not_after = now + dt.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedprivacy deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_subject_alt_names(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )

    files = TlsFiles(
        ca_cert=out_dir / "ca.crt",
        ca_key=out_dir / "ca.key",
        server_cert=out_dir / "server.pem",
        server_key=out_dir / "server.key",
    )
    _write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.ca_key, _pem_key(ca_key))
    _write_public(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem_key(server_key))
    return files


def create_auth_key_pair(out_dir: Path, name: str) -> AuthKeyPair:
    """Create one SuperNode's ECDSA P-384 key pair in OpenSSH format.

    The private key (``out_dir/name``) stays on the SuperNode's machine; the
    public key (``out_dir/name.pub``) is registered with ``flwr supernode
    register`` by the federation's operator.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid key name {name!r}: use a plain file name")
    key = ec.generate_private_key(ec.SECP384R1())
    pair = AuthKeyPair(name=name, private_key=out_dir / name, public_key=out_dir / f"{name}.pub")
    _write_private(
        pair.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    _write_public(
        pair.public_key,
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {name}\n".encode(),
    )
    return pair


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: create TLS files and/or SuperNode key pairs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--san", action="append", default=None,
        help="host name or IP address of the SuperLink (repeat; default: localhost, 127.0.0.1). "
        "Giving --san creates the CA and SuperLink certificate.",
    )
    parser.add_argument(
        "--supernode", action="append", default=[],
        help="create an authentication key pair with this name (repeat)",
    )
    parser.add_argument("--valid-days", type=int, default=365)
    args = parser.parse_args(argv)
    if args.san is None and not args.supernode:
        args.san = list(DEFAULT_SANS)
    if args.san is not None:
        tls = create_tls_files(args.out, args.san, args.valid_days)
        print(f"CA certificate     {tls.ca_cert}  (copy to every SuperNode and CLI machine)")
        print(f"CA key             {tls.ca_key}  (keep offline)")
        print(f"SuperLink cert/key {tls.server_cert}, {tls.server_key}  (SuperLink machine only)")
    for name in args.supernode:
        pair = create_auth_key_pair(args.out, name)
        print(f"SuperNode {name}: private {pair.private_key} (its machine only), "
              f"public {pair.public_key} (register it)")


if __name__ == "__main__":
    main()
