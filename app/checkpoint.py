"""Checkpoints after every round, so a killed run resumes without losing a round or privacy.

Layout: ``<run_dir>/checkpoints/round-<k>/`` holds

* ``arrays.npz``: the global shared arrays, one ``.npy`` member per variable path;
* ``strategy-arrays.npz``: the strategy's numpy state (e.g. server-optimiser moments);
* ``state.json``: ``{"format-version", "round", "state"}`` where ``state`` is the
  caller's JSON dict (the strategy's ``state_dict()``: the seeded non-private
  sampler's generator, clipping norm, privacy-ledger events; the run config, ...).
  No privacy-relevant random state is ever in it: DP noise is drawn fresh from
  the OS each round, so a resumed run never replays a released round's noise;
* ``manifest.json``: written last; the SHA-256 and size of each file above, the
  array keys in order and the round.

Writing is atomic: every file goes into a temporary sibling folder
(``.round-<k>.<random>.tmp``), is fsynced, and the folder is renamed to
``round-<k>`` (a crash leaves either the complete checkpoint or none, never
half of one). The last :data:`KEEP` checkpoints are kept.

Loading never unpickles: arrays through ``np.load(allow_pickle=False)``, state
through ``json`` (Python's, which writes an infinite epsilon as ``Infinity``
and 128-bit generator states as exact integers). Every file is checked
against the manifest (size and SHA-256) before it is parsed.

What happens when the newest checkpoint is damaged (truncated, a byte changed,
manifest missing): :func:`load_latest_checkpoint` logs an ERROR naming it and
why, falls back to the previous good one with a WARNING naming both, and says
so in :attr:`Checkpoint.skipped`. With ``strict=True`` it raises
:class:`CheckpointError` instead, naming the damaged checkpoint and the
previous good one to use. It never returns data that failed a check. The
manifest is an integrity check against accidents, not a signature: whoever
can write the run folder can forge it.

Privacy: a round's model leaves the server when it is sent out for federated
evaluation, before the round-end listeners run. Rounds released after the
checkpoint a run resumes from (the newer checkpoint was damaged, or the run
died between releasing round ``k+1`` and checkpointing it) spent privacy that
the checkpoint's ledger does not hold. Two records catch them:
``metrics.json`` (a round it lists after the checkpoint) and the write-ahead
``privacy-ledger.json`` (:func:`write_privacy_ledger`, meant to be written as
soon as a round's event is composed, before the model is released).
:func:`resume_run` charges every such round again, the journal's exact events
first, so epsilon never goes down across a resume. A resumed run that redoes
round ``k+1`` therefore reports a higher epsilon than an uninterrupted one:
the first, lost release of round ``k+1`` did happen, and the redone round
carries fresh, independent noise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np

from flwr.common.logger import log

from privacy import accounting
from strategies import sampling

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
ARRAYS_FILE = "arrays.npz"
STRATEGY_ARRAYS_FILE = "strategy-arrays.npz"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
DATA_FILES = (ARRAYS_FILE, STRATEGY_ARRAYS_FILE, STATE_FILE)
#: Checkpoints kept (the newest ones); one more than one so a damaged newest has a fallback.
KEEP = 2
_ROUND_DIR = re.compile(r"^round-(\d+)$")

#: Run-config keys a resumed run may change; any other change is refused.
RESUMABLE_CONFIG_CHANGES: frozenset[str] = frozenset(
    {"num-server-rounds", "resume", "round-timeout", "node-wait-timeout", "output-dir"}
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or does not fit the run resuming from it."""


@dataclass(frozen=True)
class Checkpoint:
    """One verified checkpoint.

    Attributes
    ----------
    round : int
        The last completed round it holds.
    arrays : dict of str to ndarray
        The global shared arrays, in the order they were saved.
    state : dict
        The caller's JSON state, as given to :func:`save_checkpoint`.
    state_arrays : dict of str to ndarray
        The strategy's numpy state.
    path : Path
        The ``round-<k>`` folder.
    skipped : tuple of (Path, str)
        Newer checkpoints that failed verification, with the reason.
    """

    round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any]
    state_arrays: dict[str, np.ndarray]
    path: Path
    skipped: tuple[tuple[Path, str], ...] = field(default=())


# ----------------------------------------------------------------- low level
def checkpoints_root(run_dir: Path) -> Path:
    """``<run_dir>/checkpoints``."""
    return run_dir / CHECKPOINTS_DIR


def checkpoint_dir(run_dir: Path, server_round: int) -> Path:
    """``<run_dir>/checkpoints/round-<k>``."""
    return checkpoints_root(run_dir) / f"round-{server_round}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(round, folder)`` of every ``round-<k>`` folder, newest (highest round) first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _ROUND_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """An ``.npz`` with one ``<key>.npy`` member per array, no pickled objects; fsynced.

    Unlike ``np.savez`` any key works (``file``, ``dense/kernel``), and an
    object array is refused instead of being pickled.

    Raises
    ------
    ValueError
        If an array has dtype ``object`` or a key is empty.
    """
    with open(path, "wb") as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as archive:
            for key, value in arrays.items():
                array = np.asarray(value)
                if not key:
                    raise ValueError("array keys must be non-empty")
                if array.dtype.hasobject:
                    raise ValueError(f"array {key!r} has dtype object; checkpoints never pickle")
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)
        raw.flush()
        os.fsync(raw.fileno())


def read_arrays(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` in the order of ``keys`` (``np.load(allow_pickle=False)``).

    Raises
    ------
    CheckpointError
        If the file is not a readable ``.npz`` or its keys differ from ``keys``.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            if sorted(npz.files) != sorted(keys):
                raise CheckpointError(
                    f"{path.name} holds arrays {sorted(npz.files)}, "
                    f"the manifest lists {sorted(keys)}"
                )
            return {key: npz[key] for key in keys}
    except CheckpointError:
        raise
    except Exception as error:  # zipfile.BadZipFile, ValueError, OSError, ...
        raise CheckpointError(f"{path.name} is not a readable array file: {error}") from error


def _write_json(path: Path, content: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------- save
def save_checkpoint(
    run_dir: Path,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    state: Mapping[str, Any],
    state_arrays: Mapping[str, np.ndarray] | None = None,
    *,
    keep: int = KEEP,
) -> Path:
    """Write round ``server_round``'s checkpoint atomically; keep the newest ``keep``.

    Parameters
    ----------
    run_dir : Path
        The run folder (``checkpoints/`` is created in it).
    server_round : int
        The round just completed (0: the initial model, before any training).
    arrays : mapping of str to ndarray
        The global shared arrays (e.g. ``to_numpy(report.arrays)``).
    state : mapping
        JSON-serialisable strategy and run state (see :func:`strategy_state`).
    state_arrays : mapping of str to ndarray, optional
        Numpy state of the strategy (server-optimiser moments, ...).
    keep : int (default: 2)
        How many of the newest checkpoints to keep.

    Returns
    -------
    Path
        The ``round-<k>`` folder.

    Raises
    ------
    TypeError, ValueError
        If ``state`` is not JSON-serialisable or an array holds objects;
        nothing is left behind and earlier checkpoints are untouched.
    """
    if server_round < 0:
        raise ValueError(f"round must be >= 0, got {server_round}")
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(root)
    state_arrays = dict(state_arrays or {})
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".round-{server_round}.", suffix=".tmp"))
    try:
        write_arrays(tmp / ARRAYS_FILE, arrays)
        write_arrays(tmp / STRATEGY_ARRAYS_FILE, state_arrays)
        _write_json(
            tmp / STATE_FILE,
            {"format-version": FORMAT_VERSION, "round": server_round, "state": dict(state)},
        )
        manifest = {
            "format-version": FORMAT_VERSION,
            "round": server_round,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "array-keys": list(arrays),
            "state-array-keys": list(state_arrays),
            "files": {
                name: {"sha256": sha256_of(tmp / name), "size": (tmp / name).stat().st_size}
                for name in DATA_FILES
            },
        }
        _write_json(tmp / MANIFEST_FILE, manifest)
        _fsync_dir(tmp)
        final = checkpoint_dir(run_dir, server_round)
        if final.exists():  # a round redone after resuming from an older checkpoint
            old = Path(tempfile.mkdtemp(dir=root, prefix=f".round-{server_round}.", suffix=".old"))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, path in list_checkpoints(run_dir)[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    log(INFO, "Checkpoint of round %d saved: %s", server_round, final)
    return final


def _remove_temporaries(root: Path) -> None:
    """Folders a killed writer left (``.round-*.tmp``/``.old``); one writer per run."""
    for path in root.glob(".round-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- load
def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{MANIFEST_FILE} is missing (incomplete or damaged checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{MANIFEST_FILE} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format-version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{MANIFEST_FILE} has format version "
            f"{manifest.get('format-version') if isinstance(manifest, dict) else None!r}, "
            f"expected {FORMAT_VERSION}"
        )
    for key in ("round", "files", "array-keys", "state-array-keys"):
        if key not in manifest:
            raise CheckpointError(f"{MANIFEST_FILE} lacks {key!r}")
    return manifest


def verify_files(path: Path, manifest: Mapping[str, Any]) -> None:
    """Check every data file's size and SHA-256 against the manifest.

    Raises
    ------
    CheckpointError
        Naming the first file that is missing, truncated or changed.
    """
    files = manifest["files"]
    for name in DATA_FILES:
        expected = files.get(name)
        file_path = path / name
        if expected is None:
            raise CheckpointError(f"{MANIFEST_FILE} does not list {name}")
        if not file_path.is_file():
            raise CheckpointError(f"{name} is missing")
        size = file_path.stat().st_size
        if size != expected.get("size"):
            raise CheckpointError(
                f"{name} has {size} bytes, the manifest says {expected.get('size')} (truncated?)"
            )
        if sha256_of(file_path) != expected.get("sha256"):
            raise CheckpointError(f"{name} does not match its SHA-256 in the manifest (changed)")


def load_checkpoint(path: Path) -> Checkpoint:
    """Verify and read one ``round-<k>`` folder.

    Raises
    ------
    CheckpointError
        If anything is missing, damaged or inconsistent; the message names
        the folder and the reason.
    """
    try:
        manifest = _read_manifest(path)
        verify_files(path, manifest)
        try:
            content = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{STATE_FILE} is not valid JSON: {error}") from error
        server_round = manifest["round"]
        match = _ROUND_DIR.match(path.name)
        if match and int(match.group(1)) != server_round:
            raise CheckpointError(
                f"folder name says round {match.group(1)}, manifest {server_round}"
            )
        if content.get("round") != server_round or not isinstance(content.get("state"), dict):
            raise CheckpointError(f"{STATE_FILE} does not hold round {server_round}'s state")
        arrays = read_arrays(path / ARRAYS_FILE, list(manifest["array-keys"]))
        state_arrays = read_arrays(path / STRATEGY_ARRAYS_FILE, list(manifest["state-array-keys"]))
    except CheckpointError as error:
        raise CheckpointError(f"checkpoint {path} is unusable: {error}") from error
    return Checkpoint(
        round=int(server_round),
        arrays=arrays,
        state=content["state"],
        state_arrays=state_arrays,
        path=path,
    )


def load_latest_checkpoint(run_dir: Path, *, strict: bool = False) -> Checkpoint:
    """The newest checkpoint of ``run_dir`` that passes every check.

    Parameters
    ----------
    run_dir : Path
        The run folder.
    strict : bool (default: False)
        If the newest checkpoint is damaged: ``False`` falls back to the
        previous good one (ERROR log naming the damaged one and why, WARNING
        naming the one used, :attr:`Checkpoint.skipped` listing it);
        ``True`` raises instead, naming both.

    Raises
    ------
    CheckpointError
        If there is no checkpoint, none passes its checks, or (``strict``)
        the newest fails.
    """
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {checkpoints_root(run_dir)}")
    skipped: list[tuple[Path, str]] = []
    for _, path in candidates:
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as error:
            log(ERROR, "%s", error)
            skipped.append((path, str(error)))
            continue
        if skipped:
            bad = ", ".join(str(p) for p, _ in skipped)
            if strict:
                raise CheckpointError(
                    f"newest checkpoint {bad} is damaged ({skipped[0][1]}); the previous good "
                    f"checkpoint is {path} (round {checkpoint.round}): move the damaged one "
                    "away to resume from it"
                )
            log(
                WARNING,
                "Damaged checkpoint %s skipped; resuming from the previous good checkpoint %s "
                "(round %d)",
                bad,
                path,
                checkpoint.round,
            )
        return Checkpoint(
            round=checkpoint.round,
            arrays=checkpoint.arrays,
            state=checkpoint.state,
            state_arrays=checkpoint.state_arrays,
            path=checkpoint.path,
            skipped=tuple(skipped),
        )
    reasons = "; ".join(reason for _, reason in skipped)
    raise CheckpointError(f"no usable checkpoint in {checkpoints_root(run_dir)}: {reasons}")


# ------------------------------------- generators and privacy events (re-exported)
def generator_state(rng: np.random.Generator) -> dict[str, Any]:
    """:func:`strategies.sampling.generator_state` (the seeded, non-private sampler only)."""
    return sampling.generator_state(rng)


def restore_generator(rng: np.random.Generator, state: Mapping[str, Any]) -> None:
    """:func:`strategies.sampling.restore_generator`, raising :class:`CheckpointError`."""
    try:
        sampling.restore_generator(rng, state)
    except ValueError as error:
        raise CheckpointError(str(error)) from error


def generator_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    """:func:`strategies.sampling.generator_from_state`, raising :class:`CheckpointError`."""
    try:
        return sampling.generator_from_state(state)
    except ValueError as error:
        raise CheckpointError(str(error)) from error


def dp_event_to_json(event: Any) -> dict[str, Any]:
    """:func:`privacy.accounting.dp_event_to_json`."""
    return accounting.dp_event_to_json(event)


def dp_event_from_json(data: Mapping[str, Any]) -> Any:
    """:func:`privacy.accounting.dp_event_from_json`, raising :class:`CheckpointError`."""
    try:
        return accounting.dp_event_from_json(data)
    except accounting.LedgerStateError as error:
        raise CheckpointError(str(error)) from error


# ------------------------------------------------------------ strategy state
SERVER_OPTIMIZER_PREFIX = "server-optimizer/"


def split_state_dict(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A flat ``state_dict`` (scalars and arrays) as its JSON part and its array part."""
    scalars: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            arrays[key] = value
        elif isinstance(value, np.generic):
            scalars[key] = value.item()
        else:
            scalars[key] = value
    return scalars, arrays


def strategy_state(strategy: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A strategy's ``state_dict()`` as JSON and arrays (optimiser moments as arrays).

    The state holds no privacy-relevant random state: DP noise and sampling
    draw fresh OS entropy each round (:mod:`privacy.randomness`), so a resumed
    run never replays a released round's noise.

    Returns
    -------
    tuple
        ``(state, state_arrays)`` for :func:`save_checkpoint`.
    """
    state = dict(strategy.state_dict())
    state_arrays: dict[str, np.ndarray] = {}
    if "server-optimizer" in state:
        scalars, arrays = split_state_dict(state["server-optimizer"])
        state["server-optimizer"] = scalars
        state_arrays.update({f"{SERVER_OPTIMIZER_PREFIX}{k}": v for k, v in arrays.items()})
    return state, state_arrays


def restore_strategy_state(
    strategy: Any,
    state: Mapping[str, Any],
    state_arrays: Mapping[str, np.ndarray] | None = None,
    *,
    uncheckpointed_rounds: int = 0,
    released_events: list[dict[str, Any]] | None = None,
) -> None:
    """Put a freshly built strategy back in the state :func:`strategy_state` saved.

    Parameters
    ----------
    strategy : FedAvg or DPFedAvg
        Built from the same run config, no round run yet (its ledger empty).
    state : mapping
        What :func:`strategy_state` returned (``Checkpoint.state["strategy"]``
        when saved by :func:`save_run_checkpoint`).
    state_arrays : mapping of str to ndarray, optional
        :attr:`Checkpoint.state_arrays`.
    uncheckpointed_rounds : int (default: 0)
        Rounds released after this checkpoint that it does not hold (see
        :func:`rounds_after_checkpoint`). Under DP each is charged to the
        ledger again, with a WARNING: their models left the server, so their
        privacy is spent (:meth:`privacy.accounting.PrivacyLedger.charge_released`).
    released_events : list of dict, optional
        The ``events`` of :func:`read_privacy_ledger` (the write-ahead journal).

    Raises
    ------
    CheckpointError
        If the checkpoint is of another strategy, its ledger is of another
        sampling scheme, the strategy's ledger is not empty, the recomputed
        epsilon differs from the saved one, the optimiser state does not fit,
        or rounds need charging and the ledger holds no event to charge them as.
    """
    name = type(strategy).__name__
    if state.get("strategy") != name:
        raise CheckpointError(
            f"checkpoint was written by {state.get('strategy')!r}, this run uses {name}"
        )
    full = dict(state)
    if "server-optimizer" in full:
        arrays = {
            key[len(SERVER_OPTIMIZER_PREFIX) :]: value
            for key, value in (state_arrays or {}).items()
            if key.startswith(SERVER_OPTIMIZER_PREFIX)
        }
        full["server-optimizer"] = {**full["server-optimizer"], **arrays}
    if (getattr(strategy, "server_optimizer", None) is None) != ("server-optimizer" not in full):
        raise CheckpointError(
            "checkpoint and run differ in having a server optimiser "
            f"(checkpoint: {full.get('server-optimizer', {}).get('name')!r}, run: "
            f"{getattr(strategy.server_optimizer, 'name', None)!r})"
        )
    try:
        strategy.load_state_dict(full)
        strategy.aggregator.account_released_rounds(
            uncheckpointed_rounds, released_events or []
        )
    except accounting.LedgerStateError as error:
        raise CheckpointError(str(error)) from error
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"strategy state does not fit: {error}") from error
    if (ledger := getattr(strategy, "ledger", None)) is not None:
        log(INFO, "Privacy ledger restored: %d events, epsilon %.4g", ledger.rounds, ledger.epsilon)


# ------------------------------------------------------- write-ahead ledger
LEDGER_FILE = "privacy-ledger.json"


def write_privacy_ledger(run_dir: Path, server_round: int, ledger: Any) -> Path:
    """Write ``<run_dir>/privacy-ledger.json`` atomically: every event composed so far.

    Call it as soon as a round's event is composed and *before* that round's
    model leaves the server (it is sent out for federated evaluation before
    the round-end listeners run): a run killed in between then still has the
    round's privacy cost on disk, and :func:`resume_run` charges it.
    """
    from .run_outputs import write_json_atomically  # pylint: disable=import-outside-toplevel

    path = run_dir / LEDGER_FILE
    write_json_atomically(
        path,
        {"round": server_round, **ledger.state_dict()},
    )
    return path


def read_privacy_ledger(run_dir: Path) -> dict[str, Any] | None:
    """The write-ahead ledger, or ``None`` if there is none or it is unreadable (WARNING)."""
    path = run_dir / LEDGER_FILE
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(content, dict) or not isinstance(content.get("events"), list):
            raise ValueError("no 'events' list")
    except (UnicodeDecodeError, ValueError) as error:
        log(
            WARNING,
            "%s is unreadable (%s); resuming from the checkpoint's ledger alone",
            path,
            error,
        )
        return None
    return content


# ------------------------------------------------------------------ resuming
def rounds_after_checkpoint(
    metrics_rounds: Iterable[Mapping[str, Any]], checkpoint_round: int
) -> int:
    """How many rounds ``metrics.json`` records after ``checkpoint_round``.

    These rounds were completed (their model was evaluated, so it left the
    server) but the checkpoint does not hold them; pass the count to
    :func:`restore_strategy_state` as ``uncheckpointed_rounds``, and keep
    only the entries up to ``checkpoint_round`` (:func:`rounds_up_to`).
    """
    later = {
        int(e.get("round", 0)) for e in metrics_rounds if int(e.get("round", 0)) > checkpoint_round
    }
    return len(later)


def rounds_up_to(
    metrics_rounds: Iterable[Mapping[str, Any]], checkpoint_round: int
) -> list[dict[str, Any]]:
    """The ``metrics.json`` entries of rounds ``<= checkpoint_round`` (what a resumed run keeps)."""
    return [dict(e) for e in metrics_rounds if int(e.get("round", 0)) <= checkpoint_round]


def check_resume_config(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    allowed: frozenset[str] = RESUMABLE_CONFIG_CHANGES,
) -> None:
    """Refuse to resume with a run config that changes more than ``allowed`` keys.

    Raises
    ------
    CheckpointError
        Naming every key whose value differs, with both values.
    """
    changed = sorted(
        key
        for key in set(saved) | set(current)
        if key not in allowed and saved.get(key) != current.get(key)
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise CheckpointError(
            f"cannot resume with a different run config ({details}); only "
            f"{', '.join(sorted(allowed))} may change"
        )


# ------------------------------------------------------- ServerApp entry points
def save_run_checkpoint(
    run_dir: Path,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    strategy: Any,
    config: Mapping[str, Any],
    entry: Mapping[str, Any] | None = None,
    *,
    keep: int = KEEP,
) -> Path:
    """Checkpoint a round: global arrays, the strategy's state, the run config, the round's entry.

    The state is ``{"config": config, "strategy": strategy_state(strategy)[0],
    "metrics-entry": entry}``. Call from an ``on_round_end`` listener
    (``arrays`` is ``to_numpy(report.arrays)``, ``entry`` the round's
    ``metrics.json`` entry) *before* ``metrics.json`` is appended: a run
    killed between the two then still gets that round's entry back from
    :func:`resume_run`, and no round is redone or charged twice.
    """
    state, state_arrays = strategy_state(strategy)
    return save_checkpoint(
        run_dir,
        server_round,
        arrays,
        {
            "config": dict(config),
            "strategy": state,
            "metrics-entry": None if entry is None else _json_safe_entry(entry),
        },
        state_arrays,
        keep=keep,
    )


def resume_run(
    run_dir: Path,
    strategy: Any,
    config: Mapping[str, Any],
    metrics_rounds: Iterable[Mapping[str, Any]],
    *,
    strict: bool = False,
) -> tuple[Checkpoint, list[dict[str, Any]]]:
    """Load the newest good checkpoint of ``run_dir`` and restore ``strategy`` from it.

    Parameters
    ----------
    run_dir : Path
        The folder of the run to continue.
    strategy : FedAvg or DPFedAvg
        Freshly built from ``config``; gets the checkpoint's generators,
        clipping norm and privacy ledger.
    config : mapping
        The resumed run's config (``RunConfig.as_dict()``); only the keys in
        :data:`RESUMABLE_CONFIG_CHANGES` may differ from the checkpoint's.
    metrics_rounds : iterable of mapping
        ``metrics.json``'s ``rounds`` as the killed run left them.
    strict : bool (default: False)
        See :func:`load_latest_checkpoint`.

    Returns
    -------
    tuple
        The checkpoint (continue with round ``checkpoint.round + 1`` from
        ``checkpoint.arrays``) and the ``metrics.json`` entries to keep:
        rounds up to ``checkpoint.round`` (later ones will be redone), with
        the checkpoint's own round taken from the checkpoint if
        ``metrics.json`` missed it.

    Raises
    ------
    CheckpointError
        No usable checkpoint, a changed config, or a state that does not fit.
    """
    metrics_rounds = [dict(e) for e in metrics_rounds]
    checkpoint = load_latest_checkpoint(run_dir, strict=strict)
    saved = checkpoint.state
    if "config" not in saved or "strategy" not in saved:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was not written by save_run_checkpoint"
        )
    check_resume_config(saved["config"], config)
    lost = rounds_after_checkpoint(metrics_rounds, checkpoint.round)
    journal = read_privacy_ledger(run_dir)
    restore_strategy_state(
        strategy,
        saved["strategy"],
        checkpoint.state_arrays,
        uncheckpointed_rounds=lost,
        released_events=None if journal is None else journal["events"],
    )
    log(
        INFO,
        "Resuming %s from %s: round %d done, continuing with round %d%s",
        run_dir,
        checkpoint.path,
        checkpoint.round,
        checkpoint.round + 1,
        f" ({lost} later round(s) in metrics.json will be redone)" if lost else "",
    )
    kept = rounds_up_to(metrics_rounds, checkpoint.round)
    entry = saved.get("metrics-entry")
    if entry is not None and all(int(e.get("round", -1)) != checkpoint.round for e in kept):
        kept.append(dict(entry))  # killed after the checkpoint, before metrics.json
    return checkpoint, kept


def _json_safe_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics entry with NaN as ``None``, as ``metrics.json`` writes it."""
    return {
        key: None if isinstance(value, float) and math.isnan(value) else value
        for key, value in entry.items()
    }
