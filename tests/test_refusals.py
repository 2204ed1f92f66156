"""A run the ServerApp refuses writes nothing, says why at ERROR, and names the key and file.

Each test runs the real ``main`` up to its refusal (no round is trained: the
grid only lists nodes) and compares the affected folder before and after:
every file's name, size, modification time and bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from app.checkpoint import save_run_checkpoint
from app.config import ConfigError, parse_run_config
from app.run_outputs import MetricsLog
from app.server_app import build_strategy, main
from app.task import federation_spec
from tests.inprocess import run_config

Snapshot = dict[str, tuple[int, int, bytes]]


class ListingGrid:
    """Lists ``num_nodes`` connected nodes; a refused run never sends them anything."""

    def __init__(self, num_nodes: int = 2) -> None:
        self.num_nodes = num_nodes

    def get_node_ids(self) -> list[int]:
        return list(range(1000, 1000 + self.num_nodes))

    def send_and_receive(self, messages, timeout=None):  # pragma: no cover - never reached
        raise AssertionError("a refused run sent messages")


def snapshot(folder: Path) -> Snapshot:
    """Every file under ``folder``: relative path -> (size, mtime_ns, bytes)."""
    if not folder.exists():
        return {}
    return {
        str(path.relative_to(folder)): (
            path.stat().st_size, path.stat().st_mtime_ns, path.read_bytes()
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def listing(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` (folders too: an empty one counts)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def flwr_errors(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture Flower's log (main sets propagate=False on it, so attach the handler there)."""
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def refuse(config: dict, grid: ListingGrid | None = None, run_id: int = 9) -> ConfigError:
    """Run ``main`` and return the ConfigError it refuses the run with."""
    context = Context(
        run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config=config
    )
    with pytest.raises(ConfigError) as caught:
        main(grid or ListingGrid(), context)
    return caught.value


def logged_error(caplog: pytest.LogCaptureFixture, message: str) -> None:
    """The refusal was logged at ERROR, with the whole message, before it was raised."""
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("refused" in text and message in text for text in errors), errors


def earlier_run(run_dir: Path, rounds: int = 2, **overrides) -> dict:
    """A finished fedavg run's folder as the ServerApp leaves it (checkpoints of the last 2 rounds).

    Returns the run config it ran with.
    """
    config = run_config(**{"output-dir": str(run_dir.parent), "num-server-rounds": rounds},
                        **overrides)
    parsed = parse_run_config(config)
    strategy = build_strategy(parsed)
    run_dir.mkdir(parents=True)
    (run_dir / "label-distribution.png").write_bytes(b"\x89PNG the earlier run's plot")
    (run_dir / "model.keras").write_bytes(b"the earlier run's model")
    metrics = MetricsLog(run_dir / "metrics.json", parsed.as_dict())
    for server_round in range(rounds + 1):
        entry = {"round": server_round, "central-accuracy": 0.1 * server_round}
        save_run_checkpoint(
            run_dir, server_round, {"w": np.full(3, server_round, np.float32)}, strategy,
            parsed.as_dict(), entry,
        )
        metrics.append(entry)
    return config


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize(
    ("key", "value"), [("strategy", "dp-fedavg"), ("partitioner", "dirichlet")]
)
def test_a_resume_with_a_changed_setting_is_refused_and_the_run_folder_is_untouched(
    tmp_path: Path, flwr_errors: pytest.LogCaptureFixture, key: str, value: str
) -> None:
    """Defect: label-distribution.png was rewritten before the config check refused."""
    run_dir = tmp_path / "outputs" / "1"
    config = earlier_run(run_dir)
    before, names = snapshot(tmp_path), listing(tmp_path)
    message = str(refuse(dict(config, resume=str(run_dir), **{key: value})))
    assert snapshot(tmp_path) == before and listing(tmp_path) == names
    assert (
        f"run config 'resume' = {str(run_dir)!r}: cannot resume with a different run config"
        in message
    )
    assert f"{key}: {config[key]!r} -> {value!r}" in message
    logged_error(flwr_errors, message)


def test_a_resume_with_a_changed_dataset_is_refused_and_the_run_folder_is_untouched(
    tmp_path: Path, flwr_errors: pytest.LogCaptureFixture
) -> None:
    table = tmp_path / "table.csv"
    rng = np.random.default_rng(0)
    table.write_text(
        "a,b,label\n" + "".join(f"{x:.3f},{y:.3f},{k % 2}\n" for k, (x, y) in
                                enumerate(rng.normal(size=(60, 2))))
    )
    run_dir = tmp_path / "outputs" / "1"
    config = earlier_run(run_dir)
    before = snapshot(run_dir)
    message = str(refuse(dict(config, resume=str(run_dir), dataset="csv",
                              **{"data-path": str(table)})))
    assert snapshot(run_dir) == before
    assert "dataset: 'digits' -> 'csv'" in message
    logged_error(flwr_errors, message)


def test_resume_at_a_folder_that_is_no_run_folder_is_refused_without_writing_into_it(
    tmp_path: Path, flwr_errors: pytest.LogCaptureFixture
) -> None:
    """Defect: the label-distribution plot was written into the user's folder first."""
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's own file")
    before, names = snapshot(folder), listing(folder)
    message = str(refuse(run_config(resume=str(folder))))
    assert snapshot(folder) == before and listing(folder) == names
    assert f"{folder} holds neither metrics.json nor checkpoints/" in message
    assert "not the folder of an earlier run" in message
    logged_error(flwr_errors, message)


def test_resume_at_a_folder_that_does_not_exist_says_so(
    tmp_path: Path, flwr_errors: pytest.LogCaptureFixture
) -> None:
    """Defect: FileNotFoundError: .../label-distribution.png."""
    missing = tmp_path / "outputs" / "41"
    message = str(refuse(run_config(resume=str(missing))))
    assert message == (
        f"run config 'resume' = {str(missing)!r}: {missing} does not exist; name the "
        "folder of an earlier run (<output-dir>/<run id>)"
    )
    assert listing(tmp_path) == []
    logged_error(flwr_errors, message)


def test_resume_at_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("{}")
    message = str(refuse(run_config(resume=str(path))))
    assert f"{path} is a file, not a run folder" in message
    assert path.read_text() == "{}"


def test_a_truncated_metrics_json_the_checkpoints_cannot_replace_is_refused_naming_it(
    tmp_path: Path, flwr_errors: pytest.LogCaptureFixture
) -> None:
    """Defect: a raw json.decoder.JSONDecodeError naming no file, after writing the plot."""
    run_dir = tmp_path / "outputs" / "1"
    config = earlier_run(run_dir, rounds=3)  # checkpoints of rounds 2 and 3 only
    metrics = run_dir / "metrics.json"
    metrics.write_bytes(metrics.read_bytes()[:150])
    before = snapshot(run_dir)
    message = str(refuse(dict(config, resume=str(run_dir))))  # not a bare JSONDecodeError
    assert snapshot(run_dir) == before
    assert f"{metrics} is not valid JSON (truncated?)" in message
    assert "hold the entries of rounds 2, 3 only, not of rounds 0, 1" in message
    assert "Restore metrics.json from a backup" in message
    assert f"mv {metrics} {metrics}.damaged" in message
    logged_error(flwr_errors, message)


# ------------------------------------------------------------------ new runs
def test_an_output_dir_that_is_a_file_is_refused_naming_key_and_path(
    tmp_path: Path, flwr_errors: pytest.LogCaptureFixture
) -> None:
    """Defect: FileExistsError traceback from create_run_dir."""
    path = tmp_path / "outputs"
    path.write_text("not a folder")
    before = snapshot(tmp_path)
    message = str(refuse(run_config(**{"output-dir": str(path)})))
    assert message == (
        f"run config 'output-dir' = {str(path)!r}: {path} exists and is a file, not a "
        "folder; name a folder (it is created if missing)"
    )
    assert snapshot(tmp_path) == before and listing(tmp_path) == ["outputs"]
    logged_error(flwr_errors, message)

    below = path / "runs"  # a folder under the file
    message = str(refuse(run_config(**{"output-dir": str(below)})))
    assert f"{path} is a file, so {below} cannot be a folder" in message
    assert snapshot(tmp_path) == before


def test_a_partition_that_cannot_be_built_leaves_no_run_folder(
    tmp_path: Path, flwr_errors: pytest.LogCaptureFixture
) -> None:
    """Defect: more clients than samples left an empty <output-dir>/<run id>/ behind."""
    output_dir = tmp_path / "outputs"
    grid = ListingGrid(num_nodes=1500)  # digits keeps ~1440 training samples
    message = str(refuse(run_config(**{"output-dir": str(output_dir)}), grid))
    assert message.startswith(
        "run config 'dataset' = 'digits', 'partitioner' = 'iid': the data cannot be split "
        "over the 1500 connected nodes: "
    )
    assert not output_dir.exists()
    logged_error(flwr_errors, message)


def test_too_few_nodes_leave_no_run_folder(
    tmp_path: Path, flwr_errors: pytest.LogCaptureFixture
) -> None:
    """Defect: the run folder was created before waiting for the nodes."""
    from strategies.sampling import NotEnoughNodes

    output_dir = tmp_path / "outputs"
    config = run_config(**{"output-dir": str(output_dir), "node-wait-timeout": 0.01})
    context = Context(run_id=9, node_id=1, node_config={}, state=RecordDict(), run_config=config)
    with pytest.raises(NotEnoughNodes) as caught:
        main(ListingGrid(num_nodes=1), context)
    assert not output_dir.exists()
    logged_error(flwr_errors, str(caught.value))


# ------------------------------------------------------------------ max-classes
def test_max_classes_reaches_the_server_split_and_the_federation_spec(
    tmp_path: Path, flwr_errors: pytest.LogCaptureFixture
) -> None:
    """The run-config key caps a table's label space on the server, before anything is written."""
    table = tmp_path / "three-classes.csv"
    table.write_text("a,label\n" + "".join(f"{k},{k % 3}\n" for k in range(30)))
    config = run_config(dataset="csv", **{"data-path": str(table), "max-classes": 2,
                                          "output-dir": str(tmp_path / "outputs")})
    assert federation_spec(parse_run_config(config), 3).max_classes == 2
    message = str(refuse(config))
    assert f"run config 'dataset' = 'csv', 'data-path' = {str(table)!r}" in message
    assert "class cap of 2" in message
    assert not (tmp_path / "outputs").exists()
    logged_error(flwr_errors, message)

