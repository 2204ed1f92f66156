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

Existing files are never replaced unless asked (``--force``, ``overwrite=True``):
a new CA invalidates every certificate the old one signed, and a new SuperNode
key must be registered again. Every file is written to a fresh temporary file
created with ``O_CREAT | O_EXCL`` (private keys with mode 0600 from the first
byte) and then moved into place in one step. Run as a script to create the
files for a deployment on separate machines::

    python -m deploy.certificates --out certs --san 10.0.0.5 --san superlink.example.org
    python -m deploy.certificates --out keys --supernode hospital-a --supernode hospital-b
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1")
"""Names the SuperLink certificate is valid for unless told otherwise (loopback)."""

MIN_REMAINING_VALIDITY = dt.timedelta(days=1)
"""An existing certificate that expires sooner than this is not reused."""


class ExistingFilesError(FileExistsError):
    """Files that would be overwritten; nothing was written. ``paths`` names them."""

    def __init__(self, paths: Sequence[Path], consequence: str = "") -> None:
        self.paths = [Path(p) for p in paths]
        names = ", ".join(str(p) for p in self.paths)
        why = f" ({consequence})" if consequence else ""
        super().__init__(f"refusing to overwrite existing file(s) {names}{why}")


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


CA_CONSEQUENCE = (
    "a new CA invalidates the SuperLink certificate it signed, and every SuperNode and CLI "
    "machine would need the new ca.crt"
)
KEY_CONSEQUENCE = "a new key must be registered again with `flwr supernode register`"


def tls_paths(out_dir: Path) -> TlsFiles:
    """Where :func:`create_tls_files` writes its four files in ``out_dir``."""
    out_dir = Path(out_dir)
    return TlsFiles(
        ca_cert=out_dir / "ca.crt",
        ca_key=out_dir / "ca.key",
        server_cert=out_dir / "server.pem",
        server_key=out_dir / "server.key",
    )


def auth_key_paths(out_dir: Path, name: str) -> AuthKeyPair:
    """Where :func:`create_auth_key_pair` writes key pair ``name`` in ``out_dir``."""
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise ValueError(f"invalid key name {name!r}: use a plain file name")
    out_dir = Path(out_dir)
    return AuthKeyPair(name=name, private_key=out_dir / name, public_key=out_dir / f"{name}.pub")


def _refuse_existing(paths: Iterable[Path], consequence: str) -> None:
    existing = [path for path in paths if os.path.lexists(path)]
    if existing:
        raise ExistingFilesError(existing, consequence)


# ------------------------------------------------------------------------------ writing
def _write_atomically(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write ``data`` to ``path`` with permissions ``mode`` (less the umask), atomically.

    The bytes go to a temporary file that did not exist before (``O_CREAT |
    O_EXCL``, a random name, never a leftover reused with its old mode) and is
    created with ``mode``; it is then moved into place: with ``os.replace``
    when ``overwrite``, else with a hard link, which fails rather than replace
    a file that appeared meanwhile. Earlier versions used the fixed name
    ``<name>.tmp``; a leftover of that name (perhaps a key readable by others)
    is removed.

    Raises
    ------
    ExistingFilesError
        Without ``overwrite``, when ``path`` exists.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, mode)
            break
        except FileExistsError:  # pragma: no cover - 64 random bits collided
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # atomic "create if absent"
        except FileExistsError:
            raise ExistingFilesError([path]) from None
        except OSError:  # a file system without hard links
            if os.path.lexists(path):
                raise ExistingFilesError([path]) from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_private(path: Path, data: bytes, overwrite: bool = False) -> None:
    """A file readable by its owner only (0600 from creation on)."""
    _write_atomically(path, data, 0o600, overwrite)


def _write_public(path: Path, data: bytes, overwrite: bool = False) -> None:
    _write_atomically(path, data, 0o644, overwrite)


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


# ------------------------------------------------------------------------------ creating
def create_tls_files(
    out_dir: Path, sans: Sequence[str] = DEFAULT_SANS, valid_days: int = 365,
    overwrite: bool = False,
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
    overwrite : bool
        Replace files that exist. Without it nothing is written if any of the
        four exists.

    Raises
    ------
    ExistingFilesError
        Without ``overwrite``, naming the files that exist.
    """
    files = tls_paths(out_dir)
    if not overwrite:
        _refuse_existing(astuple(files), CA_CONSEQUENCE)
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

    _write_private(files.ca_key, _pem_key(ca_key), overwrite)
    _write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), overwrite)
    _write_private(files.server_key, _pem_key(server_key), overwrite)
    _write_public(
        files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), overwrite
    )
    return files


def create_auth_key_pair(out_dir: Path, name: str, overwrite: bool = False) -> AuthKeyPair:
    """Create one SuperNode's ECDSA P-384 key pair in OpenSSH format.

    The private key (``out_dir/name``) stays on the SuperNode's machine; the
    public key (``out_dir/name.pub``) is registered with ``flwr supernode
    register`` by the federation's operator.

    Raises
    ------
    ExistingFilesError
        Without ``overwrite``, when either file exists (nothing is written).
    """
    pair = auth_key_paths(out_dir, name)
    if not overwrite:
        _refuse_existing((pair.private_key, pair.public_key), KEY_CONSEQUENCE)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        pair.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        overwrite,
    )
    _write_public(
        pair.public_key,
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {name}\n".encode(),
        overwrite,
    )
    return pair


# ------------------------------------------------------------------------------ checking
def _open_to_others(path: Path) -> str | None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return f"{path} has mode {mode:04o}: other users may have read it"
    return None


def tls_files_problem(
    out_dir: Path, sans: Sequence[str] = DEFAULT_SANS,
    min_remaining: dt.timedelta = MIN_REMAINING_VALIDITY,
) -> str | None:
    """Why the TLS files in ``out_dir`` cannot be reused, or None when they can.

    Reusable means: all four files are there, both keys have mode 0600 (no
    group or other bits), each key belongs to its certificate, the CA is a CA
    and signed the SuperLink certificate, the SuperLink certificate lists every
    name in ``sans``, and both are valid now and for ``min_remaining`` more.
    """
    # pylint: disable=too-many-return-statements
    files = tls_paths(out_dir)
    missing = [str(path) for path in astuple(files) if not path.is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    for key_path in (files.ca_key, files.server_key):
        if problem := _open_to_others(key_path):
            return problem
    try:
        ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), None)
        server_key = serialization.load_pem_private_key(files.server_key.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        return f"cannot read the files in {out_dir}: {error}"
    if ca_key.public_key() != ca.public_key():
        return f"{files.ca_key} is not the key of {files.ca_cert}"
    if server_key.public_key() != server.public_key():
        return f"{files.server_key} is not the key of {files.server_cert}"
    try:
        if not ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return f"{files.ca_cert} is not a CA certificate"
        server.verify_directly_issued_by(ca)
    except (x509.ExtensionNotFound, ValueError, TypeError, InvalidSignature):
        return f"{files.server_cert} is not signed by {files.ca_cert}"
    now = dt.datetime.now(dt.UTC)
    for path, cert in ((files.ca_cert, ca), (files.server_cert, server)):
        if cert.not_valid_before_utc > now:
            return f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}Z"
        if cert.not_valid_after_utc < now + min_remaining:
            return f"{path} expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z"
    try:
        listed = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return f"{files.server_cert} lists no host names"
    wanted = set(_subject_alt_names(sans))
    if not wanted <= set(listed):
        return f"{files.server_cert} is not valid for all of {', '.join(sans)}"
    return None


def auth_key_pair_problem(out_dir: Path, name: str) -> str | None:
    """Why key pair ``name`` in ``out_dir`` cannot be reused, or None when it can.

    Reusable means: both files are there, the private key has mode 0600 (no
    group or other bits) and is an ECDSA P-384 OpenSSH key, and the public
    key is its own.
    """
    pair = auth_key_paths(out_dir, name)
    missing = [str(path) for path in (pair.private_key, pair.public_key) if not path.is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    if problem := _open_to_others(pair.private_key):
        return problem
    try:
        private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), None)
        public = serialization.load_ssh_public_key(pair.public_key.read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        return f"cannot read key pair {name} in {out_dir}: {error}"
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != "secp384r1":
        return f"{pair.private_key} is not an ECDSA P-384 key"
    if private.public_key() != public:
        return f"{pair.public_key} is not the public key of {pair.private_key}"
    return None


def ensure_tls_files(
    out_dir: Path, sans: Sequence[str] = DEFAULT_SANS, valid_days: int = 365
) -> tuple[TlsFiles, str]:
    """Reuse the TLS files in ``out_dir`` when :func:`tls_files_problem` finds none.

    Otherwise create them: into an empty folder as :func:`create_tls_files`
    does, over files that are there but unusable (incomplete, mismatched,
    expired, readable by others) with ``overwrite``. For a folder this program
    owns, such as ``deploy.local_deploy``'s work folder. Returns the files and
    what was done: ``"reused"``, ``"created"`` or ``"replaced: <why>"``.
    """
    files = tls_paths(out_dir)
    if not any(os.path.lexists(path) for path in astuple(files)):
        return create_tls_files(out_dir, sans, valid_days), "created"
    problem = tls_files_problem(out_dir, sans)
    if problem is None:
        return files, "reused"
    return create_tls_files(out_dir, sans, valid_days, overwrite=True), f"replaced: {problem}"


def ensure_auth_key_pair(out_dir: Path, name: str) -> tuple[AuthKeyPair, str]:
    """Reuse key pair ``name`` when :func:`auth_key_pair_problem` finds none, else create it.

    As :func:`ensure_tls_files`: returns the pair and ``"reused"``,
    ``"created"`` or ``"replaced: <why>"``.
    """
    pair = auth_key_paths(out_dir, name)
    if not any(os.path.lexists(path) for path in (pair.private_key, pair.public_key)):
        return create_auth_key_pair(out_dir, name), "created"
    problem = auth_key_pair_problem(out_dir, name)
    if problem is None:
        return pair, "reused"
    return create_auth_key_pair(out_dir, name, overwrite=True), f"replaced: {problem}"


# ------------------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: create TLS files and/or SuperNode key pairs; return an exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.certificates", description=__doc__.split("\n\n", 1)[0]
    )
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
    parser.add_argument(
        "--force", action="store_true",
        help="replace files that exist (a new CA must then be copied to every SuperNode and "
        "CLI machine, and a new SuperNode key registered again); without it nothing is "
        "written if any file exists",
    )
    args = parser.parse_args(argv)
    if args.san is None and not args.supernode:
        args.san = list(DEFAULT_SANS)
    try:
        pairs = [auth_key_paths(args.out, name) for name in args.supernode]
    except ValueError as error:
        parser.error(str(error))
    if not args.force:  # check everything before writing anything
        tls = list(astuple(tls_paths(args.out))) if args.san is not None else []
        keys = [path for pair in pairs for path in (pair.private_key, pair.public_key)]
        existing = [path for path in tls + keys if os.path.lexists(path)]
        if existing:
            consequences = []
            if set(existing) & set(tls):
                consequences.append(
                    "a new CA must then be copied to every SuperNode and CLI machine"
                )
            if set(existing) & set(keys):
                consequences.append(
                    "a new SuperNode key must then be registered again with "
                    "`flwr supernode register`"
                )
            print(
                f"{parser.prog}: error: {ExistingFilesError(existing)}; nothing was written. "
                f"Pass --force to replace them ({'; '.join(consequences)}).",
                file=sys.stderr,
            )
            return 1
    try:
        if args.san is not None:
            tls = create_tls_files(args.out, args.san, args.valid_days, overwrite=args.force)
            print(f"CA certificate     {tls.ca_cert}  (copy to every SuperNode and CLI machine)")
            print(f"CA key             {tls.ca_key}  (keep offline)")
            print(f"SuperLink cert/key {tls.server_cert}, {tls.server_key}  "
                  "(SuperLink machine only)")
        for name in args.supernode:
            pair = create_auth_key_pair(args.out, name, overwrite=args.force)
            print(f"SuperNode {name}: private {pair.private_key} (its machine only), "
                  f"public {pair.public_key} (register it)")
    except ExistingFilesError as error:  # appeared while this ran
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
