"""A run's curves as PNG files, from its ``metrics.json``.

``plot_run`` draws what the metrics hold and skips the rest:

* ``accuracy.png``: accuracy against round (central, federated, personalised, global);
* ``loss.png``: loss against round (central, federated, client training);
* ``privacy.png`` (DP runs): central accuracy against the cumulative epsilon spent;
* ``clipping.png`` (DP runs): the clipping norm and the clipped fraction over rounds.

Uses matplotlib's Agg backend (no display needed) and closes every figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import INFO
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
from matplotlib.figure import Figure  # noqa: E402  pylint: disable=wrong-import-position

from flwr.common.logger import log  # noqa: E402  pylint: disable=wrong-import-position

from .progress import number  # noqa: E402  pylint: disable=wrong-import-position

Series = tuple[list[float], list[float]]

# A series equal to one drawn before it (``global-accuracy`` is the federated
# accuracy; ``personalized-*`` equals ``federated-*`` when no layer is private)
# is not drawn again.
ACCURACY_SERIES: tuple[tuple[str, str], ...] = (
    ("central-accuracy", "central (global model, server test set)"),
    ("federated-accuracy", "federated (global model, clients' validation data)"),
    ("global-accuracy", "global model on clients' validation data"),
    ("personalized-accuracy", "personalised (with each client's private layers)"),
)
LOSS_SERIES: tuple[tuple[str, str], ...] = (
    ("central-loss", "central (global model, server test set)"),
    ("federated-loss", "federated (global model, clients' validation data)"),
    ("personalized-loss", "personalised (with each client's private layers)"),
    ("train-loss", "client training (last local epoch)"),
)
DPI = 120


def series(rounds: Sequence[Mapping[str, Any]], key: str) -> Series:
    """Rounds and values of ``key`` where the value is a finite number."""
    xs: list[float] = []
    ys: list[float] = []
    for entry in rounds:
        value = number(entry.get(key))
        if value is not None:
            xs.append(float(entry.get("round", 0)))
            ys.append(value)
    return xs, ys


def distinct_series(
    rounds: Sequence[Mapping[str, Any]], keys: Sequence[tuple[str, str]]
) -> list[tuple[str, Series]]:
    """``(label, series)`` of each key with data, leaving out a series equal to an earlier one."""
    drawn: list[tuple[str, Series]] = []
    for key, label in keys:
        xs_ys = series(rounds, key)
        if xs_ys[0] and all(xs_ys != other for _, other in drawn):
            drawn.append((label, xs_ys))
    return drawn


def _title(metrics: Mapping[str, Any], what: str) -> str:
    config = metrics.get("config", {}) or {}
    parts = [str(config[k]) for k in ("strategy", "dataset") if config.get(k)]
    return f"{what} ({', '.join(parts)})" if parts else what


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def _line_plot(
    metrics: Mapping[str, Any],
    keys: Sequence[tuple[str, str]],
    ylabel: str,
    title: str,
    path: Path,
    ylim: tuple[float, float] | None = None,
) -> Path | None:
    drawn = distinct_series(list(metrics.get("rounds", [])), keys)
    if not drawn:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in drawn:
        axes.plot(xs, ys, marker="o", markersize=3, label=label)
    axes.set_xlabel("round (0 = initial model)")
    axes.set_ylabel(ylabel)
    axes.set_title(_title(metrics, title))
    axes.xaxis.get_major_locator().set_params(integer=True)
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_accuracy(metrics: Mapping[str, Any], path: Path) -> Path | None:
    """Accuracy against round; ``None`` when the metrics hold no accuracy."""
    return _line_plot(
        metrics,
        ACCURACY_SERIES,
        "accuracy (fraction correct)",
        "Accuracy per round",
        path,
        ylim=(0.0, 1.02),
    )


def plot_loss(metrics: Mapping[str, Any], path: Path) -> Path | None:
    """Loss against round; ``None`` when the metrics hold no loss."""
    return _line_plot(metrics, LOSS_SERIES, "loss (cross-entropy)", "Loss per round", path)


def plot_privacy(metrics: Mapping[str, Any], path: Path) -> Path | None:
    """Central accuracy against cumulative epsilon, each point labelled with its round.

    ``None`` when the run has no ``epsilon`` (not a DP run). Round 0 (the
    initial model, nothing spent) is drawn at epsilon 0.
    """
    rounds = list(metrics.get("rounds", []))
    points = [
        (number(e.get("epsilon")), number(e.get("central-accuracy")), int(e.get("round", 0)))
        for e in rounds
    ]
    points = [(x, y, r) for x, y, r in points if x is not None and y is not None]
    if not points:
        return None
    initial = [e for e in rounds if int(e.get("round", 0)) == 0]
    if initial and (acc := number(initial[0].get("central-accuracy"))) is not None:
        points.insert(0, (0.0, acc, 0))
    delta = next((number(e.get("delta")) for e in reversed(rounds) if "delta" in e), None)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    xs, ys, _ = zip(*points, strict=True)
    axes.plot(xs, ys, marker="o", markersize=4, label="central accuracy (RDP epsilon)")
    pld = [(number(e.get("epsilon-pld")), number(e.get("central-accuracy"))) for e in rounds]
    pld = [(x, y) for x, y in pld if x is not None and y is not None]
    if pld:
        px, py = zip(*pld, strict=True)
        axes.plot(
            px,
            py,
            linestyle="--",
            marker="x",
            markersize=4,
            alpha=0.7,
            label="same rounds, tighter PLD epsilon",
        )
    step = max(1, len(points) // 12)
    for x, y, r in points[::step]:
        axes.annotate(f"r{r}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    delta_text = f", delta = {delta:.3g}" if delta is not None else ""
    axes.set_xlabel(f"cumulative epsilon spent (user-level{delta_text})")
    axes.set_ylabel("central accuracy (fraction correct)")
    axes.set_title(_title(metrics, "Accuracy against privacy spent"))
    axes.set_ylim(0.0, 1.02)
    axes.set_xlim(left=0.0)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return _save(figure, path)


def plot_clipping(metrics: Mapping[str, Any], path: Path) -> Path | None:
    """Clipping norm (top) and clipped fraction (bottom) against round.

    ``None`` when the run has no ``clipping-norm`` (not a DP run). With
    adaptive clipping the target clipped fraction ``1 - target-unclipped-quantile``
    is drawn as a dotted line.
    """
    rounds = list(metrics.get("rounds", []))
    norm = series(rounds, "clipping-norm")
    if not norm[0]:
        return None
    config = metrics.get("config", {}) or {}
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(*norm, marker="o", markersize=3, label="clipping norm C used in the round")
    next_norm = series(rounds, "next-clipping-norm")
    if next_norm[0] and next_norm[1] != norm[1]:
        top.plot(*next_norm, linestyle="--", alpha=0.7, label="C for the next round")
    top.set_ylabel("L2 norm of an update")
    top.set_title(_title(metrics, "Clipping over rounds"))
    top.set_ylim(bottom=0.0)
    top.grid(alpha=0.3)
    top.legend()
    drawn = False
    for key, label, style in (
        ("clipped-fraction", "clipped fraction (exact, server-side diagnostic)", "-"),
        ("clipped-fraction-noised", "clipped fraction (noised, drives C)", "--"),
    ):
        xs, ys = series(rounds, key)
        if xs:
            bottom.plot(xs, ys, linestyle=style, marker="o", markersize=3, label=label)
            drawn = True
    quantile = number(config.get("target-unclipped-quantile"))
    if config.get("clipping") == "adaptive" and quantile is not None:
        bottom.axhline(
            1.0 - quantile,
            color="grey",
            linestyle=":",
            label=f"target clipped fraction {1.0 - quantile:g}",
        )
        drawn = True
    bottom.set_xlabel("round")
    bottom.set_ylabel("fraction of updates clipped")
    bottom.set_ylim(-0.02, 1.02)
    bottom.xaxis.get_major_locator().set_params(integer=True)
    bottom.grid(alpha=0.3)
    if drawn:
        bottom.legend()
    else:
        bottom.text(
            0.5, 0.5, "no clipped fraction recorded", ha="center", transform=bottom.transAxes
        )
    return _save(figure, path)


def plot_run(metrics: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Draw every plot the metrics allow into ``out_dir`` (created if needed).

    Parameters
    ----------
    metrics : mapping
        The content of ``metrics.json`` (``config`` and ``rounds``).
    out_dir : Path
        Where the PNG files go (existing ones are overwritten).

    Returns
    -------
    list of Path
        The files written: ``accuracy.png``, ``loss.png`` and, for DP runs,
        ``privacy.png`` and ``clipping.png``; a plot without data is skipped.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        plot(metrics, out_dir / name)
        for plot, name in (
            (plot_accuracy, "accuracy.png"),
            (plot_loss, "loss.png"),
            (plot_privacy, "privacy.png"),
            (plot_clipping, "clipping.png"),
        )
    ]
    paths = [path for path in written if path is not None]
    log(INFO, "Plots: %s", ", ".join(str(p) for p in paths) or "none (no metrics yet)")
    return paths


def plot_comparison(
    runs: Mapping[str, Mapping[str, Any]], path: Path, key: str = "central-accuracy"
) -> Path | None:
    """``key`` against round for several runs in one figure (legend: run names).

    ``None`` when no run has the series.
    """
    drawn = [(name, series(list(m.get("rounds", [])), key)) for name, m in runs.items()]
    drawn = [(name, s) for name, s in drawn if s[0]]
    if not drawn:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in drawn:
        axes.plot(xs, ys, marker="o", markersize=3, label=_title(runs[name], name))
    axes.set_xlabel("round (0 = initial model)")
    axes.set_ylabel(
        key.replace("-", " ") + (" (fraction correct)" if key.endswith("accuracy") else "")
    )
    axes.set_title(f"{key.replace('-', ' ').capitalize()} per round, {len(drawn)} runs")
    axes.xaxis.get_major_locator().set_params(integer=True)
    if key.endswith("accuracy"):
        axes.set_ylim(0.0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(figure, path)
