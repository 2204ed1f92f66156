"""deploy.certificates: never replace a CA or key unasked; keys 0600 from creation on.

Fast (no Flower run). The names of this module's API are looked up on the
module (``certificates.X``) so that a test of the older code fails on its
assertion, not on an import.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest

from deploy import certificates

TLS_NAMES = ("ca.crt", "ca.key", "server.pem", "server.key")


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` by name, with its bytes."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ the command line
def test_cli_run_twice_refuses_names_the_files_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert not certificates.main(["--out", str(out)])  # 0
    before = _snapshot(out)
    assert sorted(before) == sorted(TLS_NAMES)
    capsys.readouterr()

    assert certificates.main(["--out", str(out)]) == 1
    err = capsys.readouterr().err
    for name in TLS_NAMES:
        assert str(out / name) in err, err
    assert "refusing to overwrite existing file(s)" in err and "nothing was written" in err
    assert "Pass --force to replace them (a new CA must then be copied to every SuperNode" in err
    assert "registered again" not in err
    assert _snapshot(out) == before

    assert not certificates.main(["--out", str(out), "--force"])
    after = _snapshot(out)
    assert sorted(after) == sorted(TLS_NAMES)
    assert after["ca.crt"] != before["ca.crt"] and after["ca.key"] != before["ca.key"]
    assert _mode(out / "ca.key") == _mode(out / "server.key") == 0o600


def test_cli_checks_every_file_before_writing_any(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert not certificates.main(["--out", str(keys), "--supernode", "hospital-a"])
    before = _snapshot(keys)
    capsys.readouterr()
    # hospital-b is new, hospital-a exists: nothing at all is written.
    code = certificates.main(
        ["--out", str(keys), "--supernode", "hospital-b", "--supernode", "hospital-a"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"{keys / 'hospital-a'}, {keys / 'hospital-a.pub'}" in err, err
    assert "hospital-b" not in err
    assert ("(a new SuperNode key must then be registered again with "
            "`flwr supernode register`)") in err
    assert _snapshot(keys) == before


# ------------------------------------------------------------------ the functions
def test_create_functions_refuse_existing_files_unless_told_to_overwrite(tmp_path: Path) -> None:
    files = certificates.create_tls_files(tmp_path)
    pair = certificates.create_auth_key_pair(tmp_path, "hospital-a")
    before = _snapshot(tmp_path)

    with pytest.raises(certificates.ExistingFilesError) as refused:
        certificates.create_tls_files(tmp_path)
    assert refused.value.paths == [files.ca_cert, files.ca_key, files.server_cert,
                                   files.server_key]
    assert "ca.crt" in str(refused.value) and "every SuperNode" in str(refused.value)
    with pytest.raises(FileExistsError, match="flwr supernode register"):
        certificates.create_auth_key_pair(tmp_path, "hospital-a")
    assert _snapshot(tmp_path) == before

    # Only one of the four there is still a refusal, naming just that one.
    os.unlink(files.ca_cert)
    os.unlink(files.ca_key)
    os.unlink(files.server_key)
    with pytest.raises(certificates.ExistingFilesError) as refused:
        certificates.create_tls_files(tmp_path)
    assert refused.value.paths == [files.server_cert]
    assert not files.ca_key.exists()

    replaced = certificates.create_auth_key_pair(tmp_path, "hospital-a", overwrite=True)
    assert replaced.private_key.read_bytes() != before["hospital-a"]
    assert _mode(replaced.private_key) == 0o600
    assert pair == replaced


def test_a_leftover_tmp_file_never_gives_a_key_its_mode(tmp_path: Path) -> None:
    """A ``<name>.tmp`` of mode 0644 (older versions' fixed temp name) is not reused."""
    leftovers = [tmp_path / f"{name}.tmp" for name in ("ca.key", "server.key", "hospital-a")]
    for leftover in leftovers:
        leftover.write_bytes(b"stale")
        leftover.chmod(0o644)
    files = certificates.create_tls_files(tmp_path)
    pair = certificates.create_auth_key_pair(tmp_path, "hospital-a")
    for key in (files.ca_key, files.server_key, pair.private_key):
        assert _mode(key) == 0o600, key
    # The leftovers are gone, and no temporary file of this run is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*TLS_NAMES, "hospital-a", "hospital-a.pub"]
    )


def test_private_keys_are_created_exclusively_with_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file is opened O_CREAT | O_EXCL (never an existing one), keys with mode 0600."""
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    certificates.create_tls_files(tmp_path)
    certificates.create_auth_key_pair(tmp_path, "hospital-a")
    monkeypatch.undo()

    writes = [(Path(path).name, flags, mode) for path, flags, mode in opened
              if flags & (os.O_WRONLY | os.O_RDWR)]
    assert writes, opened
    for name, flags, mode in writes:
        assert flags & os.O_CREAT and flags & os.O_EXCL, name
        assert not flags & os.O_TRUNC, name
    key_writes = [w for w in writes if w[0].startswith((".ca.key.", ".server.key.", ".hospital-a."))
                  and not w[0].startswith(".hospital-a.pub.")]
    assert len(key_writes) == 3, writes
    assert all(mode == 0o600 for _, _, mode in key_writes), key_writes


def test_a_key_that_appears_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    """The final step is atomic and, without overwrite, never replaces a file."""
    key = tmp_path / "server.key"
    key.write_bytes(b"someone else's")
    with pytest.raises(certificates.ExistingFilesError):
        certificates._write_private(key, b"new")  # pylint: disable=protected-access
    assert key.read_bytes() == b"someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["server.key"]  # no temp file left
    certificates._write_private(key, b"new", overwrite=True)  # pylint: disable=protected-access
    assert key.read_bytes() == b"new" and _mode(key) == 0o600


# ------------------------------------------------------------------ reuse (deploy.local_deploy)
def test_valid_tls_files_are_reused_and_invalid_ones_replaced_with_the_reason(
    tmp_path: Path,
) -> None:
    files, action = certificates.ensure_tls_files(tmp_path)
    assert action == "created"
    before = _snapshot(tmp_path)
    assert certificates.ensure_tls_files(tmp_path)[1] == "reused"
    assert _snapshot(tmp_path) == before
    assert certificates.tls_files_problem(tmp_path) is None
    # Valid, but not for an address the caller needs.
    assert "not valid for" in str(certificates.tls_files_problem(tmp_path, ("10.0.0.5",)))

    files.server_key.chmod(0o644)
    files2, action = certificates.ensure_tls_files(tmp_path)
    assert action == f"replaced: {files.server_key} has mode 0644: other users may have read it"
    assert files2 == files and _mode(files.server_key) == 0o600
    assert _snapshot(tmp_path)["server.key"] != before["server.key"]

    other = certificates.create_tls_files(tmp_path / "other")
    files.server_key.write_bytes(other.server_key.read_bytes())
    assert certificates.tls_files_problem(tmp_path) == (
        f"{files.server_key} is not the key of {files.server_cert}"
    )
    files.server_cert.write_bytes(other.server_cert.read_bytes())
    assert certificates.tls_files_problem(tmp_path) == (
        f"{files.server_cert} is not signed by {files.ca_cert}"
    )
    files.server_cert.unlink()
    assert certificates.ensure_tls_files(tmp_path)[1] == f"replaced: missing {files.server_cert}"
    assert certificates.tls_files_problem(tmp_path) is None


def test_an_expiring_certificate_is_not_reused(tmp_path: Path) -> None:
    certificates.create_tls_files(tmp_path, valid_days=2)
    assert certificates.tls_files_problem(tmp_path) is None
    assert "ca.crt expires" in str(
        certificates.tls_files_problem(tmp_path, min_remaining=dt.timedelta(days=3))
    )
    certificates.create_tls_files(tmp_path, valid_days=0, overwrite=True)  # expires now
    problem = certificates.tls_files_problem(tmp_path)
    assert problem is not None and "ca.crt expires" in problem
    assert certificates.ensure_tls_files(tmp_path)[1] == f"replaced: {problem}"
    assert certificates.tls_files_problem(tmp_path) is None


def test_valid_key_pairs_are_reused_and_invalid_ones_replaced(tmp_path: Path) -> None:
    pair, action = certificates.ensure_auth_key_pair(tmp_path, "supernode-0")
    assert action == "created"
    before = _snapshot(tmp_path)
    assert certificates.ensure_auth_key_pair(tmp_path, "supernode-0") == (pair, "reused")
    assert _snapshot(tmp_path) == before

    other = certificates.create_auth_key_pair(tmp_path / "other", "supernode-0")
    pair.public_key.write_bytes(other.public_key.read_bytes())
    assert certificates.ensure_auth_key_pair(tmp_path, "supernode-0")[1] == (
        f"replaced: {pair.public_key} is not the public key of {pair.private_key}"
    )
    assert certificates.auth_key_pair_problem(tmp_path, "supernode-0") is None
    pair.private_key.chmod(0o640)
    assert certificates.ensure_auth_key_pair(tmp_path, "supernode-0")[1].endswith(
        "has mode 0640: other users may have read it"
    )
    assert _mode(pair.private_key) == 0o600
