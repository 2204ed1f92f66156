"""A quiet, readable log: set up before TensorFlow, Ray or dp-accounting say anything.

Imported first by ``app/__init__.py``, so the ServerApp and every ClientApp
(each in a Ray worker process in simulation) run it before any heavy import.

* TensorFlow's C++ start-up chatter (oneDNN notes, "Could not find cuda
  drivers", the ERROR ``failed call to cuInit`` on every machine without a
  GPU) is written by C++ code when TensorFlow is imported; only the
  environment variable ``TF_CPP_MIN_LOG_LEVEL`` read at that moment hides it.
  ``CUDA_VISIBLE_DEVICES`` is deliberately left alone: hiding devices could
  disable a real GPU, and level 3 already hides the cuInit line.
* What TensorFlow's C++ code prints while it is being imported (before it
  reads that variable: the oneDNN note, "Could not find cuda drivers") is
  written straight to file descriptor 2; the first ``import tensorflow`` runs
  with fd 2 captured, and every line but those is replayed
  (:func:`filtered_stderr_fd`). In a Ray worker Flower imports TensorFlow
  before our code, so there the banner is dropped from the worker output
  that Ray forwards to the ServerApp's process (:func:`quiet_ray_worker_logs`).
* Known third-party Python warnings are filtered at their source module.
* absl (used by dp-accounting) calls ``logging.basicConfig()`` the first time
  it logs while the root logger has no handler; that root handler then
  printed every Flower line a second time (``INFO:flwr:...``). ``privacy``
  gives the root logger a handler that skips Flower's records first
  (``privacy.quiet_root_logger``), so absl never configures it.

``FEDPRIVACY_VERBOSE=1`` brings the full logs back. It is an environment
variable, not a run-config key, because the run config is read only after
these imports have happened (and in Ray workers it is never seen before them).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

#: Environment variable that turns the quiet set-up off (``1``, ``true``, ``yes``).
VERBOSE_ENV = "FEDPRIVACY_VERBOSE"


def verbose() -> bool:
    """Whether the user asked for the full third-party logs."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def quiet_environment() -> None:
    """Environment read by TensorFlow's C++ logging when it is imported."""
    # 3 = show FATAL only: hides INFO/WARNING notes *and* the cuInit ERROR that
    # every CPU-only machine prints. setdefault: a user's own value wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


#: What TensorFlow's C++ code writes to the stderr file descriptor while it is
#: imported, before its log level is read (TF_CPP_MIN_LOG_LEVEL does not hide it).
TF_IMPORT_BANNER = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|Could not find cuda drivers"
    r"|failed call to cuInit"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
)



@contextlib.contextmanager
def filtered_stderr_fd(drop: re.Pattern[str] = TF_IMPORT_BANNER) -> Iterator[None]:
    """Send file descriptor 2 to a temporary file; then replay it without ``drop``'s lines.

    Nothing else is lost: every other line (a real error) is written to
    stderr when the block ends, exception or not.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line for line in capture.read().decode("utf-8", "replace").splitlines(True)
                if not drop.search(line)
            ]
            if kept:
                os.write(2, "".join(kept).encode("utf-8"))


class _ImportHook(importlib.abc.MetaPathFinder):
    """Run ``around(exec_module, module)`` instead of the first import of module ``name``."""

    def __init__(self, name: str, around) -> None:  # type: ignore[no-untyped-def]
        self.name = name
        self.around = around

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once; and find the real spec below
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module, around = loader.exec_module, self.around

        def hooked_exec_module(module):  # type: ignore[no-untyped-def]
            around(exec_module, module)

        loader.exec_module = hooked_exec_module
        return spec


def _on_import(name: str, around) -> None:  # type: ignore[no-untyped-def]
    if not any(isinstance(f, _ImportHook) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportHook(name, around))


def _quiet_exec(exec_module, module) -> None:  # type: ignore[no-untyped-def]
    with filtered_stderr_fd():
        exec_module(module)


def quiet_tensorflow_import() -> None:
    """Filter TensorFlow's import banner, unless TensorFlow is already imported."""
    if "tensorflow" not in sys.modules:
        _on_import("tensorflow", _quiet_exec)


def _quiet_dispatcher(module) -> None:  # type: ignore[no-untyped-def]
    dispatcher = getattr(module, "global_worker_stdstream_dispatcher", None)
    if dispatcher is None or getattr(dispatcher, "_fedprivacy_quiet", False):
        return
    emit = dispatcher.emit

    def quiet_emit(data):  # type: ignore[no-untyped-def]
        lines = data.get("lines") if isinstance(data, dict) else None
        if lines:
            kept = [line for line in lines if not TF_IMPORT_BANNER.search(str(line))]
            if not kept:
                return
            data = dict(data, lines=kept)
        emit(data)

    dispatcher.emit = quiet_emit
    dispatcher._fedprivacy_quiet = True  # pylint: disable=protected-access


def quiet_ray_worker_logs() -> None:
    """Drop TensorFlow's import banner from the Ray worker output the driver prints.

    A simulation's ClientAppActor imports TensorFlow before our code (Flower's
    ``flwr.simulation.ray_transport.utils`` does ``import tensorflow`` for its
    GPU-growth helper), so the banner cannot be filtered in the worker; Ray
    forwards worker output to the driver (the simulation process, where the
    ServerApp runs) through one dispatcher, filtered here: now if Ray is
    imported, else when it is (this never imports Ray itself).
    """
    name = "ray._private.ray_logging"
    if name in sys.modules:
        _quiet_dispatcher(sys.modules[name])
    else:
        def around(exec_module, module):  # type: ignore[no-untyped-def]
            exec_module(module)
            _quiet_dispatcher(module)

        _on_import(name, around)


def quiet_warnings() -> None:
    """Filter known, harmless third-party warnings where they are raised."""
    # Ray: "Tip: In future versions of Ray, Ray will no longer override
    # accelerator visible devices env var ..." at ray.init. Only the warning is
    # hidden: setting RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 instead would let
    # every num_gpus=0 client actor see (and TensorFlow grab) all GPUs.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\.|$)")
    # Keras 3 / TensorFlow call NumPy APIs NumPy 2 deprecates (e.g. the
    # ``__array__`` copy keyword); nothing we can act on. They are shown at
    # all because Flower's flwr.simulation.ray_transport.utils turns every
    # DeprecationWarning on ("once"); these filters go in front of that one.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"keras(\.|$)")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"tensorflow(\.|$)")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"tf_keras(\.|$)")
    warnings.filterwarnings("ignore", message=r".*__array__ implementation.*",
                            category=DeprecationWarning)
    # dp-accounting's RDP accountant warns (through absl) for every order it
    # excludes when a series does not converge; the epsilon is still valid.
    logging.getLogger("absl").setLevel(logging.ERROR)


def configure() -> None:
    """Quiet by default; everything when ``FEDPRIVACY_VERBOSE=1``. Idempotent."""
    # No duplicated lines, verbose or not (stdlib only, no TensorFlow import).
    from privacy import quiet_root_logger  # pylint: disable=import-outside-toplevel

    quiet_root_logger()
    if verbose():
        return
    quiet_environment()
    quiet_tensorflow_import()
    quiet_ray_worker_logs()
    quiet_warnings()
