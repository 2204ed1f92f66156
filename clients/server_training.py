"""Server-side fine-tuning of the aggregated model on the server's own (public) data.

Each round, after aggregation (and the server optimiser), the server may take
a few epochs of plain SGD on a global dataset it is allowed to use
(run-config ``server-data``, e.g. a public slice of the training split held
out before partitioning, :mod:`data.public_slice`) before evaluating and
sending the model out again. This is the "server-side training on global
data" of hybrid FL schemes. Zhao, Li, Lai, Suda, Civin, Chandra (2018),
"Federated Learning with Non-IID Data", https://arxiv.org/abs/1806.00582,
showed that a small class-balanced global subset (5% of the data) recovers
much of the accuracy lost to label-skewed clients when it is shared with the
clients; here the server trains on it itself, so it never leaves the server.

Under DP-FedAvg the fine-tuning runs on the released (noised) model, so it is
post-processing: it costs no privacy budget *provided* the server data
contains no client's records (which the public slice guarantees by
construction).

The training loop is :func:`clients.proximal.train_proximal` with
``proximal_mu = 0``: plain minibatch SGD with an explicit, seeded sample
order, so a run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from logging import INFO
from typing import TYPE_CHECKING

import numpy as np

from flwr.common.logger import log

from .proximal import local_seed, train_proximal
from .weights import get_weights, set_weights

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from data.dataset import LabeledData

#: Stands in for a partition id in the server's data-order seed; no client has it.
SERVER_STREAM = 2**32 - 1


def fine_tune(
    model: keras.Model,
    data: LabeledData,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    *,
    seed: int = 0,
) -> float:
    """Train ``model`` in place for ``epochs`` of SGD on ``data``; return the last epoch's loss.

    ``epochs = 0`` leaves the model untouched and returns NaN.
    """
    return train_proximal(
        model,
        data,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        proximal_mu=0.0,
        seed=seed,
    )


class ServerTrainer:
    """A ``server_update_fn`` for :class:`strategies.fedavg.FedAvg`: fine-tune, return arrays.

    Parameters
    ----------
    model : keras.Model
        The server's compiled model (the central evaluator's is fine: it is
        overwritten with the arrays of each call).
    data : LabeledData
        The server's own data; never a client's partition.
    epochs, batch_size, learning_rate : int, int, float
        Plain-SGD settings of the fine-tuning.
    seed : int
        Run seed; round ``r`` uses ``local_seed(seed, r, SERVER_STREAM)``.

    Attributes
    ----------
    last_loss : float
        Mean loss of the last fine-tuning epoch (NaN before the first call);
        log it as ``server-train-loss``.
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        model: keras.Model,
        data: LabeledData,
        *,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        seed: int = 0,
    ) -> None:
        if epochs < 1:
            raise ValueError(f"server-train-epochs must be >= 1 to fine-tune, got {epochs}")
        if len(data) == 0:
            raise ValueError("the server's training data is empty")
        self.model = model
        self.data = data
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.seed = seed
        self.last_loss = math.nan

    def __call__(
        self, server_round: int, arrays: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Load ``arrays``, fine-tune, and return the same keys in the same dtypes."""
        set_weights(self.model, arrays)
        self.last_loss = fine_tune(
            self.model,
            self.data,
            self.epochs,
            self.batch_size,
            self.learning_rate,
            seed=local_seed(self.seed, server_round, SERVER_STREAM),
        )
        tuned = get_weights(self.model)
        log(
            INFO,
            "Round %d: server fine-tuning on %d samples, %d epoch(s), loss %.4f",
            server_round,
            len(self.data),
            self.epochs,
            self.last_loss,
        )
        return {key: tuned[key].astype(np.asarray(value).dtype) for key, value in arrays.items()}

    def __repr__(self) -> str:
        return (
            f"ServerTrainer({len(self.data)} samples of {self.data.name!r}, epochs={self.epochs}, "
            f"batch_size={self.batch_size}, learning_rate={self.learning_rate:g})"
        )


# pylint: disable=too-many-arguments
def make_server_update_fn(
    model: keras.Model,
    data: LabeledData | None,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
) -> ServerTrainer | None:
    """The strategy's ``server_update_fn``, or ``None`` when there is nothing to do.

    ``None`` (no server-side step at all) when ``epochs`` is 0 or the server
    holds no data, so the strategy behaves exactly as without the feature.

    Raises
    ------
    ValueError
        When ``epochs > 0`` but the server holds no data, or ``epochs < 0``.
    """
    if epochs < 0:
        raise ValueError(f"server-train-epochs must be >= 0, got {epochs}")
    if epochs == 0:
        if data is not None:
            log(INFO, "server-train-epochs is 0: the server's %d samples are not used", len(data))
        return None
    if data is None:
        raise ValueError(
            "server-train-epochs > 0 needs server data: set server-data "
            "(e.g. 'public-slice:0.01')"
        )
    return ServerTrainer(
        model, data, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed
    )
