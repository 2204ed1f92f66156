"""Keras 3 models: a CNN with pooling for images, an MLP for tables, McMahan et al.'s 2NN.

Every layer has an explicit name, so variable paths (``cnn/conv-1/kernel``) are
the same in every process however many models were built before; the server
and the clients key their arrays by these paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import keras


def build_cnn(
    input_shape: tuple[int, ...], num_classes: int, *, seed: int = 0
) -> keras.Model:
    """Two conv + max-pool blocks, a dense layer and a softmax head.

    The architecture follows the CNN of McMahan et al. (2017), "Communication-
    Efficient Learning of Deep Networks from Decentralized Data" (conv5x5-32,
    pool, conv5x5-64, pool, FC512, softmax), scaled to the input: 28x28 inputs
    get the paper's sizes; small inputs such as 8x8 digits get 3x3 kernels and
    narrower layers so that two 2x2 poolings still leave a feature map.
    """
    import keras

    height, width = input_shape[0], input_shape[1]
    large = min(height, width) >= 20
    kernel = 5 if large else 3
    filters = (32, 64) if large else (16, 32)
    units = 512 if large else 64
    init = keras.initializers.GlorotUniform
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, name="image"),
            keras.layers.Conv2D(
                filters[0], kernel, padding="same", activation="relu",
                kernel_initializer=init(seed), name="conv-1",
            ),
            keras.layers.MaxPooling2D(2, name="pool-1"),
            keras.layers.Conv2D(
                filters[1], kernel, padding="same", activation="relu",
                kernel_initializer=init(seed + 1), name="conv-2",
            ),
            keras.layers.MaxPooling2D(2, name="pool-2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(
                units, activation="relu", kernel_initializer=init(seed + 2),
                name="dense-1",
            ),
            keras.layers.Dense(
                num_classes, activation="softmax",
                kernel_initializer=init(seed + 3), name="head",
            ),
        ],
        name="cnn",
    )


#: Values of the ``model`` run-config key.
MODELS = ("default", "cnn", "mlp", "2nn")


def build_mlp(
    input_shape: tuple[int, ...], num_classes: int, *, seed: int = 0
) -> keras.Model:
    """Two hidden ReLU layers (64, 32) and a softmax head; images are flattened first.

    The tables' default, and a small model (52,650 parameters on MNIST) for
    user-level DP, whose noise grows with the square root of the parameter count.
    """
    import keras

    init = keras.initializers.GlorotUniform
    flatten = [keras.layers.Flatten(name="flatten")] if len(input_shape) > 1 else []
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, name="features"),
            *flatten,
            keras.layers.Dense(
                64, activation="relu", kernel_initializer=init(seed), name="dense-1"
            ),
            keras.layers.Dense(
                32, activation="relu", kernel_initializer=init(seed + 1),
                name="dense-2",
            ),
            keras.layers.Dense(
                num_classes, activation="softmax",
                kernel_initializer=init(seed + 2), name="head",
            ),
        ],
        name="mlp",
    )


def build_2nn(
    input_shape: tuple[int, ...], num_classes: int, *, seed: int = 0
) -> keras.Model:
    """The 2NN of McMahan et al. (2017), https://arxiv.org/abs/1602.05629: two 200-unit ReLU layers.

    199,210 parameters on MNIST; TensorFlow Federated's DP tutorial trains it
    with user-level DP on EMNIST.
    """
    import keras

    init = keras.initializers.GlorotUniform
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, name="features"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(200, activation="relu", kernel_initializer=init(seed),
                               name="dense-1"),
            keras.layers.Dense(200, activation="relu", kernel_initializer=init(seed + 1),
                               name="dense-2"),
            keras.layers.Dense(num_classes, activation="softmax",
                               kernel_initializer=init(seed + 2), name="head"),
        ],
        name="2nn",
    )


def build_model(
    kind: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int = 0,
    architecture: str = "default",
) -> keras.Model:
    """Build a model for a data kind.

    Parameters
    ----------
    kind : {"image", "tabular"}
        The data's kind; ``architecture="default"`` picks the CNN for images
        and the MLP for tables.
    architecture : {"default", "cnn", "mlp", "2nn"}
        The ``model`` run-config key. The CNN needs images.
    """
    if kind not in ("image", "tabular"):
        raise ValueError(f"unknown data kind {kind!r}: expected 'image' or 'tabular'")
    if architecture not in MODELS:
        raise ValueError(f"unknown model {architecture!r}: expected one of {MODELS}")
    if architecture == "default":
        architecture = "cnn" if kind == "image" else "mlp"
    if architecture == "cnn":
        if kind != "image":
            raise ValueError("model 'cnn' needs image data; use 'mlp' or '2nn' for tables")
        return build_cnn(input_shape, num_classes, seed=seed)
    if architecture == "2nn":
        return build_2nn(input_shape, num_classes, seed=seed)
    return build_mlp(input_shape, num_classes, seed=seed)
