"""Tracking a run outside metrics.json: TensorBoard event files and MLflow.

Each is read back with the other library's own reader: TensorBoard's
``EventAccumulator`` for the event files tensorboardX writes, and
``MlflowClient`` for the MLflow store.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import types
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from app.mlflow_log import (
    DB_FILE,
    MLFLOW_DIR,
    PROBE_HTTP_SETTINGS,
    RUN_ID_FILE,
    MlflowLog,
    TrackingError,
    check_tracking,
    local_tracking_uri,
)
from app.report import main as report_main
from app.tensorboard_log import TensorBoardLog

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    from mlflow.tracking import MlflowClient

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


def _rounds(last: int) -> list[dict]:
    """``metrics.json`` entries of a DP run, rounds 0..last."""
    entries: list[dict] = [{"round": 0, "central-accuracy": 0.1, "central-loss": 2.3}]
    for k in range(1, last + 1):
        entries.append(
            {
                "round": k,
                "train-loss": 2.0 / k,
                "central-accuracy": 0.2 + 0.1 * k,
                "central-loss": 2.2 / k,
                "num-sampled": 5,
                "elapsed-s": 2.0,
                "epsilon": 1.5 * k,
                "clipping-norm": 1.0 + 0.1 * k,
                "clipped-fraction-noised": None,  # null in metrics.json: skipped
                "noise-stddev": float("nan"),  # skipped too
                "my-new-figure": 7,  # unmapped: TensorBoard tag other/my-new-figure
            }
        )
    return entries


def approx_pairs(pairs: list[tuple[int, float]]) -> list[tuple[int, object]]:
    """``(step, value)`` pairs with exact steps and float32-tolerant values."""
    return [(step, pytest.approx(value)) for step, value in pairs]


# --------------------------------------------------------------- tensorboard
def read_tensorboard(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> ``(step, value)`` as TensorBoard itself loads the folder.

    TensorBoard reads records through TensorFlow when it can import it (15 s
    here); ``tensorboard.compat.notf`` is its switch to its own pure-Python
    reader (``tensorboard.compat.tensorflow_stub``, CRCs checked), used here.
    """
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    accumulator = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_tensorboard_reads_every_scalar_under_grouped_tags(tmp_path: Path) -> None:
    with TensorBoardLog(tmp_path) as tb:
        assert tb.path is None  # no file before the first round
        assert [tb.log_round(entry) for entry in _rounds(3)] == [2, 8, 8, 8]
    assert tb.path is not None and tb.path.parent == tmp_path / "tensorboard"
    assert tb.path.name.startswith("events.out.tfevents.")
    scalars = read_tensorboard(tb.log_dir)
    assert sorted(scalars) == [
        "accuracy/central", "clients/sampled", "clipping/norm", "loss/central", "loss/train",
        "other/my-new-figure", "privacy/epsilon", "time/round-seconds",
    ]
    assert scalars["accuracy/central"] == approx_pairs([(0, 0.1), (1, 0.3), (2, 0.4), (3, 0.5)])
    assert scalars["privacy/epsilon"] == [(1, 1.5), (2, 3.0), (3, 4.5)]
    assert scalars["clipping/norm"] == approx_pairs([(1, 1.1), (2, 1.2), (3, 1.3)])
    assert scalars["other/my-new-figure"] == [(1, 7.0), (2, 7.0), (3, 7.0)]


def test_tensorboard_rebuild_on_resume_keeps_one_file_without_repeated_steps(
    tmp_path: Path,
) -> None:
    with TensorBoardLog(tmp_path) as tb:
        tb.log_rounds(_rounds(3))
    # Resume from the checkpoint of round 1: rounds 2 and 3 are redone.
    rebuilt = TensorBoardLog.rebuild(tmp_path, _rounds(1))
    rebuilt.log_round({"round": 2, "central-accuracy": 0.45})
    rebuilt.close()
    assert list((tmp_path / "tensorboard").iterdir()) == [rebuilt.path]
    assert read_tensorboard(rebuilt.log_dir)["accuracy/central"] == approx_pairs(
        [(0, 0.1), (1, 0.3), (2, 0.45)]
    )
    # A later log_round after close opens a second file, never overwriting the first.
    rebuilt.log_round({"round": 3, "central-accuracy": 0.5})
    rebuilt.close()
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2
    assert read_tensorboard(rebuilt.log_dir)["accuracy/central"][-1] == (3, pytest.approx(0.5))


def test_tensorboard_shows_the_rounds_before_a_torn_last_record(tmp_path: Path) -> None:
    """Each round is flushed on its own: a crash mid-write loses only that round."""
    with TensorBoardLog(tmp_path) as tb:
        tb.log_rounds(_rounds(2))
    assert tb.path is not None
    tb.path.write_bytes(tb.path.read_bytes()[:-3])
    assert read_tensorboard(tb.log_dir)["accuracy/central"] == approx_pairs([(0, 0.1), (1, 0.3)])


def test_report_rewrites_a_runs_tensorboard_events_from_metrics_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rounds = [{k: v for k, v in e.items() if k != "noise-stddev"} for e in _rounds(2)]
    metrics = {"config": {"dataset": "digits"}, "rounds": rounds}
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert report_main([str(run), "--no-plots", "--tensorboard"]) == 0
    capsys.readouterr()
    assert read_tensorboard(run / "tensorboard")["loss/train"] == [(1, 2.0), (2, 1.0)]


def test_tensorboard_module_has_no_encoder_of_its_own() -> None:
    source = (Path(__file__).parents[1] / "app" / "tensorboard_log.py").read_text()
    assert "tensorboardX" in source
    assert "crc32c" not in source.lower() and "struct.pack" not in source


# -------------------------------------------------------------------- mlflow

pytestmark = pytest.mark.filterwarnings(
    # MLflow 3.18's SQL store with SQLAlchemy 2.1, when a client opens it.
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"
)

CONFIG = {"num-server-rounds": 5, "strategy": "dp-fedavg", "dp-sgd": False, "resume": ""}


@pytest.fixture(scope="module")
def open_store() -> Callable[[str], MlflowClient]:
    """``MlflowClient`` for a tracking URI; MLflow comes with the dev group."""
    tracking = pytest.importorskip(
        "mlflow.tracking", reason="MLflow is not installed (dev group, or the 'tracking' extra)"
    )
    return lambda uri: tracking.MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def empty_store(
    tmp_path_factory: pytest.TempPathFactory, open_store: Callable[[str], MlflowClient]
) -> Path:
    """An MLflow SQLite store with its tables made, once (creating the tables takes seconds)."""
    path = tmp_path_factory.mktemp("store") / DB_FILE
    open_store(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def run_dir(tmp_path: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run folder whose own MLflow store starts as a copy of the empty one."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run = tmp_path / "20260101-000000-run"
    (run / MLFLOW_DIR).mkdir(parents=True)
    shutil.copyfile(empty_store, run / MLFLOW_DIR / DB_FILE)
    (run / "plots").mkdir()
    for name in ("accuracy.png", "privacy.png"):
        (run / "plots" / name).write_bytes(PNG)
    (run / "label-distribution.png").write_bytes(PNG)
    (run / "model.keras").write_bytes(b"PK\x03\x04 model")
    return run


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, info.path) if info.is_dir else [info.path])
    return sorted(out)


def test_mlflow_logs_params_rounds_and_artifacts_into_the_run_folder(
    run_dir: Path, open_store: Callable[[str], MlflowClient]
) -> None:
    tracker = MlflowLog(run_dir, CONFIG)
    assert not tracker.resumed
    assert tracker.tracking_uri == local_tracking_uri(run_dir)
    assert [tracker.log_round(entry) for entry in _rounds(3)] == [2, 8, 8, 8]
    assert tracker.log_artifacts(
        [run_dir / "plots", run_dir / "label-distribution.png", run_dir / "model.keras",
         run_dir / "missing.png"]
    ) == ["plots", "label-distribution.png", "model.keras"]
    tracker.close()

    assert (run_dir / MLFLOW_DIR / RUN_ID_FILE).read_text().strip() == tracker.run_id
    client = open_store(f"sqlite:///{run_dir / MLFLOW_DIR / DB_FILE}")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert client.get_experiment(run.info.experiment_id).name == "fedprivacy"
    assert run.data.params == {
        "num-server-rounds": "5", "strategy": "dp-fedavg", "dp-sgd": "False", "resume": ""
    }
    assert sorted(run.data.metrics) == [
        "central-accuracy", "central-loss", "clipping-norm", "elapsed-s", "epsilon",
        "my-new-figure", "num-sampled", "train-loss",
    ]
    assert _history(client, tracker.run_id, "central-accuracy") == approx_pairs(
        [(0, 0.1), (1, 0.3), (2, 0.4), (3, 0.5)]
    )
    assert _history(client, tracker.run_id, "epsilon") == [(1, 1.5), (2, 3.0), (3, 4.5)]
    assert _artifacts(client, tracker.run_id) == [
        "label-distribution.png", "model.keras", "plots/accuracy.png", "plots/privacy.png"
    ]
    # The artifacts are files inside the run folder, not somewhere under the cwd.
    stored = list((run_dir / MLFLOW_DIR / "artifacts").rglob("model.keras"))
    assert len(stored) == 1 and stored[0].read_bytes() == b"PK\x03\x04 model"


def test_mlflow_failed_run_resumed_continues_the_same_run(
    run_dir: Path, open_store: Callable[[str], MlflowClient]
) -> None:
    with pytest.raises(RuntimeError, match="round 3 failed"), MlflowLog(run_dir, CONFIG) as tracker:
        tracker.log_round(_rounds(2)[0])
        tracker.log_round(_rounds(2)[1])
        raise RuntimeError("round 3 failed")
    client = open_store(tracker.tracking_uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"

    # The run resumes from its round-1 checkpoint with a longer horizon.
    resumed_config = {**CONFIG, "num-server-rounds": 8, "resume": str(run_dir)}
    again = MlflowLog(run_dir, resumed_config, kept=_rounds(1))
    assert again.resumed and again.run_id == tracker.run_id
    assert client.get_run(again.run_id).info.status == "RUNNING"
    for entry in _rounds(3)[2:]:
        again.log_round(entry)
    again.close("FINISHED")

    run = client.get_run(again.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["num-server-rounds"] == "5"  # MLflow params never change ...
    assert run.data.tags["resumed-config.num-server-rounds"] == "8"  # ... the new value is a tag
    assert run.data.tags["resumed-config.resume"] == str(run_dir)
    assert [s for s, _ in _history(client, run.info.run_id, "central-accuracy")] == [0, 1, 2, 3]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_mlflow_resume_before_logged_rounds_starts_a_run_with_the_kept_rounds(
    run_dir: Path, open_store: Callable[[str], MlflowClient]
) -> None:
    first = MlflowLog(run_dir, CONFIG)
    for entry in _rounds(3):
        first.log_round(entry)
    # Killed without close; the newest checkpoint was damaged, so the run resumes
    # after round 1 and redoes rounds 2 and 3: no step may be drawn twice.
    second = MlflowLog(run_dir, CONFIG, kept=_rounds(1))
    assert not second.resumed and second.run_id != first.run_id
    assert (run_dir / MLFLOW_DIR / RUN_ID_FILE).read_text().strip() == second.run_id
    second.log_round({"round": 2, "central-accuracy": 0.45})
    second.close()

    client = open_store(second.tracking_uri)
    old, new = client.get_run(first.run_id), client.get_run(second.run_id)
    assert old.info.status == "KILLED"
    assert old.data.tags["fedprivacy.superseded-by"] == new.info.run_id
    assert new.data.tags["fedprivacy.resumed-from"] == old.info.run_id
    assert _history(client, new.info.run_id, "central-accuracy") == approx_pairs(
        [(0, 0.1), (1, 0.3), (2, 0.45)]
    )
    assert new.data.params == old.data.params


def test_mlflow_tracking_uri_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_store: Callable[[str], MlflowClient]
) -> None:
    store = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's plain-folder store
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "digits-sweep")
    run = tmp_path / "run"
    with MlflowLog(run, CONFIG) as tracker:
        tracker.log_round({"round": 1, "central-accuracy": 0.5})
    assert tracker.tracking_uri == store.as_uri()
    assert not (run / MLFLOW_DIR / DB_FILE).exists()
    assert (run / MLFLOW_DIR / RUN_ID_FILE).read_text().strip() == tracker.run_id
    client = open_store(store.as_uri())
    run_info = client.get_run(tracker.run_id)
    assert client.get_experiment(run_info.info.experiment_id).name == "digits-sweep"
    assert _history(client, tracker.run_id, "central-accuracy") == [(1, 0.5)]


def test_mlflow_store_failing_mid_run_warns_and_training_goes_on(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = MlflowLog(run_dir, CONFIG)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise ConnectionError("tracking server gone")

    monkeypatch.setattr(tracker.client, "log_batch", broken)
    assert tracker.log_round(_rounds(1)[1]) == 0
    monkeypatch.setattr(tracker.client, "set_terminated", broken)
    assert tracker.log_artifacts([run_dir / "model.keras"]) == []  # off after a failure
    tracker.close("FAILED")  # does not wait on the broken store
    with pytest.raises(ValueError, match="status"):
        tracker.close("DONE")


def test_mlflow_missing_or_unreachable_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_store: Callable[[str], MlflowClient]
) -> None:
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", *PROBE_HTTP_SETTINGS):
        monkeypatch.delenv(key, raising=False)
    check_tracking()  # installed, and the run folder's own store: nothing to check
    with pytest.raises(TrackingError, match="MLflow tracking at nosuchscheme://"):
        check_tracking("nosuchscheme://host/path")
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(TrackingError, match="Connection refused|Max retries"):
        check_tracking(f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 30  # not MLflow's default four minutes of retries
    assert not any(key.startswith("MLFLOW_HTTP") for key in os.environ)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking()  # a store that answers
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *_: None)
    with pytest.raises(TrackingError, match="extra 'tracking'|'tracking' extra"):
        check_tracking()
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["store"]

    # MlflowLog itself, when the checks were skipped.
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # as if not installed
    with pytest.raises(TrackingError, match="'tracking' extra"):
        MlflowLog(tmp_path / "a", CONFIG)
    monkeypatch.undo()
    with pytest.raises(TrackingError, match="MLflow tracking at"):
        MlflowLog(tmp_path / "b", CONFIG, tracking_uri="nosuchscheme://host/path")
