"""A run tracked in MLflow (run config ``tracking='mlflow'``).

What goes in:

- the run config as the MLflow run's params (``num-server-rounds``, ``strategy``, ...);
- every numeric value of each round's ``metrics.json`` entry as a metric under
  the same key (``central-accuracy``, ``train-loss``, ``epsilon``,
  ``clipping-norm``, ...) with the round as its step;
- at the end, the files a finished run leaves (``plots/``,
  ``label-distribution.png``, ``model.keras``, ``metrics.json``) as artifacts.

Where it goes: ``MLFLOW_TRACKING_URI`` when that variable is set (a tracking
server, a database, ...); otherwise a store of the run's own, inside the run
folder and needing no server: ``<run_dir>/mlflow/mlflow.db`` (SQLite) with the
artifacts under ``<run_dir>/mlflow/artifacts/``. MLflow 3 refuses its old plain
folder store (``./mlruns``) unless ``MLFLOW_ALLOW_FILE_STORE=true`` is set, and
SQLite needs nothing that Flower does not already install (SQLAlchemy,
alembic). Look at it with the full ``mlflow`` package of the same version as
the ``mlflow-skinny`` that wrote it (a UI of another version refuses the
database's schema): ``uvx --from mlflow==3.17.2 mlflow ui --backend-store-uri
sqlite:///<run_dir>/mlflow/mlflow.db``. Creating the database (MLflow's
schema migrations) takes a few seconds, once per run folder.

Resume: the MLflow run's id is kept in ``<run_dir>/mlflow/run-id``, and a run
resumed from that folder continues the same MLflow run (status back to
RUNNING, rounds continuing at the next step). If the MLflow run already holds
rounds after the checkpoint the run resumes from (the newest checkpoint was
damaged and an older one is used), those rounds are about to be redone: the
log then starts a new MLflow run holding exactly the rounds kept, tagged
``fedprivacy.resumed-from``, as :meth:`TensorBoardLog.rebuild
<app.tensorboard_log.TensorBoardLog.rebuild>` rewrites its event file, so no
step is drawn twice.

MLflow is an optional dependency (``uv sync --extra tracking``); it is only
imported when a :class:`MlflowLog` is made.
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.common.logger import log

from .progress import number

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient

MLFLOW_DIR = "mlflow"
RUN_ID_FILE = "run-id"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
#: The experiment runs go to unless ``MLFLOW_EXPERIMENT_NAME`` names another.
DEFAULT_EXPERIMENT = "fedprivacy"
STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's limits per log_batch call.
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000


MISSING = (
    "MLflow is not installed: install the 'tracking' extra "
    "(uv sync --extra tracking, or pip install 'fedprivacy[tracking]')"
)

#: MLflow's HTTP settings for :func:`check_tracking`'s probe, where not set.
PROBE_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


class TrackingError(RuntimeError):
    """MLflow tracking cannot start (MLflow missing, store unreachable)."""


def check_tracking(tracking_uri: str | None = None) -> None:
    """Raise :class:`TrackingError` if a run could not be tracked; write nothing.

    For the checks before a run writes anything: MLflow must be installed
    (looked up, not imported), and a store named by ``tracking_uri`` or
    ``MLFLOW_TRACKING_URI`` must answer a read. The run folder's own store is
    made with the run, so there is nothing to check for it.

    A tracking server gets one retry and 10 s per request here (MLflow's
    defaults, 7 retries with backoff, take about four minutes to give up on a
    server that is down); ``MLFLOW_HTTP_REQUEST_*`` variables that are set win.
    """
    if importlib.util.find_spec("mlflow") is None:
        raise TrackingError(MISSING)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return
    try:
        with _env_defaults(PROBE_HTTP_SETTINGS):
            _open_client(uri).search_experiments(max_results=1)
    except Exception as error:  # MlflowException, requests' errors, ...
        raise TrackingError(f"MLflow tracking at {uri}: {error}") from error


@contextmanager
def _env_defaults(defaults: Mapping[str, str]) -> Iterator[None]:
    """Set the environment variables in ``defaults`` that are unset, for the block."""
    added = [key for key in defaults if key not in os.environ]
    for key in added:
        os.environ[key] = defaults[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _open_client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient  # pylint: disable=import-outside-toplevel

    with warnings.catch_warnings():
        # MLflow's SQL store trips SQLAlchemy 2.1 deprecation warnings when it opens.
        warnings.simplefilter("ignore", DeprecationWarning)
        return MlflowClient(tracking_uri=uri)


def local_tracking_uri(run_dir: Path) -> str:
    """The SQLite store inside the run folder: ``sqlite:///<run_dir>/mlflow/mlflow.db``."""
    return f"sqlite:///{(run_dir / MLFLOW_DIR / DB_FILE).resolve()}"


def tracking_uri_for(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else :func:`local_tracking_uri`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(run_dir)


def round_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a ``metrics.json`` entry (not ``round``; no null/NaN/inf)."""
    return {
        key: value
        for key, raw in entry.items()
        if key != "round" and (value := number(raw)) is not None
    }


class MlflowLog:
    """One run's config, per-round metrics and final files in MLflow.

    Parameters
    ----------
    run_dir : Path
        The run folder; the MLflow run id is kept in ``<run_dir>/mlflow/run-id``.
    config : Mapping
        The run config (kebab-case keys, as in ``metrics.json``), logged as params.
    kept : iterable of dict, optional
        On resume, the ``metrics.json`` rounds kept: rounds the MLflow run lacks
        are logged, and an MLflow run holding later rounds is replaced (see the
        module docstring).
    tracking_uri : str, optional
        Overrides ``MLFLOW_TRACKING_URI`` and the run folder's own store.
    experiment : str, optional
        Overrides ``MLFLOW_EXPERIMENT_NAME`` (default ``fedprivacy``).

    Raises
    ------
    TrackingError
        If MLflow is not installed or the store cannot be opened; before
        round 1, so a run asked to be tracked does not run untracked
        (:func:`check_tracking` refuses most such runs before they write anything).

    Examples
    --------
    >>> tracker = MlflowLog(run_dir, config.as_dict())     # doctest: +SKIP
    >>> tracker.log_round({"round": 1, "central-accuracy": 0.9})  # doctest: +SKIP
    >>> tracker.log_artifacts([run_dir / "plots", run_dir / "model.keras"])  # doctest: +SKIP
    >>> tracker.close("FINISHED")                         # doctest: +SKIP
    """

    def __init__(
        self,
        run_dir: Path,
        config: Mapping[str, Any],
        kept: Iterable[Mapping[str, Any]] = (),
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.state_dir = run_dir / MLFLOW_DIR
        self.local = tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI")
        self.tracking_uri = tracking_uri or tracking_uri_for(run_dir)
        self.experiment_name = (
            experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        )
        self.closed = False
        self._failed = False
        kept = list(kept)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.client = _open_client(self.tracking_uri)
            self.experiment_id = self._experiment_id()
            self.run_id, self.resumed = self._start_or_continue(config, kept)
        except ImportError as error:
            raise TrackingError(MISSING) from error
        except Exception as error:  # MlflowException, OSError, requests' errors, ...
            raise TrackingError(f"MLflow tracking at {self.tracking_uri}: {error}") from error
        log(
            INFO,
            "MLflow: %s run %s in experiment %r at %s",
            "continuing" if self.resumed else "new",
            self.run_id,
            self.experiment_name,
            self.tracking_uri,
        )

    # ------------------------------------------------------------ set-up
    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        location = (self.state_dir / ARTIFACTS_DIR).resolve().as_uri() if self.local else None
        return self.client.create_experiment(self.experiment_name, artifact_location=location)

    def _start_or_continue(
        self, config: Mapping[str, Any], kept: list[Mapping[str, Any]]
    ) -> tuple[str, bool]:
        """The run id to log to and whether it is an earlier MLflow run continued."""
        from mlflow.exceptions import MlflowException  # pylint: disable=import-outside-toplevel

        id_file = self.state_dir / RUN_ID_FILE
        previous = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
        run = None
        if previous:
            try:
                run = self.client.get_run(previous)
            except MlflowException:
                log(
                    WARNING,
                    "MLflow: run %s named in %s is not in %s; starting a new MLflow run",
                    previous, id_file, self.tracking_uri,
                )
        kept_last = max((int(e.get("round", 0)) for e in kept), default=-1)
        if run is not None and run.info.lifecycle_stage == "active":
            logged_last = self._last_step(run)
            if logged_last <= kept_last:
                self.client.update_run(previous, status="RUNNING")
                self._log_new_params(previous, run.data.params, config)
                missing = [e for e in kept if int(e.get("round", 0)) > logged_last]
                self._log_entries(previous, missing)
                return previous, True
            log(
                WARNING,
                "MLflow: run %s holds rounds up to %d but the run resumes after round %d; "
                "a new MLflow run holds the rounds kept (the old one is tagged superseded)",
                previous, logged_last, kept_last,
            )
        tags = {"fedprivacy.run-dir": str(self.run_dir.resolve())}
        if previous:
            tags["fedprivacy.resumed-from"] = previous
        created = self.client.create_run(self.experiment_id, run_name=self.run_dir.name, tags=tags)
        run_id = created.info.run_id
        if run is not None:
            self.client.set_tag(previous, "fedprivacy.superseded-by", run_id)
            if run.info.status == "RUNNING":
                self.client.set_terminated(previous, "KILLED")
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(run_id + "\n", encoding="utf-8")
        tmp.replace(id_file)
        self._log_new_params(run_id, {}, config)
        self._log_entries(run_id, kept)
        return run_id, False

    def _last_step(self, run: Any) -> int:
        """The last step any metric of ``run`` was logged at (-1 if none)."""
        steps = [
            metric.step
            for key in run.data.metrics
            for metric in self.client.get_metric_history(run.info.run_id, key)
        ]
        return max(steps, default=-1)

    def _log_new_params(
        self, run_id: str, logged: Mapping[str, str], config: Mapping[str, Any]
    ) -> None:
        """Log config keys the run lacks; a changed value (MLflow params are
        immutable) becomes the tag ``resumed-config.<key>``."""
        from mlflow.entities import Param  # pylint: disable=import-outside-toplevel

        params = [Param(k, str(v)) for k, v in config.items() if k not in logged]
        for start in range(0, len(params), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[start : start + _MAX_PARAMS_PER_BATCH])
        for key, value in config.items():
            if key in logged and logged[key] != str(value):
                self.client.set_tag(run_id, f"resumed-config.{key}", str(value))

    def _log_entries(self, run_id: str, entries: Iterable[Mapping[str, Any]]) -> int:
        from mlflow.entities import Metric  # pylint: disable=import-outside-toplevel

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now, int(entry.get("round", 0)))
            for entry in entries
            for key, value in round_metrics(entry).items()
        ]
        for start in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + _MAX_METRICS_PER_BATCH])
        return len(metrics)

    # ------------------------------------------------------------ logging
    def _guard(self, what: str, error: Exception) -> None:
        # Tracking is a copy of what metrics.json holds: a store that fails
        # mid-run (a tracking server gone) must not stop the training.
        self._failed = True
        log(
            WARNING,
            "MLflow: %s failed (%s: %s); MLflow logging is off for the rest of this run, "
            "metrics.json has every round",
            what, type(error).__name__, error,
        )

    def log_round(self, entry: Mapping[str, Any]) -> int:
        """Log every numeric value of a round's ``metrics.json`` entry; return how many.

        The step is the entry's ``round``; ``None``/NaN values are skipped.
        """
        if self._failed or self.closed:
            return 0
        try:
            return self._log_entries(self.run_id, [entry])
        except Exception as error:  # noqa: BLE001  pylint: disable=broad-exception-caught
            self._guard(f"logging round {entry.get('round')}", error)
            return 0

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the run (e.g. why it stopped early)."""
        if self._failed or self.closed:
            return
        try:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))
        except Exception as error:  # noqa: BLE001  pylint: disable=broad-exception-caught
            self._guard("setting tags", error)

    def log_artifacts(self, paths: Sequence[Path]) -> list[str]:
        """Upload files and folders (a folder keeps its name); return the names uploaded.

        Paths that do not exist are skipped.
        """
        done: list[str] = []
        if self._failed or self.closed:
            return done
        try:
            for path in paths:
                if path.is_dir():
                    self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
                elif path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
                else:
                    continue
                done.append(path.name)
        except Exception as error:  # noqa: BLE001  pylint: disable=broad-exception-caught
            self._guard(f"uploading {path}", error)
        return done

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run with ``status`` (FINISHED, FAILED or KILLED); once."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: allowed {STATUSES}")
        if self.closed:
            return
        self.closed = True
        if self._failed:  # the store already failed: do not wait on it again
            return
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as error:  # noqa: BLE001  pylint: disable=broad-exception-caught
            self._guard(f"ending the run as {status}", error)

    def __enter__(self) -> MlflowLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
