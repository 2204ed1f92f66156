"""MNIST (LeCun et al. 1998): 70,000 28x28 handwritten digits, FedAvg's reference task.

McMahan et al. (2017), "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS), train on MNIST's 60,000 training images split
over 100 clients, IID (600 each) or pathologically non-IID (sorted by label,
200 shards of 300, two shards per client), and test on the official 10,000.

Where the data comes from (the run-config key ``data-path``):

- ``""`` (unset): ``keras.datasets.mnist.load_data()``, which downloads
  ``mnist.npz`` once into ``~/.keras/datasets/`` and reads it from there.
- a path to an ``.npz`` file in Keras' layout (arrays ``x_train``
  ``(60000, 28, 28)``, ``y_train`` ``(60000,)``, ``x_test`` ``(10000, 28, 28)``,
  ``y_test`` ``(10000,)``, pixels 0..255), or a folder holding ``mnist.npz``.
  A named file that does not exist is an error, never a silent download.

:func:`load_mnist` returns all 70,000 images in the canonical order, the
60,000 official training images first, so the server's stratified hold-out
can draw its test set from everything; :func:`load_mnist_split` returns the
official ``(train, test)`` pair for whoever wants the published protocol.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .dataset import LabeledData

MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")
MNIST_IMAGE_SHAPE = (28, 28)
MNIST_TRAIN_SIZE = 60_000
MNIST_TEST_SIZE = 10_000
MNIST_NUM_CLASSES = 10


def resolve_mnist_path(data_path: str) -> Path | None:
    """Return the local ``.npz`` that ``data_path`` names, or None to download.

    Raises
    ------
    FileNotFoundError
        When ``data_path`` names a file, or a folder without ``mnist.npz``,
        that does not exist.
    """
    if not data_path.strip():
        return None
    path = Path(data_path).expanduser()
    if path.is_dir():
        path = path / "mnist.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST file {path} does not exist; data-path must name an .npz in "
            f"Keras layout (keys {', '.join(MNIST_KEYS)}) or a folder holding "
            "mnist.npz, or be empty to download with keras.datasets.mnist.load_data()"
        )
    return path


def read_mnist_npz(
    path: Path,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Read ``((x_train, y_train), (x_test, y_test))`` from a Keras-layout ``.npz``.

    Raises
    ------
    ValueError
        When the file is not a readable ``.npz`` or lacks one of the four keys.
    """
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not named arrays")
        with archive:
            found = sorted(archive.files)
            arrays = {key: archive[key] for key in MNIST_KEYS if key in found}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"MNIST file {path} is not a readable .npz: {err}") from err
    missing = [key for key in MNIST_KEYS if key not in arrays]
    if missing:
        raise ValueError(
            f"MNIST file {path} lacks key(s) {missing}; Keras layout has "
            f"{', '.join(MNIST_KEYS)}, found {found}"
        )
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def download_mnist() -> tuple[
    tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]
]:
    """Fetch MNIST with ``keras.datasets.mnist.load_data()`` (cached by Keras).

    Raises
    ------
    ConnectionError
        When Keras cannot download the file (offline machine, blocked host).
    """
    import keras  # only here: the download is the one place that needs Keras

    try:
        return keras.datasets.mnist.load_data()
    except Exception as err:  # Keras raises a bare Exception on fetch failure
        raise ConnectionError(
            f"keras.datasets.mnist.load_data() could not fetch MNIST ({err}); "
            "set data-path to a local mnist.npz in Keras layout"
        ) from err


def mnist_part(images: np.ndarray, labels: np.ndarray, name: str) -> LabeledData:
    """Check one MNIST part and scale it to float32 ``(n, 28, 28, 1)`` in [0, 1].

    Raises
    ------
    ValueError
        When images are not ``(n, 28, 28)``, labels not ``(n,)`` in 0..9, or
        pixels outside 0..255.
    """
    if images.ndim != 3 or images.shape[1:] != MNIST_IMAGE_SHAPE:
        raise ValueError(
            f"{name}: images must have shape (n, 28, 28), found {images.shape}"
        )
    if labels.shape != (len(images),):
        raise ValueError(
            f"{name}: labels must have shape ({len(images)},), found {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= MNIST_NUM_CLASSES):
        raise ValueError(
            f"{name}: labels must lie in 0..9, found {labels.min()}..{labels.max()}"
        )
    if len(images) and (images.min() < 0 or images.max() > 255):
        raise ValueError(
            f"{name}: pixels must lie in 0..255, found {images.min()}..{images.max()}"
        )
    x = (images.astype(np.float32) / 255.0)[..., np.newaxis]
    return LabeledData(
        x=x,
        y=labels.astype(np.int64),
        num_classes=MNIST_NUM_CLASSES,
        kind="image",
        name="mnist",
    )


def load_mnist_split(data_path: str = "") -> tuple[LabeledData, LabeledData]:
    """Return MNIST's official ``(train, test)`` split: 60,000 and 10,000 images.

    Parameters
    ----------
    data_path : str
        A Keras-layout ``.npz`` (or a folder holding ``mnist.npz``); empty to
        download with ``keras.datasets.mnist.load_data()``.

    Raises
    ------
    FileNotFoundError
        When ``data_path`` names a missing file.
    ValueError
        When the file is malformed (keys, shapes, label or pixel range).
    ConnectionError
        When the download fails.
    """
    path = resolve_mnist_path(data_path)
    (x_train, y_train), (x_test, y_test) = (
        download_mnist() if path is None else read_mnist_npz(path)
    )
    where = "keras.datasets.mnist" if path is None else str(path)
    return (
        mnist_part(x_train, y_train, f"{where} (train)"),
        mnist_part(x_test, y_test, f"{where} (test)"),
    )


def load_mnist(data_path: str = "") -> LabeledData:
    """Return all 70,000 MNIST images: the official training set, then the test set.

    The first :data:`MNIST_TRAIN_SIZE` samples are the official training set,
    in canonical order; see :func:`load_mnist_split` for the parameters and errors.
    """
    train, test = load_mnist_split(data_path)
    return LabeledData(
        x=np.concatenate([train.x, test.x]),
        y=np.concatenate([train.y, test.y]),
        num_classes=MNIST_NUM_CLASSES,
        kind="image",
        name="mnist",
    )
