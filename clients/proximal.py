"""FedProx local training: SGD on the local loss plus a proximal term.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith (2020), "Federated Optimization in
Heterogeneous Networks", MLSys, https://arxiv.org/abs/1812.06127, Algorithm 2:
client ``k`` approximately minimises

    h_k(w) = F_k(w) + mu/2 * ||w - w^t||^2

from the global model ``w^t``. Here the proximal term covers the *shared*
variables only (``shared_paths``; all trainable variables when ``None``):
variables kept private to a client (personalisation layers) are not pulled
towards a global value they never had. Its gradient is ``mu (w - w^t)`` on
the shared variables and zero elsewhere.

Data order
----------
Keras' ``model.fit(shuffle=True)`` draws its own order, which cannot be
reproduced outside it. :func:`train_proximal` makes the order explicit: epoch
``e`` visits the samples in ``epoch_orders(n, epochs, seed)[e]`` (a seeded
permutation per epoch) in consecutive minibatches of ``batch_size`` (the
last one smaller, as in ``model.fit``). With ``proximal_mu = 0`` the update
is plain minibatch SGD on the compiled loss, i.e. what
:func:`clients.training.train_locally` computes for the same order; the tests
check it against ``model.fit(shuffle=False)`` run epoch by epoch on the
permuted data (same compiled loss, same SGD step) and against
``train_locally`` itself with one full batch per epoch (where the order
cannot matter).

The step is one ``tf.function`` per model that runs a whole epoch in the
graph (an explicit ``tf.while_loop`` over minibatches, no AutoGraph), so a
small client's epoch costs one call, not one call per minibatch.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from data.dataset import LabeledData

# One compiled epoch function per model object (weakly held: a model that is
# dropped takes its function with it).
_EPOCH_FNS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def local_seed(run_seed: int, server_round: int, partition_id: int) -> int:
    """A data-order seed for one client in one round, from the run's seed.

    Distinct rounds and clients get independent streams
    (``numpy.random.SeedSequence``); equal inputs give equal seeds, so two
    strategies run with the same seed see the same client data orders.
    """
    sequence = np.random.SeedSequence([int(run_seed), int(server_round), int(partition_id)])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


def epoch_orders(num_samples: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The sample order of each epoch: ``epochs`` seeded permutations of ``range(n)``."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(num_samples) for _ in range(epochs)]


def proximal_variables(
    model: keras.Model, shared_paths: set[str] | None
) -> list[Any]:
    """The trainable variables the proximal term covers (all when ``shared_paths`` is None).

    Raises
    ------
    KeyError
        When a path of ``shared_paths`` is not a variable of ``model``.
    """
    if shared_paths is None:
        return list(model.trainable_variables)
    known = {v.path for v in model.weights}
    unknown = sorted(set(shared_paths) - known)
    if unknown:
        raise KeyError(f"shared paths that are not variables of the model: {unknown}")
    return [v for v in model.trainable_variables if v.path in shared_paths]


def _anchors(
    variables: Sequence[Any], global_weights: Mapping[str, np.ndarray] | None
) -> list[Any]:
    """``w^t`` for each proximal variable, as constant tensors of its dtype."""
    import tensorflow as tf

    anchors = []
    for variable in variables:
        if global_weights is None:
            value = variable.numpy()
        else:
            if variable.path not in global_weights:
                raise KeyError(f"global_weights has no value for shared variable {variable.path}")
            value = np.asarray(global_weights[variable.path])
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"{variable.path}: global shape {value.shape} differs from "
                    f"the model's {tuple(variable.shape)}"
                )
        anchors.append(tf.constant(value, dtype=variable.dtype))
    return anchors


def proximal_term(
    variables: Sequence[Any], anchors: Sequence[Any], mu: Any, dtype: Any = "float32"
) -> Any:
    """``mu / 2 * sum_v ||v - a_v||^2`` as a scalar tensor of ``dtype`` (0 for no variables).

    Each variable's squared distance is taken in the variable's own dtype,
    then summed in ``dtype`` (the data loss's, so a float64 model keeps float64).
    """
    import tensorflow as tf

    total = tf.constant(0.0, dtype=dtype)
    for variable, anchor in zip(variables, anchors, strict=True):
        squared = tf.reduce_sum(tf.square(variable - tf.cast(anchor, variable.dtype)))
        total += tf.cast(squared, dtype)
    mu = tf.cast(mu, dtype) if tf.is_tensor(mu) else tf.constant(float(mu), dtype)
    return 0.5 * mu * total


def _data_loss(model: keras.Model, x: Any, y: Any, y_pred: Any) -> Any:
    """The model's compiled loss (with its regularisation losses), as ``fit`` computes it."""
    if getattr(model, "_compile_loss", None) is None:
        raise ValueError("compile the model with a loss before FedProx training")
    return model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)


def proximal_objective(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    proximal_mu: float,
    global_weights: Mapping[str, np.ndarray] | None,
    shared_paths: set[str] | None = None,
) -> tuple[float, dict[str, np.ndarray]]:
    """``h(w) = F(w) + mu/2 ||w_shared - w^t||^2`` on one batch and its gradient.

    Eager and unoptimised: for checks (finite differences) and inspection.
    Returns the objective and the gradient per trainable variable path.
    """
    import tensorflow as tf

    variables = proximal_variables(model, shared_paths)
    anchors = _anchors(variables, global_weights)
    trainable = list(model.trainable_variables)
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        data_loss = _data_loss(model, x, y, y_pred)
        objective = data_loss + proximal_term(variables, anchors, proximal_mu, data_loss.dtype)
    grads = tape.gradient(objective, trainable)
    return float(objective), {
        v.path: (np.zeros(v.shape, v.dtype) if g is None else np.asarray(g))
        for v, g in zip(trainable, grads, strict=True)
    }


def _epoch_fn(model: keras.Model, proximal_index: tuple[int, ...]) -> Any:
    """The compiled epoch of ``model`` (built once per model and variable selection)."""
    import tensorflow as tf

    trainable = list(model.trainable_variables)
    key = (tuple(v.path for v in trainable), proximal_index)  # a frozen layer changes it
    cache = _EPOCH_FNS.setdefault(model, {})
    if key in cache:
        return cache[key]
    proximal = [trainable[i] for i in proximal_index]

    # An explicit tf.while_loop (no AutoGraph): tracing does not depend on
    # the source file being readable or unchanged.
    @tf.function(reduce_retracing=True, autograph=False)
    def run_epoch(x, y, batch_size, learning_rate, mu, anchors):
        n = tf.shape(y)[0]
        num_batches = (n + batch_size - 1) // batch_size

        def body(i, loss_sum):
            start = i * batch_size
            end = tf.minimum(start + batch_size, n)
            xb, yb = x[start:end], y[start:end]
            with tf.GradientTape() as tape:
                y_pred = model(xb, training=True)
                data_loss = _data_loss(model, xb, yb, y_pred)
                objective = data_loss + proximal_term(proximal, anchors, mu, data_loss.dtype)
            grads = tape.gradient(objective, trainable)
            for variable, grad in zip(trainable, grads):
                if grad is not None:
                    variable.assign_sub(grad * tf.cast(learning_rate, variable.dtype))
            batch_loss = tf.cast(data_loss, tf.float32) * tf.cast(end - start, tf.float32)
            return i + 1, loss_sum + batch_loss

        _, loss_sum = tf.while_loop(
            lambda i, _: i < num_batches, body, (tf.constant(0), tf.constant(0.0, tf.float32))
        )
        return loss_sum / tf.cast(n, tf.float32)

    cache[key] = run_epoch
    return run_epoch


# pylint: disable=too-many-arguments,too-many-locals
def train_proximal(
    model: keras.Model,
    data: LabeledData,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    proximal_mu: float,
    global_weights: Mapping[str, np.ndarray] | None = None,
    shared_paths: set[str] | None = None,
    seed: int = 0,
) -> float:
    """Run FedProx local training; return the last epoch's mean data loss.

    Parameters
    ----------
    model : keras.Model
        A compiled model holding the starting weights (normally ``w^t``).
    data : LabeledData
        The client's training data.
    epochs, batch_size, learning_rate
        As in :func:`clients.training.train_locally` (plain SGD, no momentum).
    proximal_mu : float
        ``mu >= 0`` of Li et al. (2020); 0 is FedAvg's local SGD.
    global_weights : mapping str -> np.ndarray, optional
        ``w^t`` by variable path (at least the shared trainable variables);
        ``None`` takes the model's weights at the call, i.e. the global model
        when called right after loading it.
    shared_paths : set of str, optional
        Variable paths the proximal term covers; ``None`` covers every
        trainable variable.
    seed : int
        Seeds the per-epoch sample order (:func:`epoch_orders`); see
        :func:`local_seed`.

    Returns
    -------
    float
        The sample-weighted mean of the data loss ``F_k`` (without the
        proximal term) over the last epoch's minibatches, as ``model.fit``
        reports ``loss``; NaN when ``epochs`` is 0 or ``data`` is empty.
    """
    import tensorflow as tf

    if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
        raise ValueError(f"proximal-mu must be a finite number >= 0, got {proximal_mu}")
    if batch_size < 1:
        raise ValueError(f"batch-size must be at least 1, got {batch_size}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    variables = proximal_variables(model, shared_paths)
    anchors = _anchors(variables, global_weights)
    if epochs == 0 or len(data) == 0:
        return math.nan
    paths = [v.path for v in model.trainable_variables]
    index = tuple(paths.index(v.path) for v in variables)
    run_epoch = _epoch_fn(model, index)
    batch = tf.constant(int(batch_size), tf.int32)
    lr = tf.constant(float(learning_rate), tf.float32)
    mu = tf.constant(float(proximal_mu), tf.float32)
    loss = math.nan
    for order in epoch_orders(len(data), epochs, seed):
        x = tf.constant(data.x[order])
        y = tf.constant(data.y[order])
        loss = float(run_epoch(x, y, batch, lr, mu, anchors))
    return loss
