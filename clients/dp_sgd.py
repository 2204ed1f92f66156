"""DP-SGD for Keras 3 models: per-example clipping, Gaussian noise, Poisson batches.

One DP-SGD step (Abadi et al. 2016, "Deep Learning with Differential
Privacy", Alg. 1) on a Poisson-sampled batch ``S``:

.. math::

    \\theta \\leftarrow \\theta - \\frac{\\eta}{q n}\\Big(\\sum_{i \\in S}
    g_i \\min\\big(1, C / \\lVert g_i \\rVert\\big) + \\mathcal N(0, z^2 C^2 I)\\Big)

where ``g_i`` is example ``i``'s gradient over *all* trainable variables.
tensorflow-privacy's DP optimizers subclass Keras-2 optimizers and fail under
Keras 3 (tensorflow-privacy 0.9.0 with TF 2.21), so the step is implemented here on plain TF
ops and updates the compiled model's own variables.

Per-example gradient norms, two ways:

``"ghost"`` (the fast path, for ``keras.Sequential`` models)
    One forward pass records each layer's input ``a`` and pre-activation
    output ``s``; one backward pass of the summed loss gives every
    ``dL_i/ds_i`` (example ``i``'s loss depends only on its own row).
    For a ``Dense`` layer on flat inputs the per-example kernel gradient is
    the outer product ``a_i g_i^T``, whose norm is ``|a_i| |g_i|``
    (Goodfellow 2015, "Efficient Per-Example Gradient Computations"). For a
    ``Conv2D`` (or a ``Dense`` on sequences) the gradient is ``U_i^T g_i`` with
    ``U_i`` the unfolded input patches, built as one shifted slice of the
    input per kernel tap (:func:`_shifted_inputs`; on this CPU about 1.6x
    faster than ``tf.image.extract_patches`` followed by one matmul). Its
    norm is taken from the ``T x T`` Gram matrices, ``<U_i U_i^T, g_i g_i^T>``
    (ghost norm, Li et al. 2022, "Large Language Models Can Be Strong
    Differentially Private Learners"), or from ``U_i^T g_i`` itself, whichever
    costs fewer flops (:func:`norm_mode`). The clipped sum is then
    formed from the same ``a`` and ``g`` with the clip factors folded into
    ``g`` (book-keeping, Bu et al. 2023, "Differentially Private Optimization
    on Large Model at Small Cost"), so there is no second backward pass.
    Other trainable layers fall back to per-example gradients of that layer
    alone (``tf.vectorized_map`` of the layer's vector-Jacobian product);
    layers without weights (pooling, flatten, dropout) are just run.
``"vectorized"``
    Per-example gradients of the whole model with ``tf.vectorized_map``
    (the approach of tensorflow-privacy's vectorized optimizers); any model.

Batch-norm style layers mix examples and cannot be made per-example private;
they are rejected.

Batches are Poisson-sampled (each example joins each step with probability
``q = B / n``), the assumption of the accountant in
:mod:`privacy.sample_accounting`; the noisy sum is divided by the *expected*
batch size ``q n``. The step is a ``tf.function`` whose batch dimension is
``None``, so variable batch sizes do not retrace it (one trace per model).

Noise (:class:`GaussianNoise`) is drawn with NumPy and passed into the
traced step. The Gaussian mechanism's guarantee, and the accountant's (Abadi
et al. 2016, Thm. 1 and the moments accountant), hold for the untruncated
normal: a sampler that never goes beyond ``t`` sigma makes the privacy loss
infinite on outputs only one of two neighbouring datasets can produce, which
adds up to ``P(Z > t - 1/z)`` to delta per step. So the values are
``Generator.standard_normal`` float64 draws, a ziggurat whose tail beyond 3.65
sigma is sampled exactly (Marsaglia's exponential rejection): its largest
value, set by 53-bit uniforms, is about 12 sigma, beyond which the normal has
mass below 1e-32. (The earlier Box-Muller on float32 uniforms stopped at
``sqrt(2 ln 2^24) = 5.77`` sigma.) They are written into a reused float64
buffer and rounded into a reused float32 one: fresh multi-megabyte arrays per
step cost page faults, which made ``tf.random`` 2-3x as expensive per draw
here. A draw is split into fixed chunks, each with its own spawned stream,
filled by a few threads while TF is idle between steps. One draw per
parameter per step is an inherent cost of DP-SGD: for a model whose
parameters sit in one large Dense layer (the FedAvg CNN: 1.6M of its 1.66M) it
is a sizeable part of the step (bench/results/dp_sgd_epoch.md).

Every privacy-relevant draw here, the noise and the Poisson batches, comes
from :mod:`privacy.randomness`: fresh OS entropy by default, never a user seed.
``insecure_seed`` (of :class:`DPSGDTrainer`, :class:`GaussianNoise` and
:func:`dp_sgd_train`) is a test hook that makes a run replayable and so NOT
private; such a trainer says so (``private`` is False, and it logs a warning).

Examples whose gradient is not finite get clip factor 0 (dropped from the
sum) rather than poisoning it; the bound on each example's contribution,
and so the privacy guarantee, is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt
from flwr.common.logger import log

from privacy.randomness import NOT_PRIVATE, RandomSource, random_source
from privacy.sample_accounting import expected_batch_size, num_steps, sampling_rate

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import tensorflow as tf

    from data.dataset import LabeledData

Method = Literal["auto", "ghost", "vectorized"]
METHODS: tuple[str, ...] = ("auto", "ghost", "vectorized")
LossFn = Callable[["tf.Tensor", "tf.Tensor"], "tf.Tensor"]

# Layers that mix the examples of a batch: no per-example gradient exists.
_BATCH_MIXING = ("BatchNormalization", "SyncBatchNormalization", "GroupNormalization")


# --------------------------------------------------------------------------- sampling


def poisson_batches(
    num_examples: int, batch_size: int, steps: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Index arrays of ``steps`` Poisson-sampled batches.

    Each example is in each batch independently with probability
    ``q = min(1, batch_size / num_examples)``; batch sizes vary (and may be 0),
    which is what the ``PoissonSampledDpEvent`` accounting assumes.

    Parameters
    ----------
    num_examples, batch_size, steps : int
        ``n``, the expected batch size ``q n`` and the number of batches.
    rng : numpy.random.Generator
        The sampling's randomness. The amplification by sampling that the
        accountant credits holds only if the batches are secret, so in a real
        run this is a generator from :mod:`privacy.randomness` (as
        :meth:`DPSGDTrainer.train` passes), not a seeded one.
    """
    q = sampling_rate(num_examples, batch_size)
    for _ in range(steps):
        yield np.flatnonzero(rng.random(num_examples) < q)


# --------------------------------------------------------------------------- model analysis


def default_loss_fn(model: keras.Model) -> LossFn:
    """Per-example sparse categorical cross-entropy, on probabilities or logits.

    The project's models end in a softmax; a last layer without one is taken
    to output logits.
    """
    import keras

    last = model.layers[-1]
    from_logits = getattr(last, "activation", None) is not keras.activations.softmax

    def loss_fn(y: tf.Tensor, out: tf.Tensor) -> tf.Tensor:
        return keras.losses.sparse_categorical_crossentropy(y, out, from_logits=from_logits)

    return loss_fn


def _layer_kind(layer: keras.layers.Layer) -> str:
    """``dense`` / ``conv2d`` (fast path), ``plain`` (no weights) or ``fallback``."""
    import keras

    if type(layer).__name__ in _BATCH_MIXING:
        raise ValueError(
            f"layer {layer.name!r} ({type(layer).__name__}) mixes examples; "
            "DP-SGD needs per-example gradients (use LayerNormalization instead)"
        )
    if not layer.trainable_variables:
        return "plain"
    plain_float = (
        layer.compute_dtype == "float32"
        and getattr(layer, "quantization_mode", None) is None
        and not getattr(layer, "lora_enabled", False)
    )
    if type(layer) is keras.layers.Dense and plain_float:
        return "dense"
    if (
        type(layer) is keras.layers.Conv2D
        and plain_float
        and layer.groups == 1
        and layer.data_format == "channels_last"
        and layer.padding in ("same", "valid")
    ):
        return "conv2d"
    return "fallback"


def layer_plan(model: keras.Model) -> list[tuple[keras.layers.Layer, str]]:
    """Each layer of a Sequential model with how its gradient norms are taken."""
    return [(layer, _layer_kind(layer)) for layer in model.layers]


def _all_layers(model: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    """Every layer inside ``model``, nested models included."""
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _all_layers(layer)


def resolve_method(model: keras.Model, method: Method) -> str:
    """``auto`` -> ``ghost`` for ``keras.Sequential`` models, else ``vectorized``."""
    import keras

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for layer in _all_layers(model):
        if type(layer).__name__ in _BATCH_MIXING:
            _layer_kind(layer)  # raises
    sequential = isinstance(model, keras.Sequential)
    if method == "ghost" and not sequential:
        raise ValueError("the ghost-norm path needs a keras.Sequential model")
    if method == "auto":
        return "ghost" if sequential else "vectorized"
    return method


# --------------------------------------------------------------------------- per-layer pieces (TF)


def _same_padding(size: int, out: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF's ``SAME`` padding (before, after) along one spatial axis."""
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _shifted_inputs(
    layer: keras.layers.Layer, a: tf.Tensor, out_hw: tuple[int, int]
) -> list[tf.Tensor]:
    """The Conv2D input seen by each kernel offset: ``kh * kw`` tensors ``(B, T, c_in)``.

    Slice ``(i, j)`` holds, for every output position, the input pixel that
    kernel tap ``(i, j)`` multiplies, so the unfolded patches are their
    concatenation and a per-example kernel gradient is one small matmul per
    tap (cheaper on CPU than ``tf.image.extract_patches``; Rochette et al.
    2019, "Efficient Per-Example Gradient Computations in Convolutional
    Neural Networks", use the same structure).
    """
    import tensorflow as tf

    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    height, width = a.shape[1], a.shape[2]
    out_h, out_w = out_hw
    if layer.padding == "same":
        top, bottom = _same_padding(height, out_h, kh, sh, dh)
        left, right = _same_padding(width, out_w, kw, sw, dw)
        a = tf.pad(a, [[0, 0], [top, bottom], [left, right], [0, 0]])
    channels = a.shape[-1]
    batch = tf.shape(a)[0]
    shifted = []
    for i in range(kh):
        for j in range(kw):
            window = a[
                :,
                i * dh : i * dh + (out_h - 1) * sh + 1 : sh,
                j * dw : j * dw + (out_w - 1) * sw + 1 : sw,
                :,
            ]
            shifted.append(tf.reshape(window, [batch, out_h * out_w, channels]))
    return shifted


def _pre_activation(layer: keras.layers.Layer, kind: str, a: tf.Tensor) -> tf.Tensor:
    """``s = a W + b`` (Dense) or ``conv(a, W) + b`` (Conv2D), as Keras computes it."""
    import tensorflow as tf

    kernel = layer.kernel.value
    if kind == "dense":
        if a.shape.rank == 2:
            s = tf.matmul(a, kernel)
        else:
            s = tf.tensordot(a, kernel, axes=[[a.shape.rank - 1], [0]])
    else:
        sh, sw = layer.strides
        dh, dw = layer.dilation_rate
        s = tf.nn.conv2d(
            a, kernel, strides=[1, sh, sw, 1], padding=layer.padding.upper(),
            dilations=[1, dh, dw, 1],
        )
    if layer.bias is not None:
        s = s + layer.bias.value
    return s


@dataclass
class _Record:
    """What the forward pass keeps of one trainable layer."""

    layer: keras.layers.Layer
    kind: str
    inputs: tf.Tensor
    outputs: tf.Tensor  # pre-activation for dense/conv2d, the layer output for fallback


def norm_mode(
    layer: keras.layers.Layer, kind: str, input_shape: Sequence[int | None],
    output_shape: Sequence[int | None],
) -> str:
    """How a fast-path layer's per-example gradient norms are computed.

    ``outer`` for a Dense layer on flat inputs (``|a_i| |g_i|``, Goodfellow
    2015); otherwise, with ``T`` output positions, ``K`` kernel taps, ``c``
    input and ``o`` output channels, ``ghost`` (Gram matrices, ``T^2 (K c + o)``
    flops per example; Li et al. 2022) when that is cheaper than
    ``per-example`` (``U_i^T g_i``, ``T K c o`` flops), as in Li et al.'s mixed
    ghost clipping.
    """
    if kind == "dense" and len(input_shape) == 2:
        return "outer"
    spatial = list(output_shape[1:-1])
    if None in spatial:
        return "per-example"
    positions = int(np.prod(spatial))
    taps = int(np.prod(layer.kernel_size)) if kind == "conv2d" else 1
    width, units = int(input_shape[-1]), int(output_shape[-1])
    ghost = positions * (taps * width + units) < taps * width * units
    return "ghost" if ghost else "per-example"


class _LayerGrads:
    """Per-example squared norms and clipped sums of one layer's gradients.

    Built from the layer's input ``a`` and the per-example output gradient
    ``g``; ``sq_norms`` is ``(B,)``, ``clipped_sum(c)`` returns the layer's
    variables' gradients of ``sum_i c_i L_i``.
    """

    def __init__(self, record: _Record, g: tf.Tensor) -> None:
        import tensorflow as tf

        self.record = record
        layer = record.layer
        self.variables = list(layer.trainable_variables)
        a = record.inputs
        self._bias = layer.bias is not None if record.kind != "fallback" else False
        if record.kind == "fallback":
            self._per_example = _fallback_per_example(layer, a, g)
            self.sq_norms = tf.add_n(
                [tf.reduce_sum(tf.reshape(t * t, [tf.shape(t)[0], -1]), 1)
                 for t in self._per_example]
            )
            return
        batch = tf.shape(a)[0]
        self._mode = norm_mode(layer, record.kind, a.shape, g.shape)
        if self._mode == "outer":
            self._a, self._g = a, g
            sq_kernel = tf.reduce_sum(a * a, 1) * tf.reduce_sum(g * g, 1)
            sq_bias = tf.reduce_sum(g * g, 1)
        else:
            g3 = tf.reshape(g, [batch, -1, g.shape[-1]])
            if record.kind == "conv2d":
                slices = _shifted_inputs(layer, a, (g.shape[1], g.shape[2]))
            else:  # Dense on (B, ..., d): one "tap", T positions
                slices = [tf.reshape(a, [batch, -1, a.shape[-1]])]
            if self._mode == "ghost":  # <U U^T, g g^T> (Li et al. 2022)
                gram_u = tf.add_n([tf.matmul(s, s, transpose_b=True) for s in slices])
                gram_g = tf.matmul(g3, g3, transpose_b=True)
                sq_kernel = tf.reduce_sum(gram_u * gram_g, [1, 2])
                self._slices = slices
            else:  # U_i^T g_i per example, tap by tap: (B, K, c, o)
                self._kernel_grads = tf.stack(
                    [tf.matmul(s, g3, transpose_a=True) for s in slices], 1
                )
                sq_kernel = tf.reduce_sum(tf.square(self._kernel_grads), [1, 2, 3])
            self._g = g3
            self._bias_grads = tf.reduce_sum(g3, 1)
            sq_bias = tf.reduce_sum(tf.square(self._bias_grads), 1)
        self.sq_norms = sq_kernel + sq_bias if self._bias else sq_kernel

    def clipped_sum(self, c: tf.Tensor) -> list[tf.Tensor]:
        """Gradients of ``sum_i c_i L_i`` for this layer's variables, in order.

        Examples with ``c_i = 0`` (non-finite gradient) contribute exactly 0,
        even where their activations are NaN or Inf.
        """
        import tensorflow as tf

        if self.record.kind == "fallback":
            return [tf.tensordot(c, _zero_nonfinite(t), 1) for t in self._per_example]
        keep = c > 0
        kernel_shape = self.record.layer.kernel.shape
        if self._mode == "outer":
            cg = tf.math.multiply_no_nan(self._g, c[:, None])
            kernel = tf.matmul(_zero_rows(self._a, keep), cg, transpose_a=True)
            bias = tf.reduce_sum(cg, 0)
        elif self._mode == "ghost":
            cg = tf.math.multiply_no_nan(self._g, c[:, None, None])
            flat_g = tf.reshape(cg, [-1, cg.shape[-1]])
            kernel = tf.stack(
                [
                    tf.matmul(
                        tf.reshape(_zero_rows(s, keep), [-1, s.shape[-1]]), flat_g,
                        transpose_a=True,
                    )
                    for s in self._slices
                ]
            )
            bias = tf.reduce_sum(cg, [0, 1])
        else:
            kernel = tf.tensordot(c, _zero_nonfinite(self._kernel_grads), 1)
            bias = tf.tensordot(c, _zero_nonfinite(self._bias_grads), 1)
        grads = [tf.reshape(kernel, kernel_shape)]
        if self._bias:
            grads.append(bias)
        return grads


def _zero_rows(t: tf.Tensor, keep: tf.Tensor) -> tf.Tensor:
    """``t`` with the examples (rows) where ``keep`` is False set to 0."""
    import tensorflow as tf

    mask = tf.reshape(keep, [-1] + [1] * (t.shape.rank - 1))
    return tf.where(mask, t, tf.zeros_like(t))


def _fallback_per_example(
    layer: keras.layers.Layer, a: tf.Tensor, g: tf.Tensor
) -> list[tf.Tensor]:
    """Per-example gradients of one layer's variables: vectorised VJPs."""
    import tensorflow as tf

    variables = list(layer.trainable_variables)

    def one(args: tuple[tf.Tensor, tf.Tensor]) -> list[tf.Tensor]:
        ai, gi = args
        with tf.GradientTape() as tape:
            out = layer(ai[None], training=True)
        return tape.gradient(out, variables, output_gradients=gi[None])

    return tf.vectorized_map(one, (a, g))


# --------------------------------------------------------------------------- the trainer


class DPSGDTrainer:
    """DP-SGD steps on a compiled Keras 3 model, traced once per model.

    Parameters
    ----------
    model : keras.Model
        The model whose trainable variables are updated in place.
    method : {"auto", "ghost", "vectorized"}
        How per-example gradient norms are computed (module docstring).
    loss_fn : callable, optional
        ``loss_fn(y, out) -> (B,)`` per-example losses; default
        :func:`default_loss_fn`.
    insecure_seed : int, optional
        Test hook: seeds the noise and the batch sampling so that runs
        replay. The result is NOT private (anyone with the seed regenerates
        the noise). ``None`` (the default): fresh OS entropy
        (:mod:`privacy.randomness`).

    Attributes
    ----------
    source : privacy.randomness.RandomSource
        Where the noise and the batches of :meth:`train` come from.

    Notes
    -----
    ``clipping_norm``, ``noise_multiplier``, the learning rate and the
    denominator are passed to the traced step as tensors, so changing them
    between calls does not retrace.
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        method: Method = "auto",
        loss_fn: LossFn | None = None,
        insecure_seed: int | None = None,
    ) -> None:
        import tensorflow as tf

        self.model = model
        self.method = resolve_method(model, method)
        self.loss_fn = loss_fn or default_loss_fn(model)
        self.variables = list(model.trainable_variables)
        self._sizes = [int(np.prod(v.shape)) for v in self.variables]
        self._num_params = sum(self._sizes)
        self.plan = layer_plan(model) if self.method == "ghost" else []
        self.traces = 0
        self._noise = GaussianNoise(self._num_params)
        self.set_insecure_seed(insecure_seed)
        x_spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
        y_spec = tf.TensorSpec([None], tf.int64)
        scalar = tf.TensorSpec([], tf.float32)
        self._sum_fn = tf.function(
            self._clipped_sum_and_loss, input_signature=[x_spec, y_spec, scalar],
            autograph=False,
        )
        hyper = tf.TensorSpec([4], tf.float32)  # clip, noise multiplier, lr, denominator
        flat = tf.TensorSpec([self._num_params], tf.float32)  # N(0, 1) per parameter
        self._step_fn = tf.function(
            self._step, input_signature=[x_spec, y_spec, hyper, flat], autograph=False
        )
        self._noise_fn = tf.function(
            self._noise_only, input_signature=[hyper, flat], autograph=False
        )
        self._noisy_sum_fn = tf.function(
            self._noisy_sum, input_signature=[x_spec, y_spec, scalar, scalar, flat],
            autograph=False,
        )
        if self.method == "ghost":
            fallback = [layer.name for layer, kind in self.plan if kind == "fallback"]
            if fallback:
                log(INFO, "DP-SGD: per-example fallback for layers %s", fallback)

    def set_insecure_seed(self, insecure_seed: int | None) -> None:
        """Replace the noise and batch randomness; the buffers are kept.

        Parameters
        ----------
        insecure_seed : int or None
            A seed (test hook; the trainer is then NOT private), or ``None``
            for fresh OS entropy on every draw.
        """
        self.source: RandomSource = random_source(insecure_seed)
        self._noise.source = self.source
        if insecure_seed is not None:
            log(WARNING, "DP-SGD noise and batches seeded (insecure_seed=%d): %s",
                insecure_seed, NOT_PRIVATE)

    @property
    def private(self) -> bool:
        """False when the noise and batches can be replayed from a seed."""
        return self.source.private

    # ---- traced pieces

    def _ghost(self, x: tf.Tensor, y: tf.Tensor, clip: tf.Tensor) -> tuple[list, tf.Tensor]:
        import tensorflow as tf

        records: list[_Record] = []
        with tf.GradientTape() as tape:
            h = x
            for layer, kind in self.plan:
                if kind in ("dense", "conv2d"):
                    s = _pre_activation(layer, kind, h)
                    records.append(_Record(layer, kind, h, s))
                    h = layer.activation(s) if layer.activation is not None else s
                elif kind == "fallback":
                    out = layer(h, training=True)
                    records.append(_Record(layer, kind, h, out))
                    h = out
                else:
                    h = layer(h, training=True)
            losses = self.loss_fn(y, h)
            total = tf.reduce_sum(losses)
        outputs_grads = tape.gradient(total, [r.outputs for r in records])
        pieces = [_LayerGrads(r, g) for r, g in zip(records, outputs_grads)]
        norms = tf.sqrt(tf.add_n([p.sq_norms for p in pieces]))
        c = _clip_factors(norms, clip)
        grads: dict[int, tf.Tensor] = {}
        for piece in pieces:
            for variable, grad in zip(piece.variables, piece.clipped_sum(c)):
                grads[id(variable)] = grad
        return [grads[id(v)] for v in self.variables], losses

    def _vectorized(self, x: tf.Tensor, y: tf.Tensor, clip: tf.Tensor) -> tuple[list, tf.Tensor]:
        import tensorflow as tf

        variables = self.variables

        def one(args: tuple[tf.Tensor, tf.Tensor]) -> tuple[list[tf.Tensor], tf.Tensor]:
            xi, yi = args
            with tf.GradientTape() as tape:
                loss = self.loss_fn(yi[None], self.model(xi[None], training=True))[0]
            return tape.gradient(loss, variables), loss

        per_example, losses = tf.vectorized_map(one, (x, y))
        sq = tf.add_n(
            [tf.reduce_sum(tf.reshape(t * t, [tf.shape(t)[0], -1]), 1) for t in per_example]
        )
        c = _clip_factors(tf.sqrt(sq), clip)
        return [tf.tensordot(c, _zero_nonfinite(t), 1) for t in per_example], losses

    def _clipped_sum_and_loss(
        self, x: tf.Tensor, y: tf.Tensor, clip: tf.Tensor
    ) -> tuple[list[tf.Tensor], tf.Tensor]:
        self.traces += 1
        if self.method == "ghost":
            return self._ghost(x, y, clip)
        return self._vectorized(x, y, clip)

    def _noisy(
        self, sums: Sequence[tf.Tensor], clip: tf.Tensor, noise: tf.Tensor, flat: tf.Tensor
    ) -> list[tf.Tensor]:
        """``sums`` plus ``z C`` times the standard normal vector ``flat``, split per variable."""
        import tensorflow as tf

        std = noise * clip
        chunks = tf.split(flat, self._sizes)
        return [
            total + std * tf.reshape(chunk, total.shape) for total, chunk in zip(sums, chunks)
        ]

    def _apply(
        self, sums: Sequence[tf.Tensor], clip: tf.Tensor, noise: tf.Tensor,
        learning_rate: tf.Tensor, denominator: tf.Tensor, flat: tf.Tensor,
    ) -> None:
        scale = learning_rate / denominator
        for variable, noisy in zip(self.variables, self._noisy(sums, clip, noise, flat)):
            variable.assign_sub(scale * noisy)

    def _noisy_sum(
        self, x: tf.Tensor, y: tf.Tensor, clip: tf.Tensor, noise: tf.Tensor, flat: tf.Tensor
    ) -> list[tf.Tensor]:
        sums, _ = self._clipped_sum_and_loss(x, y, clip)
        return self._noisy(sums, clip, noise, flat)

    def _step(
        self, x: tf.Tensor, y: tf.Tensor, hyper: tf.Tensor, flat: tf.Tensor
    ) -> tf.Tensor:
        import tensorflow as tf

        clip, noise, learning_rate, denominator = tf.unstack(hyper)
        sums, losses = self._clipped_sum_and_loss(x, y, clip)
        self._apply(sums, clip, noise, learning_rate, denominator, flat)
        return tf.reduce_sum(_zero_nonfinite(losses))

    def _noise_only(self, hyper: tf.Tensor, flat: tf.Tensor) -> tf.Tensor:
        import tensorflow as tf

        clip, noise, learning_rate, denominator = tf.unstack(hyper)
        zeros = [tf.zeros(v.shape) for v in self.variables]
        self._apply(zeros, clip, noise, learning_rate, denominator, flat)
        return tf.constant(0.0)

    # ---- public API

    def clipped_gradient_sum(
        self, x: np.ndarray, y: np.ndarray, clipping_norm: float
    ) -> list[np.ndarray]:
        """``sum_i clip(g_i, C)`` over the batch, one array per trainable variable."""
        sums, _ = self._sum_fn(
            np.asarray(x, np.float32), np.asarray(y, np.int64), np.float32(clipping_norm)
        )
        return [t.numpy() for t in sums]

    def noisy_gradient_sum(
        self, x: np.ndarray, y: np.ndarray, clipping_norm: float, noise_multiplier: float
    ) -> list[np.ndarray]:
        """:meth:`clipped_gradient_sum` plus ``N(0, (z C)^2)`` per coordinate."""
        sums = self._noisy_sum_fn(
            np.asarray(x, np.float32), np.asarray(y, np.int64),
            np.float32(clipping_norm), np.float32(noise_multiplier), self._noise.draw(),
        )
        return [t.numpy() for t in sums]

    def step(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        clipping_norm: float,
        noise_multiplier: float,
        learning_rate: float,
        denominator: float,
    ) -> float:
        """One DP-SGD update from batch ``(x, y)``; returns the batch's summed loss.

        ``denominator`` is the expected batch size ``q n`` (not ``len(x)``).
        An empty batch still takes the noise-only step the accountant counts.
        """
        hyper = _hyper(clipping_norm, noise_multiplier, learning_rate, denominator)
        return self._step_hyper(x, y, hyper)

    def _step_hyper(self, x: np.ndarray, y: np.ndarray, hyper: tf.Tensor) -> float:
        flat = self._noise.draw()
        if len(y) == 0:
            return float(self._noise_fn(hyper, flat))
        return float(
            self._step_fn(np.asarray(x, np.float32), np.asarray(y, np.int64), hyper, flat)
        )

    def train(
        self,
        data: LabeledData,
        *,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        noise_multiplier: float,
        clipping_norm: float,
    ) -> DPSGDResult:
        """``num_steps(n, B, epochs)`` Poisson-sampled DP-SGD steps on ``data``.

        The batches come from one generator of :attr:`source` per call (fresh
        OS entropy unless an insecure seed was set), the noise from a new one
        per step.
        """
        n = len(data)
        steps = num_steps(n, batch_size, epochs)
        if steps == 0:
            return DPSGDResult(loss=float("nan"), steps=0, num_examples=n)
        denominator = expected_batch_size(n, batch_size)
        window = max(1, steps // max(1, epochs))  # the last epoch's worth of steps
        loss_sum, loss_count = 0.0, 0
        hyper = _hyper(clipping_norm, noise_multiplier, learning_rate, denominator)
        rng = self.source.generator()
        for index, batch in enumerate(poisson_batches(n, batch_size, steps, rng)):
            batch_loss = self._step_hyper(data.x[batch], data.y[batch], hyper)
            if index >= steps - window:
                loss_sum += batch_loss
                loss_count += len(batch)
        loss = loss_sum / loss_count if loss_count else float("nan")
        return DPSGDResult(loss=loss, steps=steps, num_examples=n)


def _hyper(
    clipping_norm: float, noise_multiplier: float, learning_rate: float, denominator: float
) -> tf.Tensor:
    """The step's hyper-parameters as one tensor (converted once per run, not per step)."""
    import tensorflow as tf

    if clipping_norm <= 0:
        raise ValueError(f"clipping norm must be > 0, got {clipping_norm}")
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if denominator <= 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    return tf.constant(
        [clipping_norm, noise_multiplier, learning_rate, denominator], dtype=tf.float32
    )


#: Values per independently seeded chunk of a noise draw. The layout is fixed
#: (not derived from the thread count), so a seeded draw is the same on every
#: machine; 2^18 float64 values (2 MiB) make a chunk's seeding, a few
#: microseconds, negligible next to its ~2 ms of sampling.
NOISE_CHUNK = 1 << 18


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@cache
def _noise_pool() -> ThreadPoolExecutor:
    """Threads shared by all noise draws (the calling thread fills a share too)."""
    return ThreadPoolExecutor(max_workers=max(1, _cores() - 1), thread_name_prefix="dp-noise")


# A forked child inherits the pool object but not its threads, and the pool
# would count the parent's idle workers as its own and never run a task.
if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_noise_pool.cache_clear)


class GaussianNoise:
    """Standard normal vectors of one size, for the Gaussian mechanism, in reused buffers.

    Each value is a float64 ``numpy.random.Generator.standard_normal`` draw,
    then rounded to ``dtype``. NumPy's ziggurat samples the tail beyond 3.65
    sigma exactly, by Marsaglia's exponential rejection, rather than cutting
    it: the largest value it can return, set by 53-bit uniforms, is about 12
    sigma, and the normal's mass beyond that is below 1e-32. A cut matters
    because the Gaussian mechanism's (epsilon, delta) (Abadi et al. 2016)
    is for the untruncated normal: noise that never exceeds ``t`` sigma
    lets an output reveal which of two neighbouring datasets was used with
    probability up to ``P(Z > t - 1/z)`` per step, which the accountant does
    not charge. The previous sampler, Box-Muller on float32 uniforms (as in
    TensorFlow's float32 normal kernel), stopped at ``t = 5.77``.

    Randomness comes from :mod:`privacy.randomness`: by default a generator
    freshly seeded from OS entropy for every draw, so no state survives
    between steps and no user seed can reach it. A draw is split into
    chunks of :data:`NOISE_CHUNK` values, each filled from its own stream
    spawned from that generator (``Generator.spawn``), by up to ``threads``
    threads; NumPy releases the GIL while sampling, and TF is idle between
    steps. Drawing into preallocated buffers avoids the page faults of fresh
    multi-megabyte arrays, which made ``tf.random`` cost 2-3x as much per
    draw here; DP-SGD draws one number per parameter per step, a large share
    of its cost (bench/results/dp_sgd_epoch.md).

    Like tensorflow-privacy's noise (and any floating-point sampler), it is
    not hardened against the least-significant-bit attack of Mironov (2012).

    Parameters
    ----------
    size : int
        Length of each vector.
    insecure_seed : int, optional
        Test hook: a seed that makes the draws replayable, and the noise
        therefore NOT private. ``None`` (the default): fresh OS entropy.
    dtype : numpy dtype, default float32
        Floating dtype of the vectors (the model's; sampling is in float64).
    threads : int, optional
        Most threads filling one draw; default: this process's cores, at most
        one per chunk. The values do not depend on it.

    Attributes
    ----------
    source : privacy.randomness.RandomSource
        Gives the generator of each draw; may be replaced.
    """

    def __init__(
        self,
        size: int,
        insecure_seed: int | None = None,
        *,
        dtype: npt.DTypeLike = np.float32,
        threads: int | None = None,
    ) -> None:
        dtype = np.dtype(dtype)
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(f"noise dtype must be floating, got {dtype}")
        self.size = size
        self.source: RandomSource = random_source(insecure_seed)
        self._buffer = np.empty(size, np.float64)
        # A float64 output is the sampling buffer itself: no copy.
        self._out = self._buffer if dtype == np.float64 else np.empty(size, dtype)
        self._chunks = [
            slice(lo, min(lo + NOISE_CHUNK, size)) for lo in range(0, size, NOISE_CHUNK)
        ]
        wanted = _cores() if threads is None else threads
        self.threads = max(1, min(wanted, len(self._chunks)))

    @property
    def private(self) -> bool:
        """False when the draws can be replayed from a seed."""
        return self.source.private

    def draw(self) -> np.ndarray:
        """The next vector: the output buffer, which the next draw overwrites."""
        streams = self.source.generator().spawn(len(self._chunks))
        # Chunk i always comes from stream i, whichever thread fills it.
        shares = [range(first, len(streams), self.threads) for first in range(self.threads)]
        pending = [_noise_pool().submit(self._fill, streams, share) for share in shares[1:]]
        self._fill(streams, shares[0])
        for future in pending:
            future.result()
        return self._out

    def _fill(self, streams: Sequence[np.random.Generator], share: range) -> None:
        """Sample chunks ``share`` in float64 and round them into the output."""
        for index in share:
            chunk = self._chunks[index]
            streams[index].standard_normal(out=self._buffer[chunk])
            if self._out is not self._buffer:
                # Right after sampling, while the chunk is still in cache.
                np.copyto(self._out[chunk], self._buffer[chunk], casting="same_kind")


def _clip_factors(norms: tf.Tensor, clip: tf.Tensor) -> tf.Tensor:
    """``min(1, C / |g_i|)``; 0 for a non-finite norm (that example is dropped)."""
    import tensorflow as tf

    factors = clip / tf.maximum(norms, clip)
    return tf.where(tf.math.is_finite(norms), factors, tf.zeros_like(factors))


def _zero_nonfinite(t: tf.Tensor) -> tf.Tensor:
    import tensorflow as tf

    return tf.where(tf.math.is_finite(t), t, tf.zeros_like(t))


@dataclass(frozen=True)
class DPSGDResult:
    """Outcome of one local DP-SGD run.

    Attributes
    ----------
    loss : float
        Mean per-example training loss over the last epoch's worth of steps
        (not privatised: a statistic of the private data).
    steps : int
        DP-SGD steps taken (equals :func:`privacy.sample_accounting.num_steps`).
    num_examples : int
        ``n`` of the data trained on.
    """

    loss: float
    steps: int
    num_examples: int


_TRAINERS: dict[tuple[int, str], DPSGDTrainer] = {}


def get_trainer(model: keras.Model, method: Method = "auto") -> DPSGDTrainer:
    """This process's trainer for ``model`` (one trace per model and method).

    Kept for the life of the process, like the model cache of
    :mod:`clients.training` (the trainer holds the model, so its ``id`` stays
    unique).
    """
    key = (id(model), method)
    trainer = _TRAINERS.get(key)
    if trainer is None:
        trainer = DPSGDTrainer(model, method=method)
        _TRAINERS[key] = trainer
    return trainer


def dp_sgd_train(
    model: keras.Model,
    data: LabeledData,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    noise_multiplier: float,
    clipping_norm: float,
    insecure_seed: int | None = None,
    method: Method = "auto",
) -> DPSGDResult:
    """Train ``model`` in place with DP-SGD; the drop-in for ``train_locally``.

    Parameters
    ----------
    model : keras.Model
        A built (compiled or not) Keras 3 model, e.g. from
        :func:`clients.training.get_model`; its variables are updated.
    data : LabeledData
        The client's training data.
    epochs, batch_size : int
        Local epochs and *expected* batch size (Poisson sampling).
    learning_rate : float
        Plain SGD step size.
    noise_multiplier, clipping_norm : float
        ``z`` and ``C``: noise stddev ``z C`` on each batch sum.
    insecure_seed : int, optional
        Test hook: seeds this call's batch sampling and noise so that it
        replays; the result is NOT private. ``None`` (the default): fresh OS
        entropy (:mod:`privacy.randomness`). It applies to this call only.
    method : {"auto", "ghost", "vectorized"}
        Per-example gradient method.
    """
    trainer = get_trainer(model, method)
    # Set on every call, so that a seed never outlives the call that passed it
    # (the trainer is cached for the process).
    trainer.set_insecure_seed(insecure_seed)
    return trainer.train(
        data,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        noise_multiplier=noise_multiplier,
        clipping_norm=clipping_norm,
    )
