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
through ``json`` (128-bit generator states as exact integers). ``state.json``
is standard JSON: a non-finite float in the strategy state (the epsilon of a
run without noise in its privacy history) is written as
``{"non-finite-float": "inf"}`` (``"-inf"``, ``"nan"``) and read back as the
float; the ``metrics-entry`` is written as ``metrics.json`` writes it (``"inf"``,
``null`` for NaN: :func:`app.run_outputs.json_value`). Checkpoints written
before this used Python's ``Infinity``, which still loads. Every file is
checked against the manifest (size and SHA-256) before it is parsed.

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
from logging import DEBUG, ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np

from flwr.common.logger import log

from data.tabular_file import DEFAULT_MAX_CLASSES
from privacy import accounting
from strategies import sampling

from .run_outputs import INFINITY, json_value, write_json_atomically

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
#: Keys added to the run config after checkpoints were first written, with the
#: value that a checkpoint lacking the key ran with (so such a run still resumes).
ADDED_CONFIG_KEYS: dict[str, Any] = {"max-classes": DEFAULT_MAX_CLASSES}
#: The run's history, rewritten after every round (:class:`app.run_outputs.MetricsLog`).
METRICS_FILE = "metrics.json"


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
    """Standard JSON (no ``Infinity``/``NaN``: see :func:`_encode_floats`), fsynced."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_encode_floats(content), handle, indent=2, allow_nan=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


#: The one key of the object ``state.json`` writes a non-finite float as.
NON_FINITE_FLOAT = "non-finite-float"


def _encode_floats(value: Any) -> Any:
    """``value`` with every non-finite float as ``{NON_FINITE_FLOAT: "inf"|"-inf"|"nan"}``."""
    if isinstance(value, float) and not math.isfinite(value):
        return {NON_FINITE_FLOAT: "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, Mapping):
        return {key: _encode_floats(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_floats(item) for item in value]
    return value


def _decode_floats(obj: dict[str, Any]) -> Any:
    """``json.loads`` object hook undoing :func:`_encode_floats`."""
    if len(obj) == 1 and obj.get(NON_FINITE_FLOAT) in ("inf", "-inf", "nan"):
        return float(obj[NON_FINITE_FLOAT])
    return obj


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
    log(DEBUG, "Checkpoint of round %d saved: %s", server_round, final)
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
            content = json.loads(
                (path / STATE_FILE).read_text(encoding="utf-8"), object_hook=_decode_floats
            )
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

    An infinite epsilon (``noise-multiplier = 0``) is written as ``"inf"``.
    """
    path = run_dir / LEDGER_FILE
    state = dict(ledger.state_dict())
    if state.get("epsilon") is None and math.isinf(ledger.epsilon):
        # PrivacyLedger.state_dict writes an infinite epsilon as None; here, as
        # in metrics.json, it is "inf" (no noise: no privacy), not "unknown".
        state["epsilon"] = INFINITY
    write_json_atomically(path, json_value({"round": server_round, **state}))
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
    saved = {**{k: v for k, v in ADDED_CONFIG_KEYS.items() if k in current}, **saved}
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
    checkpoint = load_run_checkpoint(run_dir, config, strict=strict)
    return checkpoint, restore_run(run_dir, strategy, checkpoint, metrics_rounds)


def load_run_checkpoint(
    run_dir: Path, config: Mapping[str, Any], *, strict: bool = False
) -> Checkpoint:
    """The newest good checkpoint of ``run_dir``, checked to fit ``config``; reads only.

    Raises
    ------
    CheckpointError
        No usable checkpoint, one not written by :func:`save_run_checkpoint`,
        or a changed config (:func:`check_resume_config`).
    """
    checkpoint = load_latest_checkpoint(run_dir, strict=strict)
    saved = checkpoint.state
    if "config" not in saved or "strategy" not in saved:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was not written by save_run_checkpoint"
        )
    check_resume_config(saved["config"], config)
    return checkpoint


def restore_run(
    run_dir: Path,
    strategy: Any,
    checkpoint: Checkpoint,
    metrics_rounds: Iterable[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """Restore ``strategy`` from ``checkpoint``; the ``metrics.json`` entries to keep.

    See :func:`resume_run`. Reads ``privacy-ledger.json``; writes nothing.
    """
    metrics_rounds = [dict(e) for e in metrics_rounds]
    saved = checkpoint.state
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
    return kept


# ------------------------------------------------- metrics.json on resume
def read_metrics_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The ``rounds`` of ``<run_dir>/metrics.json``, each checked to be an entry with a round.

    Raises
    ------
    FileNotFoundError
        If there is no ``metrics.json``.
    CheckpointError
        Naming the file and what is wrong with it (not UTF-8, not valid JSON
        (e.g. truncated), no ``rounds`` list, an entry without an integer ``round``).
    """
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON (truncated?): {error}") from error
    rounds = content.get("rounds") if isinstance(content, dict) else None
    if not isinstance(rounds, list):
        raise CheckpointError(f"{path} has no 'rounds' list")
    for index, entry in enumerate(rounds):
        number = entry.get("round") if isinstance(entry, dict) else None
        if isinstance(number, bool) or not isinstance(number, int):
            raise CheckpointError(
                f"{path}: rounds[{index}] is not a round's entry (no integer 'round')"
            )
    return [dict(entry) for entry in rounds]


def checkpoint_metrics_entries(run_dir: Path, up_to: int) -> dict[int, dict[str, Any]]:
    """The ``metrics-entry`` of each verified checkpoint of a round ``<= up_to``, by round.

    Damaged checkpoints are left out (:func:`load_latest_checkpoint` has
    already logged them).
    """
    entries: dict[int, dict[str, Any]] = {}
    for server_round, path in list_checkpoints(run_dir):
        if server_round > up_to:
            continue
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError:
            continue
        entry = checkpoint.state.get("metrics-entry")
        if isinstance(entry, dict):
            entries[checkpoint.round] = dict(entry)
    return entries


def _round_list(rounds: Iterable[int]) -> str:
    return ", ".join(str(r) for r in sorted(rounds)) or "none"


@dataclass(frozen=True)
class ResumePlan:
    """What :func:`plan_resume` found: where to continue from and what history to keep.

    Attributes
    ----------
    checkpoint : Checkpoint
        The checkpoint to continue from (round ``checkpoint.round + 1`` next).
    kept : list of dict
        The ``metrics.json`` entries the resumed run starts with.
    damaged_metrics : Path or None
        ``metrics.json`` when it was unreadable and the history was rebuilt
        from the checkpoints: move it aside (:func:`set_aside_damaged_metrics`)
        before the new one is written.
    """

    checkpoint: Checkpoint
    kept: list[dict[str, Any]]
    damaged_metrics: Path | None = None


def plan_resume(
    run_dir: Path, strategy: Any, config: Mapping[str, Any], *, strict: bool = False
) -> ResumePlan:
    """Everything a resume checks, from the run folder alone; writes nothing.

    Loads and verifies the newest good checkpoint, checks the run config
    against it, reads ``metrics.json`` and restores ``strategy`` (in memory).

    When ``metrics.json`` is unreadable (truncated, not JSON, no ``rounds``)
    or missing, the history is rebuilt from the checkpoints' ``metrics-entry``
    (each checkpoint holds its own round's; :data:`KEEP` are kept):

    * the checkpoints hold every round ``0..k``: resumed with a WARNING
      saying so (an unreadable file is then moved aside, see
      :attr:`ResumePlan.damaged_metrics`);
    * they do not, and ``metrics.json`` is unreadable: refused, naming the
      file, the rounds the checkpoints hold and what to do (restore the file,
      or move it away to continue with a partial history);
    * they do not, and ``metrics.json`` is missing (moved away on purpose):
      resumed with a WARNING naming the rounds missing from the history.

    Raises
    ------
    CheckpointError
        Naming the file or checkpoint at fault and what to do.
    """
    metrics_path = run_dir / METRICS_FILE
    try:
        rounds: list[dict[str, Any]] | None = read_metrics_rounds(run_dir)
        problem = None
    except FileNotFoundError:
        rounds, problem = None, "missing"
    except CheckpointError as error:
        rounds, problem = None, str(error)
    if rounds is None and not list_checkpoints(run_dir):
        if problem == "missing":
            raise CheckpointError(
                f"{run_dir} holds neither {METRICS_FILE} nor {CHECKPOINTS_DIR}/: not the "
                "folder of an earlier run; name one (<output-dir>/<run id>)"
            )
        raise CheckpointError(
            f"{problem}; and {checkpoints_root(run_dir)} holds no checkpoint to rebuild "
            "the history from: nothing to resume from"
        )
    checkpoint = load_run_checkpoint(run_dir, config, strict=strict)
    damaged = None
    if rounds is None:
        entries = checkpoint_metrics_entries(run_dir, checkpoint.round)
        missing = sorted(set(range(checkpoint.round + 1)) - set(entries))
        held = _round_list(entries)
        if missing and problem != "missing":
            raise CheckpointError(
                f"{problem}; the checkpoints in {checkpoints_root(run_dir)} hold the "
                f"entries of rounds {held} only, not of rounds {_round_list(missing)}, so "
                "the history cannot be rebuilt. Restore metrics.json from a backup, or, to "
                f"continue with the history of rounds {held} only, move it away (mv "
                f"{metrics_path} {metrics_path}.damaged) and resume again"
            )
        rounds = [entries[r] for r in sorted(entries)]
        log(
            WARNING,
            "%s; the history of rounds %s is rebuilt from the checkpoints' metrics entries%s",
            f"{metrics_path} is missing" if problem == "missing" else problem,
            held,
            f" (rounds {_round_list(missing)} are lost from it)" if missing else "",
        )
        damaged = None if problem == "missing" else metrics_path
    kept = restore_run(run_dir, strategy, checkpoint, rounds)
    return ResumePlan(checkpoint=checkpoint, kept=kept, damaged_metrics=damaged)


def set_aside_damaged_metrics(path: Path) -> Path:
    """Rename an unreadable ``metrics.json`` to ``metrics.json.damaged[-N]``; the new name."""
    target = path.with_name(f"{path.name}.damaged")
    suffix = 0
    while target.exists():
        suffix += 1
        target = path.with_name(f"{path.name}.damaged-{suffix}")
    os.replace(path, target)
    log(WARNING, "The unreadable %s is kept as %s", path, target)
    return target


def _json_safe_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics entry as ``metrics.json`` writes it (NaN ``None``, infinity ``"inf"``)."""
    return json_value(dict(entry))
