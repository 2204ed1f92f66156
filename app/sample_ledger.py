"""A client's sample-level privacy ledger between rounds: in its node state and in its state folder.

Each node keeps one :class:`privacy.sample_accounting.SamplePrivacyState` per run:
in ``Context.state`` (as long as the SuperNode process lives) and, when its
node config names a ``state-dir``, in ``<state-dir>/run-<run-key>/sample-privacy.json``
so a restarted SuperNode goes on from the privacy it already spent instead
of starting again at zero. The run key is the name of the server's run
folder, sent with every train message (``run-key``), so a resumed run (a new
Flower run id) goes on with the same ledger. Ledgers only grow, so of the two copies the one
with more recorded rounds is the current one.

A node with a state folder also keeps a lifetime ledger,
``<state-dir>/sample-privacy-all-runs.json``, that composes every run on that
node: training several runs on the same records spends privacy in each, and
the per-run figure alone would under-state the records' total exposure.
"""

from __future__ import annotations

import math

from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log

from strategies import protocol

from privacy.sample_accounting import (
    STATE_FILE,
    STATE_KEY,
    SampleDPRound,
    SamplePrivacyState,
    newest,
)

from .private_state import STATE_DIR_KEY

LIFETIME_FILE = "sample-privacy-all-runs.json"
METRIC_SAMPLE_EPSILON_ALL_RUNS = protocol.SAMPLE_EPSILON_ALL_RUNS


def reply_metrics(state: SamplePrivacyState, *, exhausted: bool = False) -> dict[str, float | int]:
    """The sample-level metrics a client sends with its train reply (:mod:`strategies.protocol`)."""
    epsilon = state.epsilon
    return {
        protocol.SAMPLE_EPSILON: epsilon if math.isfinite(epsilon) else float("inf"),
        protocol.SAMPLE_DELTA: state.delta,
        protocol.SAMPLE_ROUNDS: state.rounds,
        protocol.SAMPLE_STEPS: state.total_steps,
        protocol.SAMPLE_BUDGET_EXHAUSTED: int(exhausted),
    }


def _state_dir(context: Context) -> Path | None:
    state_dir = str(context.node_config.get(STATE_DIR_KEY, "") or "")
    return Path(state_dir).expanduser() if state_dir else None


def ledger_file(context: Context, run_key: str | None = None) -> Path | None:
    """``<state-dir>/run-<run-key>/sample-privacy.json``, or None without a state folder.

    ``run_key`` names the run across resumes (the server's run folder); the
    Flower run id by default.
    """
    state_dir = _state_dir(context)
    key = run_key or str(context.run_id)
    return None if state_dir is None else state_dir / f"run-{key}" / STATE_FILE


def lifetime_file(context: Context) -> Path | None:
    """``<state-dir>/sample-privacy-all-runs.json``, or None without a state folder."""
    state_dir = _state_dir(context)
    return None if state_dir is None else state_dir / LIFETIME_FILE


def load_ledger(
    context: Context, delta: float, run_key: str | None = None
) -> SamplePrivacyState:
    """This run's ledger: the newer of the node state's and the state folder's copy.

    A new, empty ledger at ``delta`` when the node has neither. A stored
    ledger at another delta is an error: its epsilon would not be comparable.
    """
    in_memory = (
        SamplePrivacyState.from_dict(context.state[STATE_KEY])  # type: ignore[arg-type]
        if STATE_KEY in context.state
        else None
    )
    path = ledger_file(context, run_key)
    on_disk = (
        SamplePrivacyState.load(path, delta=delta) if path is not None and path.exists() else None
    )
    state = newest(in_memory, on_disk)
    if state is None:
        return SamplePrivacyState(delta=delta)
    if state.delta != delta:
        raise ValueError(
            f"the node's sample privacy ledger is at delta {state.delta:g}, the run config "
            f"asks for target-sample-delta {delta:g}; a run cannot change its delta"
        )
    if on_disk is state and in_memory is None and state.rounds:
        log(
            INFO,
            "Node %d: sample privacy ledger restored from %s (%d rounds)",
            context.node_id,
            path,
            state.rounds,
        )
    return state


def record_round(
    context: Context,
    state: SamplePrivacyState,
    spec: SampleDPRound,
    run_key: str | None = None,
    rounds: int = 1,
) -> float | None:
    """Record ``rounds`` trained rounds of ``spec`` in this run's and the lifetime ledger; save both.

    Written before the reply leaves the node: a reply lost afterwards makes
    the ledger over-count, never under-count. Returns the lifetime epsilon
    (None without a state folder).
    """
    for _ in range(rounds):
        state.record(spec)
    context.state[STATE_KEY] = ConfigRecord(state.to_dict())  # type: ignore[arg-type]
    path = ledger_file(context, run_key)
    if path is not None:
        state.save(path)
    lifetime_path = lifetime_file(context)
    if lifetime_path is None:
        return None
    # Kept at the delta of the node's first run (stated in the file): the
    # (epsilon, delta) pair stays a true statement whatever later runs ask for.
    lifetime = SamplePrivacyState.load(lifetime_path, delta=state.delta)
    for _ in range(rounds):
        lifetime.record(spec)
    lifetime.save(lifetime_path)
    return lifetime.epsilon


def assume_spent(
    context: Context, ledger: SamplePrivacyState, spec: SampleDPRound, rounds_before: int,
    run_key: str | None,
) -> None:
    """Count the rounds before a resume as trained when this node has no ledger of them.

    A resumed run continues rounds ``1..rounds_before`` of an earlier one. A
    node that kept its ledger (a ``state-dir``) goes on from it; one that did
    not (a simulation node, a lost folder) cannot know what it spent then, so
    it assumes the worst: that it trained in every one of those rounds with
    this round's settings. That may over-count, never under-count.
    """
    if rounds_before <= 0 or ledger.rounds > 0:
        return
    log(
        WARNING,
        "Node %d: no sample privacy ledger for the %d rounds before this resumed run; "
        "counting them as trained (conservative)",
        context.node_id,
        rounds_before,
    )
    record_round(context, ledger, spec, run_key, rounds=rounds_before)
