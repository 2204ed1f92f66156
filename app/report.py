"""Summarise, plot and compare finished (or killed) runs from their ``metrics.json``.

Usage::

    python -m app.report RUN_DIR [RUN_DIR ...] [--no-plots] [--compare-plot FILE] [--tensorboard]

For each run folder: prints its summary (best and final accuracy, time,
epsilon, files) and redraws its plots into ``<run_dir>/plots/``. With several
runs, a comparison table follows (one row per run). A folder without
``metrics.json`` whose sub-folders are runs (an ``output-dir``) stands for all
of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .progress import format_duration, format_summary, run_summary

PLOTS_DIR = "plots"
METRICS_FILE = "metrics.json"


class ReportError(Exception):
    """A folder that is not a run folder, or a ``metrics.json`` that cannot be read."""


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """``<run_dir>/metrics.json``, checked to have ``rounds``.

    Raises
    ------
    ReportError
        If the file is missing, not JSON, or has no ``rounds`` list.
    """
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"{run_dir} has no {METRICS_FILE}: not a run folder")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(metrics, dict) or not isinstance(metrics.get("rounds"), list):
        raise ReportError(f"{path} has no 'rounds' list")
    return metrics


def expand_run_dirs(paths: Sequence[Path]) -> list[Path]:
    """Run folders named by ``paths``: a folder with ``metrics.json``, or every
    sub-folder with one (for an ``output-dir``), sorted by name.

    Raises
    ------
    ReportError
        For a path that is neither.
    """
    runs: list[Path] = []
    for path in paths:
        if (path / METRICS_FILE).is_file():
            runs.append(path)
            continue
        children = (
            sorted(p for p in path.iterdir() if (p / METRICS_FILE).is_file())
            if path.is_dir()
            else []
        )
        if not children:
            what = "does not exist" if not path.exists() else f"has no {METRICS_FILE}"
            raise ReportError(f"{path} {what}: not a run folder (nor a folder of runs)")
        runs.extend(children)
    return runs


def _cell(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def comparison_rows(runs: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Header and one row per run for :func:`format_table`."""
    header = [
        "run",
        "strategy",
        "dataset",
        "rounds",
        "best acc (round)",
        "final acc",
        "final loss",
        "epsilon",
        "time",
    ]
    rows = [header]
    for name, metrics in runs.items():
        s = run_summary(metrics)
        planned = "?" if s["num-rounds"] is None else s["num-rounds"]
        best = (
            "-" if s["best-accuracy"] is None else f"{s['best-accuracy']:.4f} ({s['best-round']})"
        )
        rows.append(
            [
                name,
                str(s["strategy"]),
                _cell(s["dataset"]),
                f"{s['rounds-done']}/{planned}",
                best,
                _cell(s["final-accuracy"]),
                _cell(s["final-loss"]),
                _cell(s["epsilon"], ".4g"),
                format_duration(s["total-s"]),
            ]
        )
    return rows


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows as a plain-text table with aligned columns and a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m app.report``."""
    parser = argparse.ArgumentParser(
        prog="python -m app.report",
        description="Summarise runs, redraw their plots, and compare several in one table.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="a run folder (holding metrics.json), or an output-dir of run folders",
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="only print; do not redraw <run_dir>/plots/"
    )
    parser.add_argument(
        "--compare-plot",
        type=Path,
        metavar="FILE",
        help="also draw every run's central accuracy per round into this PNG",
    )
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="rewrite each run's TensorBoard events from metrics.json (for runs made without)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the report; return the exit status (0 ok, 2 bad arguments or folders)."""
    args = build_parser().parse_args(argv)
    try:
        run_dirs = expand_run_dirs(args.runs)
        runs = {run_dir: read_metrics(run_dir) for run_dir in run_dirs}
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for run_dir, metrics in runs.items():
        if not args.no_plots:
            from .plots import plot_run  # pylint: disable=import-outside-toplevel

            plot_run(metrics, run_dir / PLOTS_DIR)
        if args.tensorboard:
            from .tensorboard_log import TensorBoardLog  # pylint: disable=import-outside-toplevel

            TensorBoardLog.rebuild(run_dir, metrics["rounds"]).close()
        print(format_summary(metrics, run_dir))
        print()
    named = dict(zip(_unique_names(list(runs)), runs.values(), strict=True))
    if len(runs) > 1:
        print(format_table(comparison_rows(named)))
    if args.compare_plot is not None:
        from .plots import plot_comparison  # pylint: disable=import-outside-toplevel

        written = plot_comparison(named, args.compare_plot)
        print(f"comparison plot: {written}" if written else "comparison plot: no accuracy to draw")
    return 0


def _unique_names(run_dirs: Sequence[Path]) -> list[str]:
    """Folder names, or ``parent/name`` where two runs share a name."""
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


if __name__ == "__main__":
    sys.exit(main())
