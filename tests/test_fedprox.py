"""FedProx local training (Li et al. 2020): gradient check, mu = 0 is FedAvg, shared paths."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from clients.models import build_model  # noqa: E402
from clients.proximal import (  # noqa: E402
    epoch_orders,
    local_seed,
    proximal_objective,
    train_proximal,
)
from clients.training import train_locally  # noqa: E402
from clients.weights import get_weights, set_weights  # noqa: E402
from data.dataset import LabeledData  # noqa: E402

HEAD = {"tiny/head/kernel", "tiny/head/bias"}


def compiled(model: keras.Model) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


@pytest.fixture()
def float64_loss():
    """floatx float64 during the test, so the compiled loss (``CompileLoss``) is float64.

    The global layer dtype policy is pinned first (Keras caches it from floatx
    on first use), so the change cannot leak into models built by later tests.
    """
    keras.config.dtype_policy()
    floatx = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(floatx)


def tiny_float64() -> keras.Model:
    """A float64 model (dtype set per layer) with a float64 loss: accurate finite differences."""
    init = keras.initializers.GlorotUniform
    model = keras.Sequential(
        [
            keras.Input(shape=(5,), dtype="float64"),
            keras.layers.Dense(
                4, activation="tanh", kernel_initializer=init(1), dtype="float64", name="hidden"
            ),
            keras.layers.Dense(
                3, activation="softmax", kernel_initializer=init(2), dtype="float64", name="head"
            ),
        ],
        name="tiny",
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(dtype="float64"),
    )
    assert all(v.dtype == "float64" for v in model.weights)
    assert keras.config.floatx() == "float64"  # under the float64_loss fixture
    return model


@pytest.fixture(scope="module")
def cnn() -> keras.Model:
    """The app's CNN for 8x8 images (our own instance, not the shared cache)."""
    return compiled(build_model("image", (8, 8, 1), 10, seed=0))


def image_data(n: int, seed: int = 0) -> LabeledData:
    rng = np.random.default_rng(seed)
    return LabeledData(
        x=rng.random((n, 8, 8, 1), dtype=np.float32),
        y=rng.integers(0, 10, n),
        num_classes=10,
        kind="image",
        name="random",
    )


def shifted(weights: dict[str, np.ndarray], by: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: v + by * rng.standard_normal(v.shape).astype(v.dtype) for k, v in weights.items()}


# --------------------------------------------------------------- gradient check
@pytest.mark.usefixtures("float64_loss")
def test_proximal_gradient_matches_finite_differences() -> None:
    model = tiny_float64()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5))
    y = rng.integers(0, 3, 6)
    w_global = shifted(get_weights(model), 0.5, seed=1)  # far from the current weights
    mu = 0.7
    _, grads = proximal_objective(
        model, x, y, proximal_mu=mu, global_weights=w_global, shared_paths=HEAD
    )
    _, data_grads = proximal_objective(
        model, x, y, proximal_mu=0.0, global_weights=w_global, shared_paths=HEAD
    )
    current = get_weights(model)
    eps = 1e-6
    for path, index in [
        ("tiny/head/kernel", (1, 2)),
        ("tiny/head/bias", (0,)),
        ("tiny/hidden/kernel", (3, 1)),  # private: no proximal pull
    ]:
        values = []
        for sign in (1.0, -1.0):
            moved = {k: v.copy() for k, v in current.items()}
            moved[path][index] += sign * eps
            set_weights(model, moved)
            values.append(
                proximal_objective(
                    model, x, y, proximal_mu=mu, global_weights=w_global, shared_paths=HEAD
                )[0]
            )
        set_weights(model, current)
        numeric = (values[0] - values[1]) / (2 * eps)
        assert grads[path][index] == pytest.approx(numeric, rel=1e-6, abs=1e-8)
        pull = grads[path][index] - data_grads[path][index]
        expected = mu * (current[path][index] - w_global[path][index]) if path in HEAD else 0.0
        assert pull == pytest.approx(expected, rel=1e-9, abs=1e-12)
        if path in HEAD:
            assert abs(pull) > 1e-3  # the check is not vacuous


# ------------------------------------------------------------- mu = 0 is FedAvg
def test_mu_zero_is_fit_with_the_same_data_order(cnn: keras.Model) -> None:
    """The same update as Keras' own train step (model.fit) on the same minibatches."""
    data = image_data(53)
    start = get_weights(cnn)
    loss = train_proximal(
        cnn, data, epochs=2, batch_size=8, learning_rate=0.1, proximal_mu=0.0, seed=5
    )
    ours = get_weights(cnn)

    set_weights(cnn, start)
    cnn.optimizer.learning_rate.assign(0.1)
    for order in epoch_orders(len(data), 2, seed=5):
        history = cnn.fit(
            data.x[order], data.y[order], epochs=1, batch_size=8, shuffle=False, verbose=0
        )
    reference = get_weights(cnn)
    set_weights(cnn, start)
    for key in ours:
        np.testing.assert_allclose(ours[key], reference[key], rtol=1e-6, atol=1e-7)
        assert not np.allclose(ours[key], start[key])  # training did move it
    assert loss == pytest.approx(history.history["loss"][-1], rel=1e-5)


def test_mu_zero_equals_train_locally_when_order_cannot_matter(cnn: keras.Model) -> None:
    """One full batch per epoch: ``train_locally``'s own shuffling is irrelevant."""
    data = image_data(24, seed=1)
    start = get_weights(cnn)
    train_proximal(cnn, data, epochs=3, batch_size=64, learning_rate=0.2, proximal_mu=0.0)
    ours = get_weights(cnn)
    set_weights(cnn, start)
    train_locally(cnn, data, epochs=3, batch_size=64, learning_rate=0.2)
    fedavg = get_weights(cnn)
    set_weights(cnn, start)
    for key in ours:
        np.testing.assert_allclose(ours[key] - start[key], fedavg[key] - start[key],
                                   rtol=1e-4, atol=1e-7)


@pytest.mark.usefixtures("float64_loss")
def test_one_step_adds_exactly_the_proximal_pull_on_shared_variables() -> None:
    model = tiny_float64()
    rng = np.random.default_rng(2)
    data = LabeledData(x=rng.normal(size=(7, 5)), y=rng.integers(0, 3, 7),
                       num_classes=3, kind="tabular", name="t")
    start = get_weights(model)
    w_global = shifted(start, 0.3, seed=4)
    lr, mu = 0.125, 2.0  # exact in float32, the dtype the step gets them in
    train_proximal(model, data, epochs=1, batch_size=7, learning_rate=lr, proximal_mu=0.0,
                   global_weights=w_global, shared_paths=HEAD)
    plain = get_weights(model)
    set_weights(model, start)
    train_proximal(model, data, epochs=1, batch_size=7, learning_rate=lr, proximal_mu=mu,
                   global_weights=w_global, shared_paths=HEAD)
    prox = get_weights(model)
    for key in start:
        pull = -lr * mu * (start[key] - w_global[key]) if key in HEAD else 0.0
        np.testing.assert_allclose(prox[key], plain[key] + pull, rtol=1e-10, atol=1e-12)


def test_larger_mu_stays_closer_to_the_global_model(cnn: keras.Model) -> None:
    data = image_data(40, seed=2)
    start = get_weights(cnn)
    distances = []
    for mu in (0.0, 10.0):
        set_weights(cnn, start)
        train_proximal(cnn, data, epochs=3, batch_size=8, learning_rate=0.05, proximal_mu=mu)
        moved = get_weights(cnn)
        distances.append(np.sqrt(sum(np.sum((moved[k] - start[k]) ** 2) for k in start)))
    set_weights(cnn, start)
    assert distances[1] < 0.8 * distances[0]


# ----------------------------------------------------------------- order, errors
def test_data_order_is_seeded(cnn: keras.Model) -> None:
    data = image_data(30, seed=3)
    start = get_weights(cnn)
    runs = []
    for seed in (1, 1, 2):
        set_weights(cnn, start)
        train_proximal(cnn, data, epochs=1, batch_size=4, learning_rate=0.1,
                       proximal_mu=0.1, seed=seed)
        runs.append(get_weights(cnn)["cnn/head/kernel"])
    set_weights(cnn, start)
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    orders = epoch_orders(10, 3, seed=0)
    assert all(sorted(o) == list(range(10)) for o in orders)
    assert not np.array_equal(orders[0], orders[1])
    assert len({local_seed(42, r, p) for r in range(1, 4) for p in range(5)}) == 15
    assert local_seed(42, 1, 0) == local_seed(42, 1, 0)


def test_bad_arguments_are_refused(cnn: keras.Model) -> None:
    data = image_data(4)
    with pytest.raises(ValueError, match="proximal-mu"):
        train_proximal(cnn, data, epochs=1, batch_size=2, learning_rate=0.1, proximal_mu=-1.0)
    with pytest.raises(KeyError, match="not variables"):
        train_proximal(cnn, data, epochs=1, batch_size=2, learning_rate=0.1, proximal_mu=0.1,
                       shared_paths={"cnn/nope/kernel"})
    with pytest.raises(KeyError, match="no value"):
        train_proximal(cnn, data, epochs=1, batch_size=2, learning_rate=0.1, proximal_mu=0.1,
                       global_weights={})
