"""Run folders are never reused and metrics.json stays valid JSON after every round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.run_outputs import MetricsLog, create_run_dir, resolve_output_dir, write_json_atomically


def test_relative_output_dir_resolves_against_the_app_not_the_cwd(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_output_dir("outputs", Path("/srv/app")) == Path("/srv/app/outputs")
    assert resolve_output_dir(str(tmp_path / "x")) == tmp_path / "x"


def test_an_existing_run_folder_is_never_reused(tmp_path: Path) -> None:
    first = create_run_dir(tmp_path, 7)
    (first / "metrics.json").write_text("user's earlier results")
    second = create_run_dir(tmp_path, 7)
    third = create_run_dir(tmp_path, 7)
    assert (first.name, second.name, third.name) == ("7", "7-1", "7-2")
    assert (first / "metrics.json").read_text() == "user's earlier results"


def test_metrics_log_is_valid_json_after_each_round_and_nan_becomes_null(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.json", {"num-server-rounds": 2})
    assert json.loads((tmp_path / "metrics.json").read_text())["rounds"] == []
    log.append({"round": 0, "central-accuracy": 0.1})
    log.append({"round": 1, "train-loss": float("nan"), "central-accuracy": 0.5})
    content = json.loads((tmp_path / "metrics.json").read_text())
    assert content["config"] == {"num-server-rounds": 2}
    assert content["rounds"] == [
        {"round": 0, "central-accuracy": 0.1},
        {"round": 1, "train-loss": None, "central-accuracy": 0.5},
    ]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomically(path, {"rounds": [1]})
    with pytest.raises(TypeError):
        write_json_atomically(path, {"rounds": [object()]})
    assert json.loads(path.read_text()) == {"rounds": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
