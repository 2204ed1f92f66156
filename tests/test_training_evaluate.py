"""``clients.training.evaluate``: the one-pass evaluation gives ``model.evaluate``'s figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from clients.models import build_model  # noqa: E402
from clients.training import ModelSpec, evaluate, get_model  # noqa: E402
from clients.weights import get_weights, set_weights  # noqa: E402
from data.dataset import LabeledData  # noqa: E402


def data(kind: str, n: int, seed: int = 0) -> LabeledData:
    rng = np.random.default_rng(seed)
    shape = (8, 8, 1) if kind == "image" else (13,)
    return LabeledData(
        x=rng.normal(size=(n, *shape)).astype(np.float32),
        y=rng.integers(0, 10, size=n).astype(np.int64),
        num_classes=10, kind=kind, name=f"random-{kind}",
    )


def compiled(kind: str, seed: int = 3, loss: object = "sparse_categorical_crossentropy"):
    shape = (8, 8, 1) if kind == "image" else (13,)
    model = build_model(kind, shape, 10, seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss, metrics=["accuracy"])
    return model


def keras_figures(model, dataset: LabeledData, batch_size: int) -> tuple[float, float]:
    loss, accuracy = model.evaluate(dataset.x, dataset.y, batch_size=batch_size, verbose=0)
    return float(loss), float(accuracy)


@pytest.mark.parametrize("kind", ["image", "tabular"])
@pytest.mark.parametrize("n, batch_size", [(300, 64), (37, 256), (256, 256)])
def test_same_loss_and_accuracy_as_model_evaluate(kind: str, n: int, batch_size: int) -> None:
    model, dataset = compiled(kind), data(kind, n)
    loss, accuracy = evaluate(model, dataset, batch_size=batch_size)
    expected_loss, expected_accuracy = keras_figures(model, dataset, batch_size)
    assert loss == pytest.approx(expected_loss, abs=1e-5, rel=1e-5)
    assert accuracy == pytest.approx(expected_accuracy, abs=1e-6)


def test_follows_the_weights_between_calls() -> None:
    """The compiled pass is cached per model; it must read the weights as they are now."""
    model, dataset = compiled("image"), data("image", 120, seed=1)
    first = evaluate(model, dataset)
    other = get_weights(compiled("image", seed=11))
    set_weights(model, other)
    second = evaluate(model, dataset)
    assert second != pytest.approx(first)
    expected = keras_figures(model, dataset, 256)
    assert second[0] == pytest.approx(expected[0], abs=1e-5, rel=1e-5)
    assert second[1] == pytest.approx(expected[1], abs=1e-6)


def test_a_trained_model_of_get_model() -> None:
    """The process's cached model (what the apps evaluate), after some training."""
    model = get_model(ModelSpec("tabular", (13,), 10, seed=5))
    dataset = data("tabular", 200, seed=2)
    model.fit(dataset.x, dataset.y, epochs=2, batch_size=16, verbose=0)
    loss, accuracy = evaluate(model, dataset)
    expected_loss, expected_accuracy = keras_figures(model, dataset, 256)
    assert loss == pytest.approx(expected_loss, abs=1e-5, rel=1e-5)
    assert accuracy == pytest.approx(expected_accuracy, abs=1e-6)


def test_another_loss_falls_back_to_model_evaluate() -> None:
    model = compiled("tabular", loss=keras.losses.SparseCategoricalCrossentropy())
    dataset = data("tabular", 50, seed=4)
    assert evaluate(model, dataset) == pytest.approx(keras_figures(model, dataset, 256))
    assert not hasattr(model, "_fedprivacy_evaluation_step")


def test_empty_data_is_nan() -> None:
    loss, accuracy = evaluate(compiled("tabular"), data("tabular", 0))
    assert math.isnan(loss) and math.isnan(accuracy)
