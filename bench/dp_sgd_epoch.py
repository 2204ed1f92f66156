"""Cost of one DP-SGD epoch relative to a non-private epoch, same model and data.

Usage::

    uv run python bench/dp_sgd_epoch.py --repeats 9 --out bench/results/dp_sgd_epoch.md

Models: the project's CNN (the FedAvg paper's: conv5x5-32, pool, conv5x5-64,
pool, FC512, softmax) on 28x28 MNIST and the project's MLP on flattened
MNIST, ``--samples`` training examples, batch ``--batch-size``.

Variants, each timed for one epoch after a warm-up epoch (tracing excluded):

* ``fit``: ``clients.training.train_locally`` (``model.fit``, Keras' default
  XLA), the project's non-private path;
* ``loop``: a non-private SGD step in a ``tf.function`` with the same
  unknown-batch signature and Python loop as the DP trainer (no XLA), so
  the DP overhead is isolated from Keras' ``fit`` machinery;
* ``ghost``: :class:`clients.dp_sgd.DPSGDTrainer` with ghost norms;
* ``vectorized``: the same trainer with ``tf.vectorized_map`` per-example
  gradients of the whole model;
* ``ghost-no-noise``: ghost clipping without drawing the noise (not private;
  shows how much of the cost is the per-parameter Gaussian draw).

DP epochs use Poisson batches (expected size ``--batch-size``), noise 1.0,
clipping 1.0. The variants are interleaved (round-robin, order rotated each
repeat) so that load from other processes hits them alike; the table gives
wall-clock medians with min-max, the median process CPU time, and the ratio
of each DP variant to ``fit`` and to ``loop`` as the median of per-repeat
ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import MNIST_PATH as MNIST  # noqa: E402
from bench.common import append_results  # noqa: E402


def load_mnist(samples: int, flat: bool) -> tuple[np.ndarray, np.ndarray]:
    """The first ``samples`` MNIST training images in [0, 1] and their labels."""
    with np.load(MNIST) as data:
        x = data["x_train"][:samples].astype(np.float32) / 255.0
        y = data["y_train"][:samples].astype(np.int64)
    return (x.reshape(len(x), -1) if flat else x[..., None]), y


def nonprivate_loop(model, batch_size: int) -> Callable[[np.ndarray, np.ndarray, np.random.Generator], None]:
    """One epoch of plain minibatch SGD with a ``tf.function`` step (no XLA)."""
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    variables = model.trainable_variables

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, *model.input_shape[1:]], tf.float32),
            tf.TensorSpec([None], tf.int64),
        ],
        autograph=False,
    )
    def step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        for variable, grad in zip(variables, tape.gradient(loss, variables)):
            variable.assign_sub(0.01 * grad)
        return loss

    def epoch(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> None:
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            step(x[batch], y[batch])

    return epoch


def variants(kind: str, x: np.ndarray, y: np.ndarray, batch_size: int, methods: list[str]):
    """Name -> zero-argument callable running one epoch."""
    from clients.dp_sgd import DPSGDTrainer
    from clients.training import ModelSpec, get_model, train_locally
    from data.dataset import LabeledData

    data = LabeledData(x=x, y=y, num_classes=10, kind=kind, name="mnist")
    model = get_model(ModelSpec(kind, data.input_shape, 10))
    rng = np.random.default_rng(0)
    loop = nonprivate_loop(model, batch_size)
    runs: dict[str, Callable[[], object]] = {
        "fit": lambda: train_locally(
            model, data, epochs=1, batch_size=batch_size, learning_rate=0.01
        ),
        "loop": lambda: loop(x, y, rng),
    }
    trainers = {method: DPSGDTrainer(model, method=method) for method in methods}
    if "ghost" in methods:
        trainers["ghost-no-noise"] = ClipOnlyTrainer(model, method="ghost")
    for name, trainer in trainers.items():
        runs[name] = lambda trainer=trainer: trainer.train(
            data, epochs=1, batch_size=batch_size, learning_rate=0.01,
            noise_multiplier=1.0, clipping_norm=1.0,
        )
    return model, runs


def _clip_only_class():
    from clients.dp_sgd import DPSGDTrainer

    class ClipOnly(DPSGDTrainer):
        """Breakdown only, not private: per-example clipping without the noise draw."""

        def set_insecure_seed(self, insecure_seed):  # type: ignore[override]
            super().set_insecure_seed(insecure_seed)
            zeros = np.zeros(self._num_params, np.float32)
            self._noise = type("Zeros", (), {"draw": staticmethod(lambda: zeros)})()

        def _noisy(self, sums, clip, noise, flat):  # type: ignore[override]
            return list(sums)

    return ClipOnly


def ClipOnlyTrainer(*args, **kwargs):  # noqa: N802 - a class factory, used like a class
    return _clip_only_class()(*args, **kwargs)


Times = dict[str, dict[str, list[float]]]


def measure(runs: dict[str, Callable[[], object]], repeats: int, inner: int = 1) -> Times:
    """Warm each variant up once, then time ``repeats`` interleaved epochs.

    Each measurement runs ``inner`` epochs and is divided by ``inner`` (for
    models whose epoch takes milliseconds). Returns ``{"wall": {name:
    seconds}, "cpu": {name: seconds}}``; CPU time is this process's (all
    threads), less sensitive to other jobs than wall time.
    """
    for run in runs.values():
        run()
    names = list(runs)
    times: Times = {"wall": {name: [] for name in names}, "cpu": {name: [] for name in names}}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(inner):
                runs[name]()
            times["wall"][name].append((time.perf_counter() - wall) / inner)
            times["cpu"][name].append((time.process_time() - cpu) / inner)
    return times


def fmt(values: list[float]) -> str:
    """``median (min-max)`` in seconds, 3 decimals."""
    return f"{np.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def ratio(times: dict[str, list[float]], name: str, base: str) -> str:
    """Median over repeats of the per-repeat ratio ``name / base``."""
    return f"{np.median(np.array(times[name]) / np.array(times[base])):.2f}"


def table(results: dict[str, Times], params: dict[str, int]) -> str:
    lines = [
        "| model | params | variant | wall s, median (min-max) | CPU s, median "
        "| wall x fit | wall x loop | CPU x loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model_name, times in results.items():
        wall, cpu = times["wall"], times["cpu"]
        for name in wall:
            if name in ("fit", "loop"):
                vs = ["-", "-", "-"]
            else:
                vs = [ratio(wall, name, "fit"), ratio(wall, name, "loop"), ratio(cpu, name, "loop")]
            lines.append(
                f"| {model_name} | {params[model_name]:,} | {name} | {fmt(wall[name])} "
                f"| {np.median(cpu[name]):.3f} | {' | '.join(vs)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp"])
    parser.add_argument(
        "--methods", nargs="+", default=["ghost", "vectorized"], choices=["ghost", "vectorized"]
    )
    parser.add_argument(
        "--inner", type=int, nargs=2, default=[1, 10], metavar=("CNN", "MLP"),
        help="epochs per timed measurement, averaged (CNN, MLP)",
    )
    parser.add_argument("--out", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: F401  (so that the machine line names its version)

    started = time.time()
    results: dict[str, Times] = {}
    params: dict[str, int] = {}
    for name in args.models:
        x, y = load_mnist(args.samples, flat=name == "mlp")
        kind = "image" if name == "cnn" else "tabular"
        model, runs = variants(kind, x, y, args.batch_size, args.methods)
        params[name] = model.count_params()
        inner = args.inner[0] if name == "cnn" else args.inner[1]
        results[name] = measure(runs, args.repeats, inner)
        print(table({name: results[name]}, params), flush=True)

    append_results(
        args.out, "One DP-SGD epoch vs a non-private epoch",
        f"{args.samples} MNIST samples, batch {args.batch_size}, {args.repeats} repeats "
        f"(epochs per measurement: CNN {args.inner[0]}, MLP {args.inner[1]}).\n\n"
        + table(results, params),
        started=started,
    )

if __name__ == "__main__":
    main()
