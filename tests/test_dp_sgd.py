"""DP-SGD for Keras 3 models: per-example clipping against a slow reference, noise, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from clients.dp_sgd import (  # noqa: E402
    DPSGDTrainer,
    GaussianNoise,
    default_loss_fn,
    dp_sgd_train,
    get_trainer,
    layer_plan,
    norm_mode,
    poisson_batches,
)
from clients.models import build_cnn, build_mlp  # noqa: E402
from privacy.sample_accounting import num_steps  # noqa: E402
from data.dataset import LabeledData  # noqa: E402


def per_example_gradients(
    model: keras.Model, x: np.ndarray, y: np.ndarray
) -> list[list[np.ndarray]]:
    """The slow reference: one eager ``GradientTape`` per example."""
    loss_fn = default_loss_fn(model)
    grads = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[i : i + 1], model(x[i : i + 1], training=True))[0]
        grads.append([g.numpy() for g in tape.gradient(loss, model.trainable_variables)])
    return grads


def clipped_reference_sum(grads: list[list[np.ndarray]], clip: float) -> list[np.ndarray]:
    """``sum_i g_i * min(1, C / |g_i|)`` with the norm over all variables."""
    total = [np.zeros_like(g, dtype=np.float64) for g in grads[0]]
    for example in grads:
        norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in example))
        factor = min(1.0, clip / norm)
        total = [t + factor * g for t, g in zip(total, example)]
    return total


def norms(grads: list[list[np.ndarray]]) -> np.ndarray:
    return np.array([math.sqrt(sum(float(np.sum(g * g)) for g in ex)) for ex in grads])


def assert_close(got: list[np.ndarray], want: list[np.ndarray], rtol: float = 2e-4) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        scale = max(float(np.max(np.abs(w))), 1e-6)
        np.testing.assert_allclose(g, w, atol=rtol * scale, rtol=rtol)


def small_cnn() -> keras.Model:
    return build_cnn((8, 8, 1), 4, seed=1)


def small_mlp() -> keras.Model:
    return build_mlp((6,), 3, seed=1)


def assorted_model() -> keras.Model:
    """Strides, 'valid' padding, dilation, a T x T ghost-norm conv, Dense on sequences,
    and a layer without a fast path (LayerNormalization) that takes the fallback."""
    init = keras.initializers.GlorotUniform
    return keras.Sequential(
        [
            keras.Input(shape=(12, 12, 2)),
            keras.layers.Conv2D(4, 4, strides=2, padding="same", activation="relu",
                                kernel_initializer=init(1), name="strided"),
            keras.layers.MaxPooling2D(2, 1),
            keras.layers.Conv2D(24, 3, padding="valid", activation="tanh",
                                kernel_initializer=init(2), name="valid"),
            keras.layers.Conv2D(32, 3, dilation_rate=1, padding="same", use_bias=False,
                                kernel_initializer=init(3), name="gram"),
            keras.layers.Reshape((9, 32)),
            keras.layers.Dense(5, activation="relu", kernel_initializer=init(4), name="seq"),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(3, activation="softmax", kernel_initializer=init(5), name="head"),
        ]
    )


def dilated_model() -> keras.Model:
    init = keras.initializers.GlorotUniform
    return keras.Sequential(
        [
            keras.Input(shape=(9, 9, 1)),
            keras.layers.Conv2D(3, 3, dilation_rate=2, padding="same", activation="relu",
                                kernel_initializer=init(1)),
            keras.layers.Conv2D(3, 2, strides=3, padding="valid", kernel_initializer=init(2)),
            keras.layers.Flatten(),
            keras.layers.Dense(2, kernel_initializer=init(3)),  # logits
        ]
    )


def batch_for(model: keras.Model, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *model.input_shape[1:])).astype(np.float32)
    y = rng.integers(0, model.output_shape[-1], size=n).astype(np.int64)
    return x, y


MODELS = {"cnn": small_cnn, "mlp": small_mlp, "assorted": assorted_model, "dilated": dilated_model}


@pytest.mark.parametrize(
    ("name", "method"),
    [(name, "ghost") for name in MODELS] + [("cnn", "vectorized"), ("mlp", "vectorized")],
)
def test_clipped_sum_equals_slow_per_example_reference(name: str, method: str) -> None:
    model = MODELS[name]()
    x, y = batch_for(model, 6)
    grads = per_example_gradients(model, x, y)
    clip = float(np.median(norms(grads)))  # about half the examples are clipped
    want = clipped_reference_sum(grads, clip)
    unclipped = clipped_reference_sum(grads, 1e9)
    assert not np.allclose(want[0], unclipped[0], rtol=1e-3)  # clipping is active
    got = DPSGDTrainer(model, method=method).clipped_gradient_sum(x, y, clip)
    assert_close(got, want)


def test_assorted_model_takes_every_path() -> None:
    model = assorted_model()
    kinds = {layer.name: kind for layer, kind in layer_plan(model)}
    assert kinds["strided"] == kinds["valid"] == kinds["gram"] == "conv2d"
    assert kinds["seq"] == kinds["head"] == "dense"
    assert kinds["norm"] == "fallback"
    assert kinds["flatten"] == "plain"
    shapes = {layer.name: (layer.input.shape, layer.output.shape) for layer in model.layers}
    modes = {
        name: norm_mode(model.get_layer(name), kinds[name], *shapes[name])
        for name in ("strided", "valid", "gram", "seq", "head")
    }
    assert modes == {
        "strided": "per-example", "valid": "ghost", "gram": "ghost",
        "seq": "per-example", "head": "outer",
    }


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_step_applies_mean_of_clipped_per_example_gradients(name: str) -> None:
    """With noise 0 the update is -lr * mean_i clip(g_i, C) (denominator = batch size)."""
    model = MODELS[name]()
    x, y = batch_for(model, 8, seed=3)
    grads = per_example_gradients(model, x, y)
    clip = float(np.quantile(norms(grads), 0.4))
    mean = [g / len(x) for g in clipped_reference_sum(grads, clip)]
    before = [v.numpy().copy() for v in model.trainable_variables]
    trainer = DPSGDTrainer(model)
    trainer.step(x, y, clipping_norm=clip, noise_multiplier=0.0, learning_rate=0.5,
                 denominator=len(x))
    applied = [(b - v.numpy()) / 0.5 for b, v in zip(before, model.trainable_variables)]
    assert_close(applied, mean, rtol=5e-4)


def test_noise_std_on_batch_sum_is_noise_multiplier_times_clip() -> None:
    model = small_cnn()  # ~9k parameters: one draw estimates the std to ~1%
    x, y = batch_for(model, 6)
    trainer = DPSGDTrainer(model, insecure_seed=1234)
    clip, z = 0.7, 1.3
    clean = np.concatenate([g.ravel() for g in trainer.clipped_gradient_sum(x, y, clip)])
    noisy = np.concatenate(
        [g.ravel() for g in trainer.noisy_gradient_sum(x, y, clip, z)]
    )
    noise = noisy - clean
    assert noise.size > 5000
    assert np.std(noise) == pytest.approx(z * clip, rel=0.03)
    assert abs(np.mean(noise)) < 4 * z * clip / math.sqrt(noise.size)
    # Gaussian shape: about 68.3% within one std.
    assert np.mean(np.abs(noise) < z * clip) == pytest.approx(0.683, abs=0.02)


def test_gaussian_noise_source_is_standard_normal() -> None:
    from scipy import stats

    source = GaussianNoise(200_001, insecure_seed=3)
    first = source.draw().copy()
    second = source.draw()
    assert first.shape == (200_001,) and first.dtype == np.float32
    assert not np.allclose(first[:100], second[:100])  # fresh numbers each draw
    assert abs(first.mean()) < 4 / math.sqrt(first.size)
    assert first.std() == pytest.approx(1.0, abs=0.01)
    assert np.mean(np.abs(first) > 2) == pytest.approx(0.0455, abs=0.002)  # two-sided tail
    assert stats.kstest(first, "norm").pvalue > 0.01
    again = GaussianNoise(10, insecure_seed=1).draw()
    np.testing.assert_array_equal(GaussianNoise(10, insecure_seed=1).draw(), again)


def test_empty_batch_step_is_pure_noise_with_that_std() -> None:
    """A Poisson batch may be empty; the step still adds N(0, (zC)^2) / (qn)."""
    model = small_mlp()
    trainer = DPSGDTrainer(model, insecure_seed=7)
    before = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    x, y = batch_for(model, 0)
    trainer.step(x, y, clipping_norm=2.0, noise_multiplier=0.8, learning_rate=0.1,
                 denominator=4.0)
    after = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    batch_sum_noise = (before - after) * 4.0 / 0.1
    assert np.std(batch_sum_noise) == pytest.approx(0.8 * 2.0, rel=0.06)


def test_noise_is_seeded_and_differs_between_steps() -> None:
    model = small_mlp()
    x, y = batch_for(model, 4)
    a = DPSGDTrainer(model, insecure_seed=5).noisy_gradient_sum(x, y, 1.0, 1.0)
    b = DPSGDTrainer(model, insecure_seed=5).noisy_gradient_sum(x, y, 1.0, 1.0)
    trainer = DPSGDTrainer(model, insecure_seed=5)
    trainer.noisy_gradient_sum(x, y, 1.0, 1.0)
    c = trainer.noisy_gradient_sum(x, y, 1.0, 1.0)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.allclose(a[0], c[0])


def test_non_finite_example_is_dropped_not_propagated() -> None:
    model = small_cnn()
    x, y = batch_for(model, 5)
    x[2] = np.nan
    keep = [0, 1, 3, 4]
    want = clipped_reference_sum(per_example_gradients(model, x[keep], y[keep]), 0.5)
    for method in ("ghost", "vectorized"):
        got = DPSGDTrainer(model, method=method).clipped_gradient_sum(x, y, 0.5)
        assert all(np.all(np.isfinite(g)) for g in got)
        assert_close(got, want)


def test_poisson_batches_include_each_example_with_probability_q() -> None:
    rng = np.random.default_rng(0)
    batches = list(poisson_batches(200, 20, 2000, rng))
    sizes = np.array([len(b) for b in batches])
    assert sizes.mean() == pytest.approx(20, rel=0.02)
    assert sizes.std() == pytest.approx(math.sqrt(200 * 0.1 * 0.9), rel=0.1)  # Binomial
    counts = np.bincount(np.concatenate(batches), minlength=200)
    assert counts.mean() / 2000 == pytest.approx(0.1, rel=0.02)
    assert counts.min() > 0.1 * 2000 * 0.7  # no example is left out systematically


def test_train_takes_accounted_steps_and_traces_once() -> None:
    model = small_mlp()
    rng = np.random.default_rng(0)
    data = LabeledData(
        x=rng.normal(size=(50, 6)).astype(np.float32),
        y=rng.integers(0, 3, 50).astype(np.int64),
        num_classes=3, kind="tabular", name="toy",
    )
    first = dp_sgd_train(model, data, epochs=2, batch_size=8, learning_rate=0.1,
                         noise_multiplier=1.0, clipping_norm=1.0, insecure_seed=0)
    second = dp_sgd_train(model, data, epochs=1, batch_size=16, learning_rate=0.05,
                          noise_multiplier=0.5, clipping_norm=2.0, insecure_seed=1)
    assert first.steps == num_steps(50, 8, 2) == 13
    assert second.steps == num_steps(50, 16, 1) == 4
    assert math.isfinite(first.loss) and math.isfinite(second.loss)
    # Varying batch sizes and hyper-parameters reuse the one trace.
    assert get_trainer(model).traces == 1


def test_learning_reduces_loss_without_noise() -> None:
    """Sanity: clipped SGD without noise fits a separable toy problem."""
    model = small_mlp()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
    data = LabeledData(x=x, y=y, num_classes=3, kind="tabular", name="toy")
    start = float(np.mean(default_loss_fn(model)(y, model(x)).numpy()))
    result = dp_sgd_train(model, data, epochs=15, batch_size=16, learning_rate=0.5,
                          noise_multiplier=0.0, clipping_norm=1.0, insecure_seed=1)
    end = float(np.mean(default_loss_fn(model)(y, model(x)).numpy()))
    assert end < 0.7 * start
    assert result.loss < start


def test_batch_normalization_is_rejected() -> None:
    model = keras.Sequential(
        [keras.Input(shape=(4,)), keras.layers.Dense(3), keras.layers.BatchNormalization(),
         keras.layers.Dense(2)]
    )
    with pytest.raises(ValueError, match="mixes examples"):
        DPSGDTrainer(model)
