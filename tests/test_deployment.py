"""End to end on a real deployment: a TLS + SuperNode-auth SuperLink and two SuperNodes.

Everything runs on 127.0.0.1 with free ports, its own FLWR_HOMEs and its own
certificates and keys under pytest's tmp folder; every process started is
stopped by process group, and the module fixture fails if one is left.

Measured facts these tests rely on (Flower 1.42):

* A SuperNode killed with SIGKILL sends no goodbye; the SuperLink keeps it
  online until 2 x 30 s after its last heartbeat (heartbeats every ~24 s), then
  answers the ServerApp's pending message to it with a "Node Unavailable"
  error reply. So a round with a crashed node ends 36-60 s after the crash,
  or at ``round-timeout`` if that is shorter. (SIGTERM deactivates the node at
  once and its error reply comes within seconds.)
* Until then the SuperLink refuses a second activation of the same key, so a
  restart is retried until it is accepted; it then rejoins with the same node ID.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from deploy import local_deploy
from deploy.certificates import create_auth_key_pair, create_tls_files
from deploy.local_deploy import (
    ACTIVATION_REFUSED,
    REPO,
    DeploymentError,
    LocalDeployment,
    ManagedProcess,
    descendants,
    parse_args,
    process_table,
)
from tests.deploy_harness import (
    UNKNOWN_KEY_REFUSED,
    count,
    finish,
    loopback_deployment,
    only_run_metrics,
    wait_for_log,
)
from tests.flwr_harness import SpawnedProcesses, _stop

# One process per message: keep the work per round small (1 epoch, no federated
# evaluation) so that 2 rounds fit the CI time budget.
FAST = "local-epochs=1 batch-size=32 fraction-evaluate=0.0 min-evaluate-nodes=0"
ROUND_TIMEOUT = 120.0  # above the 60 s heartbeat expiry, so Flower's error reply ends the round


# ----------------------------------------------------------------- fast checks (no Flower run)
def test_auth_keys_are_what_flower_reads(tmp_path: Path) -> None:
    pair = create_auth_key_pair(tmp_path, "hospital-a")
    private = load_ssh_private_key(pair.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    # `flwr supernode register` accepts the public key, and it is the private key's.
    assert try_load_public_key(pair.public_key) == public_key_to_bytes(private.public_key())
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600


def test_server_certificate_is_signed_by_the_ca_for_loopback(tmp_path: Path) -> None:
    files = create_tls_files(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(files.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600


def test_node_config_and_cli_connection_parse_as_flower_parses_them(tmp_path: Path) -> None:
    deployment = LocalDeployment(
        tmp_path / "work", num_supernodes=3, port=45678, data_paths={2: "/data/hospital b"}
    )
    deployment.prepare()
    configs = [parse_config_args([slot.node_config]) for slot in deployment.supernodes]
    assert [(c["partition-id"], c["num-partitions"]) for c in configs] == [(0, 3), (1, 3), (2, 3)]
    assert configs[0]["state-dir"] == str(deployment.supernodes[0].state_dir)
    assert Path(configs[0]["state-dir"]).is_dir()
    assert configs[2]["data-path"] == "/data/hospital b" and "data-path" not in configs[0]
    connection = tomllib.loads((deployment.cli_home / "config.toml").read_text())
    entry = connection["superlink"]["local-deployment"]
    assert connection["superlink"]["default"] == "local-deployment"
    assert entry == {"address": "127.0.0.1:45678",
                     "root-certificates": str(deployment.certs_dir / "ca.crt")}
    assert (deployment.keys_dir / "supernode-2.pub").exists()


def test_data_path_options_become_absolute_node_config_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("cleveland", "hungarian", "switzerland", "va"):
        (tmp_path / f"processed.{name}.data").write_text("")
    monkeypatch.chdir(tmp_path)
    # One PATH per SuperNode, in order: as many SuperNodes as files.
    args = parse_args([arg for name in ("cleveland", "hungarian", "switzerland", "va")
                       for arg in ("--data-path", f"processed.{name}.data")])
    assert args.num_supernodes == 4
    assert args.data_paths == {
        k: str(tmp_path / f"processed.{name}.data")
        for k, name in enumerate(("cleveland", "hungarian", "switzerland", "va"))
    }
    # INDEX=PATH, with a table's query kept (it contains '=' and '&').
    args = parse_args(["--data-path", "2=processed.va.data?label=num&classes=2"])
    assert args.num_supernodes == 3
    assert args.data_paths == {2: f"{tmp_path / 'processed.va.data'}?label=num&classes=2"}
    assert parse_args([]).num_supernodes == 2 and parse_args([]).data_paths == {}
    for bad in (["--data-path", "missing.csv"],
                ["--data-path", "0=processed.va.data", "--data-path", "processed.va.data"],
                ["--data-path", "0=processed.va.data", "--data-path", "0=processed.va.data"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    args = parse_args(["--num-supernodes", "1", "--data-path", "1=processed.va.data"])
    with pytest.raises(DeploymentError, match="only 0..0 exist"):
        LocalDeployment(tmp_path / "work", num_supernodes=args.num_supernodes,
                        data_paths=args.data_paths)


def test_a_node_config_data_path_reaches_the_client_app_as_its_own_file(tmp_path: Path) -> None:
    """The node config the script writes, parsed as Flower parses it, names the node's file."""
    from data.node_files import NodeData, load_node_data, node_data

    table = write_digits_csv(tmp_path / "clinic.csv", np.arange(100))
    deployment = LocalDeployment(
        tmp_path / "work", num_supernodes=2, port=45677,
        data_paths={1: f"{table}?label=label&classes=10"},
    )
    deployment.prepare()
    configs = [parse_config_args([slot.node_config]) for slot in deployment.supernodes]
    assert node_data(configs[0]) == NodeData(0, 2)
    assert node_data(configs[1]) == NodeData(1, None, f"{table}?label=label&classes=10")
    train, val = load_node_data("csv", configs[1]["data-path"], 0.1, 42, 1)
    assert len(train) + len(val) == 100 and train.num_classes == 10
    assert train.input_shape == (64,)


def test_insecure_mode_has_no_certificates_and_says_so(tmp_path: Path) -> None:
    deployment = LocalDeployment(tmp_path / "work", num_supernodes=1, insecure=True, port=45679)
    deployment.prepare()
    assert not deployment.certs_dir.exists() and not deployment.keys_dir.exists()
    entry = tomllib.loads((deployment.cli_home / "config.toml").read_text())["superlink"]
    assert entry["local-deployment"]["insecure"] is True
    assert "--insecure" in deployment.superlink_command()
    assert "--enable-supernode-auth" not in deployment.superlink_command()


def test_workdir_inside_the_app_folder_is_refused() -> None:
    with pytest.raises(DeploymentError, match="private keys"):
        LocalDeployment(REPO / "deploy" / "work")


def test_stop_ends_descendants_that_started_their_own_session(tmp_path: Path) -> None:
    # flower-superlink starts flower-superexec with setsid: a group of its own.
    process = ManagedProcess(
        "tree", ["bash", "-c", "setsid sleep 120 & sleep 120"], dict(os.environ),
        tmp_path / "tree.log",
    ).start()
    deadline = time.monotonic() + 10
    while len(process.refresh_groups()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    if sys.platform == "linux":
        assert len(process.groups) == 2, process.alive_members()
        assert len(process.alive_members()) == 3
    process.stop(timeout=5)
    assert process.alive_members() == []


@pytest.mark.skipif(sys.platform != "linux", reason="walks /proc")
def test_harness_stop_ends_orphans_of_a_child_session_and_nothing_else(tmp_path: Path) -> None:
    """Like flower-superexec (setsid) dying and leaving its flwr-simulation orphaned."""
    bystander = subprocess.Popen(  # an unrelated process in a session of its own
        ["sleep", "120"], start_new_session=True
    )
    root = subprocess.Popen(
        ["bash", "-c", "setsid bash -c 'sleep 120 & wait' & wait"], start_new_session=True
    )
    spawned = SpawnedProcesses(root.pid, interval=0.1)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            inner = [i for i in spawned.refresh() if i.sid not in (root.pid, -1)]
            if any(i.name == "sleep" for i in inner) and any(i.name == "bash" for i in inner):
                break
            time.sleep(0.1)
        session_leader = next(i for i in inner if i.name == "bash" and i.pid == i.sid)
        orphan = next(i for i in inner if i.name == "sleep")
        os.kill(session_leader.pid, signal.SIGKILL)  # the sleep is re-parented away
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            table = process_table()
            if orphan.pid in table and table[orphan.pid].ppid != session_leader.pid:
                break
            time.sleep(0.1)
        assert orphan.pid not in {i.pid for i in descendants(root.pid, process_table())}
        assert _stop(root, spawned) == []
        assert orphan.pid not in process_table() or process_table()[orphan.pid].state == "Z"
        assert bystander.poll() is None
    finally:
        for process in (root, bystander):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# ------------------------------------------- reused work folder, run outcome, run config (fast)
def test_a_reused_workdir_keeps_valid_keys_and_replaces_only_invalid_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second deployment in the same work folder reuses the CA and keys that are still valid."""
    work = tmp_path / "work"
    LocalDeployment(work, num_supernodes=2, port=45681).prepare()
    files = sorted([*(work / "certs").iterdir(), *(work / "keys").iterdir()])
    before = {path: path.read_bytes() for path in files}
    assert len(before) == 8

    (work / "keys" / "supernode-1").chmod(0o644)  # e.g. left so by an older version
    with caplog.at_level(logging.INFO, logger="deploy"):
        LocalDeployment(work, num_supernodes=2, port=45681).prepare()
    after = {path: path.read_bytes() for path in files}
    replaced = sorted(path.name for path in files if after[path] != before[path])
    assert replaced == ["supernode-1", "supernode-1.pub"]
    assert stat.S_IMODE((work / "keys" / "supernode-1").stat().st_mode) == 0o600
    assert f"CA and SuperLink certificate in {work / 'certs'} reused" in caplog.text
    assert (f"key pair {work / 'keys' / 'supernode-1'} replaced: "
            f"{work / 'keys' / 'supernode-1'} has mode 0644") in caplog.text


def _flwr_ls_json(status: str, details: str = "", run_id: int = 42) -> str:
    """What ``flwr ls --run-id RUN --format json`` prints, made by Flower's own code."""
    from flwr.cli.ls import _to_json  # pylint: disable=import-outside-toplevel
    from flwr.cli.run_utils import RunRow  # pylint: disable=import-outside-toplevel

    stamp = "2026-01-01 00:00:00Z"
    finished = stamp if status.startswith("finished") else "N/A"
    row = RunRow(
        run_id=run_id, federation_id="@none/default", fab_id="fedprivacy/fedprivacy",
        fab_version="0.1.0", fab_hash="ab" * 32, status_text=status, details=details or "N/A",
        elapsed=3.0, pending_at=stamp, starting_at=stamp, running_at=stamp,
        finished_at=finished, network_traffic_inbound=0, network_traffic_outbound=0,
        compute_time_serverapp=3.0, compute_time_clientapp=0.0,
    )
    # Flower prints it with rich's print_json: indented.
    return json.dumps(json.loads(_to_json([row])), indent=2) + "\n"


# Measured (Flower 1.42): `flwr ls --run-id <unknown> --format json` exits 0 and prints this.
FLWR_LS_ERROR = json.dumps({
    "success": False,
    "error-message": "Using SuperLink: local-deployment (127.0.0.1:53571)\n Displaying "
    "information for run ID 77...\n\n[code: 16] Run ID not found.",
}, indent=2)
FAILED_DETAILS = ("ServerApp failed with exception: only 1 node(s) connected after waiting 2 s; "
                  "this round needs 3 (see min-train-nodes, min-evaluate-nodes and "
                  "node-wait-timeout)")


def test_flwr_ls_json_gives_the_runs_status() -> None:
    status = local_deploy.parse_run_status(_flwr_ls_json("finished:failed", FAILED_DETAILS), 42)
    assert status == local_deploy.RunStatus(42, "finished:failed", FAILED_DETAILS)
    assert status.finished and not status.completed
    done = local_deploy.parse_run_status(_flwr_ls_json("finished:completed"), 42)
    assert done.completed and done.details == ""  # Flower's "N/A"
    assert not local_deploy.parse_run_status(_flwr_ls_json("running"), 42).finished
    with pytest.raises(DeploymentError) as failed:
        local_deploy.parse_run_status(FLWR_LS_ERROR, 77)
    assert str(failed.value) == "`flwr ls` failed: [code: 16] Run ID not found."
    with pytest.raises(DeploymentError, match="does not list run 43"):
        local_deploy.parse_run_status(_flwr_ls_json("finished:completed"), 43)
    with pytest.raises(DeploymentError, match="printed no JSON"):
        local_deploy.parse_run_status("Traceback ...", 42, returncode=1)


def test_only_a_completed_run_gives_exit_code_0() -> None:
    verdict = local_deploy.run_verdict
    status = local_deploy.RunStatus
    assert verdict(0, 42, status(42, "finished:completed")) == (
        0, "run 42 ended with status finished:completed")
    code, message = verdict(0, 42, status(42, "finished:failed", FAILED_DETAILS))
    assert code == 1
    assert message == ("run 42 ended with status finished:failed (flwr run exited with code 0, "
                       f"as it does whatever the outcome). Flower says: {FAILED_DETAILS}")
    code, message = verdict(0, 42, status(42, "finished:stopped"))
    assert code == 1 and message.startswith("run 42 ended with status finished:stopped (")
    assert verdict(0, 42, status(42, "running")) == (
        1, "run 42 still has status running although flwr run exited")
    code, message = verdict(0, 42, None, "`flwr ls` failed: boom")
    assert code == 1 and message.startswith(
        "could not read the status of run 42 from the SuperLink: `flwr ls` failed: boom")
    code, message = verdict(0, None, None)
    assert code == 1 and "names the run it started" in message
    # flwr run's own failure (e.g. the SuperLink refused to create the run) is passed on.
    assert verdict(1, None, None) == (1, "flwr run exited with code 1")


def _exited(command: str, tmp_path: Path, log: bool = True) -> ManagedProcess:
    process = ManagedProcess(
        "flwr-run", ["bash", "-c", command], dict(os.environ),
        tmp_path / "run.log" if log else None,
    ).start()
    assert process.process is not None
    process.process.wait(timeout=30)
    return process


def test_run_outcome_asks_flwr_ls_about_the_run_flwr_run_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = LocalDeployment(tmp_path / "work", num_supernodes=1, port=45682)
    deployment.workdir.mkdir()  # as prepare() leaves it
    assert deployment.list_run_command(42)[1:] == [
        "ls", "local-deployment", "--run-id", "42", "--format", "json"]
    asked: list[int] = []
    answer = tmp_path / "ls.json"

    def fake_flwr_ls(run_id: int) -> list[str]:
        asked.append(run_id)
        return ["cat", str(answer)]

    monkeypatch.setattr(deployment, "list_run_command", fake_flwr_ls)
    run = _exited("echo 'Successfully started run 42'; echo '📡 Starting logstream'", tmp_path)
    assert run.returncode == 0

    answer.write_text(_flwr_ls_json("finished:failed", FAILED_DETAILS))
    code, message = deployment.run_outcome(run, settle_s=0)
    assert asked == [42]
    assert code == 1 and message.startswith("run 42 ended with status finished:failed")
    answer.write_text(_flwr_ls_json("finished:completed"))
    assert deployment.run_outcome(run, settle_s=0)[0] == 0
    answer.write_text(FLWR_LS_ERROR)
    code, message = deployment.run_outcome(run, settle_s=0)
    assert (code, message) == (1, "could not read the status of run 42 from the SuperLink: "
                               "`flwr ls` failed: [code: 16] Run ID not found. (flwr run's exit "
                               "code 0 says nothing about the run)")

    # flwr run printing to a terminal: the run ID comes from the SuperLink's log.
    superlink_log = tmp_path / "superlink.log"
    superlink_log.write_text("INFO :      Created run 11 in federation @none/default\n")
    deployment.superlink = ManagedProcess("superlink", ["true"], {}, superlink_log)
    deployment.superlink.process = run.process  # looks started
    on_terminal = _exited("true", tmp_path, log=False)
    superlink_log.write_text(superlink_log.read_text() + "INFO :      Created run 12 in federation "
                             "@none/default\n")
    # pylint: disable-next=protected-access
    deployment._superlink_log_since[on_terminal.pid] = len("INFO :      Created run 11 in "
                                                            "federation @none/default\n")
    answer.write_text(_flwr_ls_json("finished:stopped", run_id=12))
    assert deployment.run_outcome(on_terminal, settle_s=0)[0] == 1
    assert asked[-1] == 12


def test_main_exits_1_when_the_run_failed_although_flwr_run_exited_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    answer = tmp_path / "ls.json"
    answer.write_text(_flwr_ls_json("finished:failed", FAILED_DETAILS))
    run = _exited("echo 'Successfully started run 42'", tmp_path)
    monkeypatch.setattr(LocalDeployment, "start", lambda self: self.workdir.mkdir())
    monkeypatch.setattr(LocalDeployment, "start_run",
                        lambda self, run_config="", log_path=None: self._track(run))
    monkeypatch.setattr(LocalDeployment, "list_run_command",
                        lambda self, run_id: ["cat", str(answer)], raising=False)
    with caplog.at_level(logging.INFO, logger="deploy"):
        code = local_deploy.main(["--workdir", str(tmp_path / "work"), "--port", "0"])
    assert code == 1
    assert "flwr run exited with code 0" in caplog.text
    assert "run 42 ended with status finished:failed" in caplog.text


def test_unknown_run_config_keys_are_named_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The SuperLink would say only "[code: 15] Invalid run configuration." (measured)."""
    with pytest.raises(SystemExit) as exited:
        parse_args(["--run-config", "num-server-round=3 local-epochs=1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--run-config: unknown key 'num-server-round' (did you mean 'num-server-rounds'?)" in err
    assert "[code: 15] Invalid run configuration." in err
    assert "Known keys: " in err and "batch-size, " in err and "local-epochs" in err
    assert parse_args(["--run-config", "num-server-rounds=3 local-epochs=1"]).run_config

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.flwr.app.config]\nrounds = 1\n[tool.flwr.app.config.opt]\n'
                         'lr = 0.1\n')
    assert local_deploy.check_run_config("rounds=2 opt.lr=0.5", pyproject) == {
        "rounds": 2, "opt.lr": 0.5}
    with pytest.raises(ValueError) as refused:
        local_deploy.check_run_config("round=2 zzz=1", pyproject)
    assert str(refused.value).startswith(
        "--run-config: unknown keys 'round' (did you mean 'rounds'?), 'zzz': "
        f"[tool.flwr.app.config] in {pyproject} does not have them")
    assert str(refused.value).endswith("Known keys: opt.lr, rounds")
    with pytest.raises(ValueError, match="not a .toml file"):
        local_deploy.check_run_config("overrides.toml", pyproject)

    deployment = LocalDeployment(tmp_path / "work", num_supernodes=1, port=45683)
    with pytest.raises(DeploymentError, match="unknown key 'num-server-round'"):
        deployment.start_run("num-server-round=3")
    assert deployment.processes == []


# ------------------------------------------------------------- end to end on a real deployment
def write_digits_csv(path: Path, rows: np.ndarray) -> Path:
    """scikit-learn's digits as a table: 64 pixel columns and ``label``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    header = ",".join([f"p{k}" for k in range(64)] + ["label"])
    table = np.column_stack([bunch.data[rows], bunch.target[rows]]).astype(int)
    np.savetxt(path, table, fmt="%d", delimiter=",", header=header, comments="")
    return path


@pytest.fixture(scope="module")
def digits_tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The server's table (its test set; node 1's partition) and node 0's own file.

    Node 0's clinic holds only digits 0-4 of the 10 classes, from rows the
    server's table does not have.
    """
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("tables")
    labels = load_digits().target
    cut = 1300
    own = np.flatnonzero((np.arange(len(labels)) >= cut) & (labels < 5))
    return (write_digits_csv(folder / "server.csv", np.arange(cut)),
            write_digits_csv(folder / "clinic-0.csv", own))


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, digits_tables: tuple[Path, Path]
) -> Iterator[LocalDeployment]:
    """SuperLink (TLS, SuperNode auth) + 2 registered, authenticated SuperNodes.

    SuperNode 0 has its own file (node-config ``data-path``); SuperNode 1
    takes partition 1 of 2 of the run's dataset.
    """
    with loopback_deployment(
        tmp_path_factory.mktemp("deployment"), num_supernodes=2,
        data_paths={0: f"{digits_tables[1]}?label=label&classes=10"},
    ) as started:
        yield started


@pytest.mark.e2e
def test_deployment_uses_tls_auth_and_per_node_config(deployment: LocalDeployment) -> None:
    superlink = deployment.superlink
    assert superlink is not None and superlink.running()
    assert {"--enable-supernode-auth", "--ssl-certfile"} <= set(superlink.command)
    assert "--insecure" not in superlink.command
    assert "Uvicorn running on https://" in superlink.log_text()
    configs = []
    for slot in deployment.supernodes:
        assert slot.process is not None and slot.process.running()
        command = slot.process.command
        assert "--auth-supernode-private-key" in command and "--insecure" not in command
        configs.append(command[command.index("--node-config") + 1])
        assert slot.node_id is not None
    assert configs[0].startswith("partition-id=0 num-partitions=2 state-dir=")
    assert configs[1].startswith("partition-id=1 num-partitions=2 state-dir=")
    assert "data-path='" in configs[0] and "data-path" not in configs[1]


@pytest.mark.e2e
def test_fewer_nodes_than_min_train_nodes_ends_the_run_with_a_clear_message(
    deployment: LocalDeployment, tmp_path: Path
) -> None:
    outputs = tmp_path / "outputs"
    started = time.monotonic()
    run = deployment.start_run(
        f"num-server-rounds=2 {FAST} min-train-nodes=3 node-wait-timeout=5 "
        f"output-dir='{outputs}'",
        log_path=tmp_path / "run.log",
    )
    flwr_code = finish(run, timeout=180)
    log = run.log_text()
    assert "only 2 node(s) connected after waiting 5 s" in log, log[-4000:]
    assert "[round 1/" not in log
    assert time.monotonic() - started < 180
    # Flower's CLI exits with 0 although the ServerApp failed; the SuperLink knows better,
    # and the script's exit code follows the run's status.
    assert flwr_code == 0, log[-4000:]
    run_id = deployment.run_id_of(run)
    assert run_id is not None, log[-4000:]
    code, message = deployment.run_outcome(run)
    assert code == 1, message
    assert message.startswith(f"run {run_id} ended with status finished:failed"), message
    assert "only 2 node(s) connected after waiting 5 s" in message
    # The SuperNodes are unaffected by the failed run.
    assert all(slot.process is not None and slot.process.running()
               for slot in deployment.supernodes)


# pylint: disable=too-many-locals,too-many-statements
@pytest.mark.e2e
def test_dp_run_survives_a_supernode_killed_mid_round_and_its_restart(
    deployment: LocalDeployment, digits_tables: tuple[Path, Path], tmp_path: Path
) -> None:
    """2 rounds of DP-FedAvg; SuperNode 1 is SIGKILLed in round 1 and restarted after it.

    Also: a SuperNode with an unregistered key tries to join during the run
    and is refused without the run noticing; and SuperNode 0 trains on its
    own file (node-config ``data-path``, digits 0-4 only) while SuperNode 1
    trains on its partition of the server's table, one model for both.
    """
    outputs = tmp_path / "outputs"
    noise, clip = 0.01, 1.0
    victim = deployment.supernodes[1]
    assert victim.process is not None
    node_id_before = victim.node_id
    victim_log_start = victim.process.log_size()
    own_file = deployment.supernodes[0]
    assert own_file.process is not None
    own_log_start = own_file.process.log_size()
    server_table = f"dataset='csv' data-path='{digits_tables[0]}?label=label'"

    t_start = time.monotonic()
    run = deployment.start_run(
        f"num-server-rounds=2 {FAST} {server_table} strategy='dp-fedavg' client-sampling='fixed' "
        f"fraction-train=1.0 min-train-nodes=2 noise-multiplier={noise} clipping-norm={clip} "
        f"round-timeout={ROUND_TIMEOUT} node-wait-timeout=120 output-dir='{outputs}'",
        log_path=tmp_path / "run.log",
    )
    # An intruder: a well-formed key the SuperLink operator never registered.
    rogue_key = create_auth_key_pair(tmp_path / "rogue-keys", "rogue")
    rogue = deployment.launch_supernode(
        "rogue", tmp_path / "rogue", "partition-id=0 num-partitions=2", rogue_key.private_key
    )
    try:
        # Kill SuperNode 1 (its ClientApp too) once it has taken round 1's train message.
        wait_for_log(victim.process, "Receiving: train message", 240, since=victim_log_start)
        t_kill = time.monotonic()
        victim.process.kill()
        t_round1 = wait_for_log(run, r"\[round 1/2\]", ROUND_TIMEOUT + 60)
        # After the round the SuperLink has the crashed node offline: restart it.
        crashed_log_end = victim.process.log_size()
        rejoined_id = deployment.restart_supernode(1, timeout=120)
        code = finish(run, timeout=300)
        t_end = time.monotonic()
        rogue_code = rogue.returncode  # before stop(), which would set one
    finally:
        rogue.stop()
    log = run.log_text()
    print(
        f"\n[deployment timing] run {t_end - t_start:.1f} s; killed node's round ended "
        f"{t_round1 - t_kill:.1f} s after the kill"
    )

    assert code == 0, log[-4000:]
    assert "[round 2/2]" in log, log[-4000:]
    # The missing client is logged, with Flower's reason.
    assert "Node Unavailable" in log, log[-4000:]
    # The round did not wait for round-timeout: Flower's heartbeat expiry ended it.
    assert t_round1 - t_kill < ROUND_TIMEOUT

    # The restarted SuperNode rejoined under the same identity and trained in round 2.
    assert rejoined_id == node_id_before
    after_crash = victim.process.log_text()[crashed_log_end:]
    assert re.search(r"SuperNode ID: \d+[\s\S]*Receiving: train message", after_crash), after_crash

    rounds = only_run_metrics(outputs, log)["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    first, second = rounds[1], rounds[2]
    assert (first["num-sampled"], first["num-accepted"], first["num-rejected"]) == (2, 1, 1)
    assert (second["num-sampled"], second["num-accepted"], second["num-rejected"]) == (2, 2, 0)
    # DP accounting assumed the sampled set: the denominator and the noise stay
    # those of 2 sampled clients although only 1 contributed, and epsilon grows.
    assert first["expected-clients"] == second["expected-clients"] == 2
    assert first["num-contributing"] == 1 and second["num-contributing"] == 2
    assert first["noise-stddev"] == second["noise-stddev"] == pytest.approx(noise * clip / 2)
    assert 0 < first["epsilon"] < second["epsilon"] < math.inf
    assert all(math.isfinite(r["central-loss"]) for r in rounds)

    # SuperNode 0 read only its own file: digits 0-4 of 10 classes, about 90% for training.
    own_log = own_file.process.log_text()[own_log_start:]
    loaded = re.search(r"Node file (\S+): (\d+) train / (\d+) validation samples, labels "
                       r"\[([\d, ]+)\]", own_log)
    assert loaded, own_log[-4000:]
    assert loaded.group(1) == f"{digits_tables[1]}?label=label&classes=10"
    histogram = [int(c) for c in loaded.group(4).split(",")]
    assert len(histogram) == 10 and sum(histogram[5:]) == 0
    assert int(loaded.group(2)) + int(loaded.group(3)) == len(
        digits_tables[1].read_text().splitlines()) - 1
    assert "Node file" not in victim.process.log_text()

    # The unregistered SuperNode was refused and never took part.
    assert rogue_code not in (None, 0), rogue.log_text()[-2000:]
    assert ACTIVATION_REFUSED in rogue.log_text()
    assert count(UNKNOWN_KEY_REFUSED, deployment.superlink.log_text()) >= 1  # type: ignore[union-attr]


def test_node_limits_reach_every_supernode_and_bad_ones_fail_before_start(tmp_path: Path) -> None:
    from deploy.local_deploy import check_node_limits, parse_args
    from privacy.node_limits import parse_node_limits

    limits = "private-layers='head' require-dp-sgd=true max-sample-epsilon=8.0"
    deployment = LocalDeployment(tmp_path / "work", num_supernodes=2, node_limits=limits)
    deployment.prepare()
    for slot in deployment.supernodes:
        parsed = parse_node_limits(parse_config_args([slot.node_config]))
        assert parsed.require_dp_sgd and parsed.max_sample_epsilon == 8.0
    with pytest.raises(ValueError, match="max-sample-epsilon"):
        check_node_limits("max-sample-epsilon=0")
    with pytest.raises(SystemExit):
        parse_args(["--node-limits", "require-dpsgd=true"])
