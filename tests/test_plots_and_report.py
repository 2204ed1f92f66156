"""Progress lines, plots and the report command, on synthetic runs.

TensorBoard events and MLflow tracking: tests/test_tracking.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.plots import ACCURACY_SERIES, distinct_series, plot_run
from app.progress import estimate_remaining_s, format_duration, format_round_line, format_summary
from app.report import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metrics(rounds: int = 4, dp: bool = False) -> dict:
    config = {
        "num-server-rounds": rounds,
        "dataset": "digits",
        "strategy": "dp-fedavg" if dp else "fedavg",
    }
    if dp:
        config.update({"clipping": "adaptive", "target-unclipped-quantile": 0.5})
    entries: list[dict] = [{"round": 0, "central-accuracy": 0.1, "central-loss": 2.3}]
    for k in range(1, rounds + 1):
        entry = {
            "round": k,
            "train-loss": 2.0 / k,
            "federated-accuracy": 0.15 * k,
            "federated-loss": 2.1 / k,
            "central-accuracy": [0.3, 0.6, 0.55, 0.7][(k - 1) % 4],
            "central-loss": 2.2 / k,
            "num-sampled": 5,
            "num-accepted": 5,
            "num-rejected": 0,
            "elapsed-s": 10.0 if k == 1 else 2.0,
        }
        if dp:
            entry.update(
                {
                    "personalized-accuracy": 0.5 + 0.1 * k,
                    "epsilon": 1.5 * k,
                    "epsilon-pld": 1.2 * k,
                    "delta": 1e-5,
                    "clipping-norm": 1.0 + 0.1 * k,
                    "next-clipping-norm": 1.1 + 0.1 * k,
                    "clipped-fraction": 0.8,
                    "clipped-fraction-noised": None,
                }
            )
        entries.append(entry)
    return {"config": config, "rounds": entries}


def _run_dir(tmp_path: Path, name: str, metrics: dict) -> Path:
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


# ------------------------------------------------------------------ progress
def test_round_line_has_losses_accuracy_epsilon_time_and_eta() -> None:
    entry = _metrics(4, dp=True)["rounds"][2]
    line = format_round_line(entry, 10, elapsed_total=12.0)
    assert line.startswith("[round 2/10] train-loss 1.0000 | central accuracy 0.6000 loss 1.1000")
    assert "federated accuracy 0.3000" in line and "5/5 replies" in line
    assert "personalised accuracy 0.7000" in line
    assert "epsilon 3.000" in line
    assert "| 2.0 s |" in line and "total 12.0 s" in line
    assert line.endswith("ETA 48.0 s")  # 12 s / 2 rounds * 8 rounds left
    # With the rounds' own times the first (start-up) round does not inflate the estimate.
    assert format_round_line(entry, 10, 12.0, round_times=[10.0, 2.0]).endswith("ETA 16.0 s")


def test_round_line_without_dp_initial_and_last_round() -> None:
    metrics = _metrics(4)
    assert "epsilon" not in format_round_line(metrics["rounds"][1], 4, 10.0)
    assert format_round_line(metrics["rounds"][0], 4, 0.0) == (
        "[round 0/4] initial model | central accuracy 0.1000 loss 2.3000"
    )
    assert "ETA" not in format_round_line(metrics["rounds"][4], 4, 16.0)
    assert estimate_remaining_s(0, 4, 0.0) is None
    assert format_duration(65) == "1m 05s" and format_duration(7500) == "2h 05m"


def test_summary_names_best_and_final_accuracy_time_epsilon_and_files(tmp_path: Path) -> None:
    (tmp_path / "model.keras").write_bytes(b"")
    text = format_summary(_metrics(4, dp=True), tmp_path)
    assert f"Run {tmp_path.name} (dp-fedavg, dataset digits): 4/4 rounds" in text
    assert "best central accuracy  0.7000 (round 4)" in text
    assert "final central accuracy 0.7000, loss 0.5500 (round 4)" in text
    assert "total time 16.0 s" in text
    assert "final epsilon 6 (PLD 4.8) at delta 1e-05" in text
    assert "model.keras" in text and "metrics.json" not in text  # only files that exist
    assert "epsilon" not in format_summary(_metrics(2), tmp_path)
    assert "voided" not in text
    secure = _metrics(3)
    secure["rounds"][2]["secagg-voided"] = 1.0
    secure["rounds"][3]["secagg-voided"] = 0.0
    assert "1 round(s) voided by secure aggregation (too few survivors; the model kept): 2" in (
        format_summary(secure, tmp_path))


# --------------------------------------------------------------------- plots
def test_plots_of_a_dp_run(tmp_path: Path) -> None:
    paths = plot_run(_metrics(4, dp=True), tmp_path / "plots")
    assert [p.name for p in paths] == ["accuracy.png", "loss.png", "privacy.png", "clipping.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000


def test_plots_without_dp_skip_the_privacy_plots_and_tolerate_gaps(tmp_path: Path) -> None:
    metrics = _metrics(3)
    metrics["rounds"][2]["federated-accuracy"] = None  # NaN written as null
    for entry in metrics["rounds"][1:]:  # duplicates of federated: not drawn twice
        entry["global-accuracy"] = entry["personalized-accuracy"] = entry["federated-accuracy"]
    assert [p.name for p in plot_run(metrics, tmp_path)] == ["accuracy.png", "loss.png"]
    labels = [label for label, _ in distinct_series(metrics["rounds"], ACCURACY_SERIES)]
    assert [label.split()[0] for label in labels] == ["central", "federated"]
    assert plot_run({"config": {}, "rounds": []}, tmp_path / "empty") == []


# -------------------------------------------------------------------- report
def test_report_prints_summaries_a_comparison_and_redraws_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dp_run = _run_dir(tmp_path, "run-dp", _metrics(4, dp=True))
    plain = _run_dir(tmp_path, "run-plain", _metrics(3))
    assert main([str(dp_run), str(plain), "--compare-plot", str(tmp_path / "cmp.png")]) == 0
    out = capsys.readouterr().out
    assert "Run run-dp (dp-fedavg" in out and "Run run-plain (fedavg" in out
    table = out[out.index("run   ") :].splitlines()
    assert table[0].split()[:3] == ["run", "strategy", "dataset"]
    assert table[2].split()[:4] == ["run-dp", "dp-fedavg", "digits", "4/4"]
    assert table[2].split()[-3] == "6" and table[3].split()[-3] == "-"  # epsilon, time "16.0 s"
    assert sorted(p.name for p in (dp_run / "plots").iterdir()) == [
        "accuracy.png",
        "clipping.png",
        "loss.png",
        "privacy.png",
    ]
    assert (tmp_path / "cmp.png").read_bytes()[:8] == PNG_SIGNATURE


def test_report_on_an_output_dir_and_without_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_dir(tmp_path, "1", _metrics(2))
    _run_dir(tmp_path, "2", _metrics(2, dp=True))
    assert main([str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "Run 1 (fedavg" in out and "Run 2 (dp-fedavg" in out
    assert not (tmp_path / "1" / "plots").exists()


def test_report_on_a_folder_without_metrics_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "app.report", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 2
    assert f"error: {tmp_path / 'empty'} has no metrics.json: not a run folder" in result.stderr


@pytest.mark.parametrize("num_clients", [10, 1000])
def test_label_distribution_plot_stays_a_readable_size_for_a_thousand_clients(
    tmp_path: Path, num_clients: int
) -> None:
    """Bars for a few clients, a heatmap for many: 1,000 bars made a 38,000-pixel PNG in 15 s."""
    from types import SimpleNamespace

    import numpy as np
    from matplotlib import image

    from app.data_report import plot_label_distribution

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=60 * num_clients)
    parts = np.array_split(rng.permutation(len(labels)), num_clients)
    federation = SimpleNamespace(
        train=SimpleNamespace(y=labels, num_classes=10, group_names=None, name="test"),
        partitions=parts,
    )
    path = plot_label_distribution(federation, tmp_path / "labels.png")
    height, width = image.imread(path).shape[:2]
    assert width <= 1200 and height <= 500
