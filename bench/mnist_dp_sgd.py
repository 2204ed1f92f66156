"""Centralised DP-SGD on MNIST at sample-level epsilon ~1, 3 and 8.

The sample-level reference measurement for the client-side DP-SGD of
:mod:`clients.dp_sgd`: the same trainer (ghost-norm clipping, Poisson
batches, Gaussian noise) on the 60,000 MNIST training images as one dataset,
evaluated on the 10,000 test images, next to tensorflow-privacy's published
DP-SGD results (tutorials/README.md: eps 1.20 -> 95.0%, 2.92 -> 96.6%,
9.74 -> 97.3%; clip 1.0, batch 256, delta 1e-5, their small CNN).

For each target epsilon the noise multiplier is calibrated with the
accountant of :mod:`privacy.sample_accounting` (dp-accounting RDP, Poisson
sampling) for the given epochs, batch size and delta.

Usage::

    uv run python bench/mnist_dp_sgd.py --targets 1 3 8 --epochs 10 15 15 \\
        --learning-rates 0.32 0.25 0.4 --out bench/results/mnist_dp_sgd.md

``--model tfp`` (default) is tensorflow-privacy's tutorial CNN (conv8x8-16
stride 2, pool, conv4x4-32 stride 2, pool, FC32, logits); ``--model fedavg``
is the project's FedAvg CNN (``clients.models.build_cnn``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy.optimize import brentq  # noqa: E402

from bench.common import MNIST_PATH as MNIST  # noqa: E402
from bench.common import Samples, append_results, table  # noqa: E402
PUBLISHED = "tf-privacy tutorial (clip 1.0, batch 256, delta 1e-5): eps 1.20 -> 95.0%, 2.92 -> 96.6%, 9.74 -> 97.3%"


def load(samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with np.load(MNIST) as data:
        x_train = data["x_train"][:samples].astype(np.float32)[..., None] / 255.0
        y_train = data["y_train"][:samples].astype(np.int64)
        x_test = data["x_test"].astype(np.float32)[..., None] / 255.0
        y_test = data["y_test"].astype(np.int64)
    return x_train, y_train, x_test, y_test


def tfp_cnn(seed: int):
    """tensorflow-privacy's MNIST tutorial CNN, in Keras 3, with logits out."""
    import keras

    init = keras.initializers.GlorotUniform
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            keras.layers.Conv2D(16, 8, strides=2, padding="same", activation="relu",
                                kernel_initializer=init(seed), name="conv-1"),
            keras.layers.MaxPooling2D(2, 1, name="pool-1"),
            keras.layers.Conv2D(32, 4, strides=2, padding="valid", activation="relu",
                                kernel_initializer=init(seed + 1), name="conv-2"),
            keras.layers.MaxPooling2D(2, 1, name="pool-2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(32, activation="relu", kernel_initializer=init(seed + 2),
                               name="dense-1"),
            keras.layers.Dense(10, kernel_initializer=init(seed + 3), name="logits"),
        ],
        name="tfp-cnn",
    )


def calibrate(target: float, n: int, batch: int, epochs: int, delta: float) -> float:
    """Smallest noise multiplier whose sample-level epsilon is at most ``target``."""
    from privacy.sample_accounting import sample_epsilon

    def gap(z: float) -> float:
        return sample_epsilon(n, batch, epochs, 1, z, delta) - target

    return float(brentq(gap, 0.3, 20.0, xtol=1e-4)) + 1e-4


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    out = model.predict(x, batch_size=1000, verbose=0)
    return float(np.mean(np.argmax(out, axis=1) == y))


def run(
    target: float, epochs: int, lr: float, noise: float | None, args: argparse.Namespace, data
) -> dict:
    from clients.dp_sgd import DPSGDTrainer
    from clients.models import build_cnn
    from privacy.sample_accounting import sample_epsilon
    from data.dataset import LabeledData

    x_train, y_train, x_test, y_test = data
    n = len(x_train)
    z = noise if noise is not None else calibrate(target, n, args.batch_size, epochs, args.delta)
    eps = sample_epsilon(n, args.batch_size, epochs, 1, z, args.delta)
    model = tfp_cnn(args.seed) if args.model == "tfp" else build_cnn((28, 28, 1), 10, seed=args.seed)
    trainer = DPSGDTrainer(model)  # noise and batches: fresh OS entropy
    train = LabeledData(x=x_train, y=y_train, num_classes=10, kind="image", name="mnist")
    curve, epoch_s = [], []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        result = trainer.train(train, epochs=1, batch_size=args.batch_size, learning_rate=lr,
                               noise_multiplier=z, clipping_norm=args.clip)
        epoch_s.append(time.perf_counter() - epoch_start)
        acc = accuracy(model, x_test, y_test)
        curve.append(acc)
        print(f"target {target}: epoch {epoch}/{epochs} loss {result.loss:.3f} "
              f"test acc {acc:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"target": target, "epsilon": eps, "z": z, "epochs": epochs, "lr": lr,
            "accuracy": curve[-1], "best": max(curve), "seconds": time.perf_counter() - start,
            "epoch_s": epoch_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 15, 15])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[0.32, 0.25, 0.4])
    parser.add_argument(
        "--noise-multipliers", type=float, nargs="+", default=None,
        help="fixed noise multipliers (e.g. a published recipe) instead of calibrating to --targets",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--model", choices=["tfp", "fedavg"], default="tfp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="append the results to this file")
    args = parser.parse_args()
    if not len(args.targets) == len(args.epochs) == len(args.learning_rates):
        parser.error("--targets, --epochs and --learning-rates need one value each per run")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: F401  (so that the machine line names its version)

    started = time.time()
    data = load(args.samples)
    rows = []
    noises = args.noise_multipliers or [None] * len(args.targets)
    if len(noises) != len(args.targets):
        parser.error("--noise-multipliers needs one value per run")
    for target, epochs, lr, noise in zip(args.targets, args.epochs, args.learning_rates, noises):
        rows.append(run(target, epochs, lr, noise, args, data))
    append_results(
        args.out, "Centralised DP-SGD on MNIST",
        f"Targets {args.targets}, epochs {args.epochs}, learning rates {args.learning_rates}, "
        f"noise {args.noise_multipliers or 'calibrated'}, model {args.model}, "
        f"batch {args.batch_size} (Poisson), clip {args.clip}, delta {args.delta}, "
        f"{args.samples} training samples, seed {args.seed} (one run per target: accuracy is "
        f"that run's; epoch time is median (min-max) over its epochs). Published reference: "
        f"{PUBLISHED}.\n\n"
        + table(["target eps", "eps (RDP, dp-accounting)", "noise z", "epochs", "lr",
                 "test acc (final)", "best epoch", "epoch s", "total s"],
                [[f"{r['target']:g}", f"{r['epsilon']:.2f}", f"{r['z']:.3f}", r["epochs"],
                  f"{r['lr']:g}", f"{100 * r['accuracy']:.1f}%", f"{100 * r['best']:.1f}%",
                  Samples(r["epoch_s"]).fmt(digits=3), f"{r['seconds']:.0f}"] for r in rows]),
        started=started,
    )

if __name__ == "__main__":
    main()
