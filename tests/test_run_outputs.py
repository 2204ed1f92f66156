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


def strict_json(path: Path):
    """``path`` parsed as standard JSON: ``Infinity``/``NaN`` are errors, not numbers."""

    def refuse(constant: str):
        raise AssertionError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


INF = float("inf")


def test_an_infinite_epsilon_is_written_as_the_string_inf(tmp_path: Path) -> None:
    """Defect: dp-fedavg with noise-multiplier 0 crashed after round 1 (inf is not JSON)."""
    log = MetricsLog(tmp_path / "metrics.json", {"noise-multiplier": 0.0}, [{"round": 0}])
    log.append({
        "round": 1, "epsilon": INF, "epsilon-pld": INF, "delta": 1e-5, "train-loss": float("nan"),
        "clients": [{"node": 3, "update-norm": INF, "cosine-to-aggregate": float("nan")}],
        "low": -INF,
    })
    rounds = strict_json(tmp_path / "metrics.json")["rounds"]
    assert rounds[1] == {
        "round": 1, "epsilon": "inf", "epsilon-pld": "inf", "delta": 1e-5, "train-loss": None,
        "clients": [{"node": 3, "update-norm": "inf", "cosine-to-aggregate": None}],
        "low": "-inf",
    }
    assert float(rounds[1]["epsilon"]) == INF  # what the file says to read it with


def test_output_dir_check_names_what_stands_in_the_way(tmp_path: Path) -> None:
    from app.run_outputs import OutputDirError, check_output_dir

    check_output_dir(tmp_path / "new" / "deeper")  # does not exist yet: fine, not created
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match=r"file exists and is a file, not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(OutputDirError, match=r"file is a file, so .*file/runs cannot be a folder"):
        check_output_dir(tmp_path / "file" / "runs")


def test_an_infinite_epsilon_reads_back_as_inf_everywhere(tmp_path: Path) -> None:
    """The progress line, the summary, the report table, plots and TensorBoard take "inf"."""
    from app.plots import plot_run
    from app.progress import format_round_line, format_summary, run_summary
    from app.report import comparison_rows, read_metrics
    from app.tensorboard_log import TensorBoardLog

    live = {"round": 1, "epsilon": INF, "central-accuracy": 0.5, "sample-epsilon-max": INF}
    line = format_round_line(live, 2, 1.0)
    assert "| epsilon inf |" in line and "| sample epsilon <= inf |" in line

    config = {"strategy": "dp-fedavg", "num-server-rounds": 2, "target-sample-delta": 1e-5}
    log = MetricsLog(tmp_path / "metrics.json", config)
    log.append({"round": 0, "central-accuracy": 0.1})
    log.append(dict(live, delta=1e-5, **{"epsilon-pld": INF, "elapsed-s": 1.0}))
    metrics = read_metrics(tmp_path)
    assert metrics["rounds"][1]["epsilon"] == "inf"
    assert "| epsilon inf |" in format_round_line(metrics["rounds"][1], 2, 1.0)
    assert run_summary(metrics)["epsilon"] == INF
    summary = format_summary(metrics, tmp_path)
    assert (
        "  final epsilon inf (PLD inf) at delta 1e-05 (user-level): no privacy guarantee"
        in summary.splitlines()
    )
    assert "  sample-level epsilon <= inf at delta 1e-05 (DP-SGD, worst client)" in summary
    assert comparison_rows({"run": metrics})[1][7] == "inf"
    plot_run(metrics, tmp_path / "plots")  # the privacy plot has no finite point: left out
    assert not (tmp_path / "plots" / "privacy.png").exists()
    assert (tmp_path / "plots" / "accuracy.png").exists()
    board = TensorBoardLog.rebuild(tmp_path, metrics["rounds"])  # inf is skipped, not written
    board.close()
