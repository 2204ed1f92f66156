"""What a user watching a run reads: one line per round and a summary at the end.

Pure functions of ``metrics.json`` entries (kebab-case keys, ``None`` for a
missing value), so the same text comes from a live run and from
``python -m app.report`` on a finished one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Files (and folders) of a run folder named in the summary when they exist.
RUN_FILES: tuple[str, ...] = (
    "metrics.json",
    "model.keras",
    "label-distribution.png",
    "plots",
    "tensorboard",
    "checkpoints",
)


def number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (missing, null, NaN, inf, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def privacy_number(value: Any) -> float | None:
    """An epsilon as a float, infinity included, or ``None`` (missing, null, NaN, not a number).

    A run without noise spends an infinite epsilon; ``metrics.json`` writes it
    as the string ``"inf"`` (:func:`app.run_outputs.json_value`), a live
    entry holds ``float("inf")``. Both come back as ``math.inf``, which
    formats as ``inf``.
    """
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def format_duration(seconds: float | None) -> str:
    """``4.6 s``, ``1m 05s``, ``2h 03m``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _fmt(value: Any, digits: int = 4) -> str:
    value = number(value)
    return "-" if value is None else f"{value:.{digits}f}"


def estimate_remaining_s(
    rounds_done: int,
    num_rounds: int,
    elapsed_total: float,
    round_times: Sequence[float] | None = None,
) -> float | None:
    """Seconds the rounds left will take, from the mean round time so far.

    Parameters
    ----------
    rounds_done : int
        Training rounds completed (round 0, the initial evaluation, is not one).
    num_rounds : int
        Rounds the run will have.
    elapsed_total : float
        Seconds the completed rounds took together.
    round_times : sequence of float, optional
        The completed rounds' own durations. When given and more than one is
        known, the first round is left out of the mean: it includes starting
        the clients (often several times a later round) and would inflate
        the estimate for the whole run.

    Returns
    -------
    float or None
        ``None`` before the first round (nothing to estimate from); 0 after the last.
    """
    if rounds_done <= 0:
        return None
    left = max(num_rounds - rounds_done, 0)
    if left == 0:
        return 0.0
    times = [t for t in (round_times or []) if number(t) is not None]
    if len(times) > 1:
        mean = sum(times[1:]) / (len(times) - 1)
    else:
        mean = elapsed_total / rounds_done
    return mean * left


def format_round_line(
    entry: Mapping[str, Any],
    num_rounds: int,
    elapsed_total: float,
    round_times: Sequence[float] | None = None,
) -> str:
    """One progress line for a round's ``metrics.json`` entry.

    Parameters
    ----------
    entry : mapping
        The round's entry (``round``, ``train-loss``, ``central-accuracy``,
        ``central-loss``, ``federated-accuracy``, ``num-accepted``,
        ``num-sampled``, ``elapsed-s``, and ``epsilon`` under DP; any missing).
    num_rounds : int
        Rounds the run will have.
    elapsed_total : float
        Seconds all training rounds so far took together (this one included).
    round_times : sequence of float, optional
        Durations of the rounds so far, for a steadier estimate of the time
        left (see :func:`estimate_remaining_s`).

    Returns
    -------
    str
        E.g. ``[round 3/10] train-loss 0.2100 | central accuracy 0.9100 loss
        0.3000 | federated accuracy 0.9000 | 5/5 replies | epsilon 1.234 |
        4.6 s | total 14.0 s | ETA 32.2 s``. Round 0 (the initial model) shows
        only its central evaluation.
    """
    server_round = int(entry.get("round", 0))
    central = (
        f"central accuracy {_fmt(entry.get('central-accuracy'))} "
        f"loss {_fmt(entry.get('central-loss'))}"
    )
    if server_round == 0:
        return f"[round 0/{num_rounds}] initial model | {central}"
    parts = [f"[round {server_round}/{num_rounds}] train-loss {_fmt(entry.get('train-loss'))}"]
    if number(entry.get("not-private")):
        # An infinite epsilon means no noise at all (noise-multiplier 0); a
        # finite one, noise that insecure-dp-seed makes replayable.
        noiseless = privacy_number(entry.get("epsilon")) == math.inf
        parts.append(f"NOT PRIVATE ({'no noise' if noiseless else 'insecure-dp-seed'})")
    parts.append(central)
    parts.append(f"federated accuracy {_fmt(entry.get('federated-accuracy'))}")
    personalised = number(entry.get("personalized-accuracy"))
    if personalised is not None and personalised != number(entry.get("federated-accuracy")):
        parts.append(f"personalised accuracy {personalised:.4f}")
    if "num-sampled" in entry:
        parts.append(f"{entry.get('num-accepted', 0)}/{entry.get('num-sampled', 0)} replies")
    if (clients := entry.get("clients")) and isinstance(clients, list):
        parts.append(format_clients(clients))
    if (epsilon := privacy_number(entry.get("epsilon"))) is not None:
        parts.append(f"epsilon {epsilon:.3f}")
    if (sample_epsilon := privacy_number(entry.get("sample-epsilon-max"))) is not None:
        parts.append(f"sample epsilon <= {sample_epsilon:.3f}")
    parts.append(format_duration(number(entry.get("elapsed-s"))))
    remaining = estimate_remaining_s(server_round, num_rounds, elapsed_total, round_times)
    parts.append(f"total {format_duration(elapsed_total)}")
    if remaining is not None and server_round < num_rounds:
        parts.append(f"ETA {format_duration(remaining)}")
    return " | ".join(parts)


def format_clients(clients: list[dict[str, Any]]) -> str:
    """The per-client report in a few words: largest update norm, lowest cosine, exclusions."""
    figures = [c for c in clients if number(c.get("update-norm")) is not None]
    if not figures:
        return "no client figures"
    largest = max(figures, key=lambda c: float(c["update-norm"]))
    lowest = min(figures, key=lambda c: float(c.get("cosine-to-aggregate", 0.0)))
    text = (
        f"max norm {float(largest['update-norm']):.3g} (node {largest.get('node')}), "
        f"min cos {float(lowest.get('cosine-to-aggregate', 0.0)):.2f} (node {lowest.get('node')})"
    )
    off = [str(c.get("node")) for c in figures if c.get("status", "used") != "used"]
    if off:
        text += f", down-weighted {len(off)}: {', '.join(off[:4])}{', ...' if len(off) > 4 else ''}"
    return text


# ---------------------------------------------------------------------- summary
def training_rounds(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The entries of rounds 1, 2, ... (round 0 is the initial model)."""
    return [dict(e) for e in metrics.get("rounds", []) if int(e.get("round", 0)) > 0]


def best_round(metrics: Mapping[str, Any], key: str = "central-accuracy") -> dict[str, Any] | None:
    """The entry with the highest ``key`` (the earliest on ties), or ``None``."""
    best: dict[str, Any] | None = None
    for entry in metrics.get("rounds", []):
        value = number(entry.get(key))
        if value is not None and (best is None or value > number(best.get(key))):  # type: ignore[operator]
            best = dict(entry)
    return best


def run_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of a run that the summary and the comparison table show.

    Returns
    -------
    dict
        ``strategy``, ``dataset``, ``rounds-done``, ``num-rounds``,
        ``best-accuracy``, ``best-round``, ``final-accuracy``, ``final-loss``,
        ``final-federated-accuracy``, ``final-personalized-accuracy``, ``final-round``, ``total-s``,
        ``epsilon``, ``epsilon-pld``, ``delta``, ``sample-epsilon-max``,
        ``sample-delta`` (``None`` where unknown; an epsilon may be ``math.inf``:
        a run without noise).
    """
    config = metrics.get("config", {}) or {}
    rounds = list(metrics.get("rounds", []))
    trained = training_rounds(metrics)
    final = rounds[-1] if rounds else {}
    best = best_round(metrics)
    dp = [e for e in trained if privacy_number(e.get("epsilon")) is not None]
    sample_dp = [e for e in trained if privacy_number(e.get("sample-epsilon-max")) is not None]
    times = [number(e.get("elapsed-s")) for e in trained]
    known_times = [t for t in times if t is not None]
    return {
        "strategy": config.get("strategy", "fedavg"),
        "dataset": config.get("dataset"),
        "rounds-done": len(trained),
        "num-rounds": config.get("num-server-rounds"),
        "best-accuracy": number(best.get("central-accuracy")) if best else None,
        "best-round": int(best["round"]) if best else None,
        "final-accuracy": number(final.get("central-accuracy")),
        "final-loss": number(final.get("central-loss")),
        "final-federated-accuracy": number(final.get("federated-accuracy")),
        "final-personalized-accuracy": number(final.get("personalized-accuracy")),
        "final-round": int(final.get("round", 0)) if final else None,
        "total-s": sum(known_times) if known_times else None,
        "epsilon": privacy_number(dp[-1].get("epsilon")) if dp else None,
        "epsilon-pld": privacy_number(dp[-1].get("epsilon-pld")) if dp else None,
        "delta": number(dp[-1].get("delta")) if dp else None,
        "sample-epsilon-max": (
            privacy_number(sample_dp[-1].get("sample-epsilon-max")) if sample_dp else None
        ),
        "sample-delta": number(config.get("target-sample-delta")) if sample_dp else None,
    }


def run_files(run_dir: Path) -> list[Path]:
    """The run's output files and folders that exist, in a fixed order."""
    return [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]


def format_summary(metrics: Mapping[str, Any], run_dir: Path, total_s: float | None = None) -> str:
    """The end-of-run summary: accuracy, time, privacy spent, where the files are.

    Parameters
    ----------
    metrics : mapping
        The content of ``metrics.json`` (``config`` and ``rounds``).
    run_dir : Path
        The run folder (its existing files are listed).
    total_s : float, optional
        Wall-clock seconds of the whole run; defaults to the sum of the
        rounds' ``elapsed-s``.

    Returns
    -------
    str
        Several lines, the first naming the run.
    """
    s = run_summary(metrics)
    planned = "?" if s["num-rounds"] is None else s["num-rounds"]
    dataset = f", dataset {s['dataset']}" if s["dataset"] else ""
    lines = [f"Run {run_dir.name} ({s['strategy']}{dataset}): {s['rounds-done']}/{planned} rounds"]
    if (metrics.get("privacy") or {}).get("private") is False or any(
        number(e.get("not-private")) for e in metrics.get("rounds", [])
    ):
        config = metrics.get("config") or {}
        if number(config.get("noise-multiplier")) == 0 and not number(
            config.get("local-dp-epsilon")
        ):
            lines.append("  NOT PRIVATE: noise-multiplier = 0 adds no noise (epsilon inf)")
        else:
            lines.append(
                "  NOT PRIVATE: the DP noise came from insecure-dp-seed and can be replayed; "
                "the epsilon below does not hold"
            )
    if s["best-accuracy"] is not None:
        lines.append(f"  best central accuracy  {s['best-accuracy']:.4f} (round {s['best-round']})")
    if s["final-round"] is not None:
        lines.append(
            f"  final central accuracy {_fmt(s['final-accuracy'])}, loss "
            f"{_fmt(s['final-loss'])} (round {s['final-round']})"
        )
    if s["final-federated-accuracy"] is not None:
        lines.append(f"  final federated accuracy {s['final-federated-accuracy']:.4f}")
    personalised = s["final-personalized-accuracy"]
    if personalised is not None and personalised != s["final-federated-accuracy"]:
        lines.append(f"  final personalised accuracy {personalised:.4f}")
    voided = [int(e["round"]) for e in metrics.get("rounds", []) if number(e.get("secagg-voided"))]
    if voided:
        lines.append(
            f"  {len(voided)} round(s) voided by secure aggregation (too few survivors; the "
            f"model kept): {', '.join(map(str, voided))}"
        )
    total = total_s if total_s is not None else s["total-s"]
    lines.append(f"  total time {format_duration(total)}")
    if s["epsilon"] is not None:
        pld = f" (PLD {s['epsilon-pld']:.4g})" if s["epsilon-pld"] is not None else ""
        delta = f" at delta {s['delta']:.3g}" if s["delta"] is not None else ""
        none = ": no privacy guarantee" if math.isinf(s["epsilon"]) else ""
        lines.append(f"  final epsilon {s['epsilon']:.4g}{pld}{delta} (user-level){none}")
    if s["sample-epsilon-max"] is not None:
        delta = f" at delta {s['sample-delta']:.3g}" if s["sample-delta"] is not None else ""
        lines.append(
            f"  sample-level epsilon <= {s['sample-epsilon-max']:.4g}{delta} "
            "(DP-SGD, worst client)"
        )
    names = ", ".join(f"{p.name}{'/' if p.is_dir() else ''}" for p in run_files(run_dir))
    lines.append(f"  files in {run_dir}: {names}")
    return "\n".join(lines)
