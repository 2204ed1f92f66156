"""Server optimisers: the averaged client update used as a pseudo-gradient.

Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan (2021),
"Adaptive Federated Optimization", ICLR, https://arxiv.org/abs/2003.00295,
Algorithms 1 and 2: after a round the server holds the global arrays it sent,
``x_t`` (``current``), and the aggregate of the clients' models
(``averaged``). Their difference is the averaged update

    Delta_t = averaged - x_t

and ``g_t = -Delta_t = x_t - averaged`` is the *pseudo-gradient* that a server
optimiser takes a step along. With ``m_t`` and ``v_t`` the optimiser's first
and second moments of ``g_t``:

- ``sgd`` (FedAvg with a server learning rate):
  ``x_{t+1} = x_t - eta g_t``; ``eta = 1`` is plain FedAvg.
- ``momentum`` (FedAvgM, Hsu, Qi, Brown (2019), "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification",
  https://arxiv.org/abs/1909.06335): ``m_t = beta m_{t-1} + g_t``,
  ``x_{t+1} = x_t - eta m_t`` (heavy ball, no dampening, no Nesterov, as
  ``torch.optim.SGD`` and Flower's ``FedAvgM``).
- ``adam`` (FedAdam): ``m_t = beta_1 m_{t-1} + (1 - beta_1) g_t``,
  ``v_t = beta_2 v_{t-1} + (1 - beta_2) g_t^2``,
  ``x_{t+1} = x_t - eta_t m_t / (sqrt(v_t) + tau)``.
- ``yogi`` (FedYogi): as ``adam`` but
  ``v_t = v_{t-1} - (1 - beta_2) g_t^2 sign(v_{t-1} - g_t^2)`` and
  ``eta_t = eta``.

Flower compatibility
--------------------
The defaults and update rules are those of Flower 1.42's ``FedAvgM``,
``FedAdam`` and ``FedYogi`` (``flwr.serverapp.strategy``), which the tests
check on the same inputs: moments start at zero; ``FedAdam`` scales ``eta``
by the bias correction ``sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))`` where
``t`` is the server round (1 in the first round), which is Kingma and Ba's
correction shifted by one step; ``FedYogi`` has no bias correction, as in
Reddi et al.'s Algorithm 2. ``bias_correction="kingma"`` gives Kingma and
Ba's ``t`` and ``"none"`` Reddi et al.'s Algorithm 2 as printed. Our step
counter counts the optimiser's own steps, so it equals Flower's
``server_round`` as long as every round yields an update.

All arithmetic is in float64; results come back in the dtype of ``current``.
Arrays that are not floating point (none in a Keras model) are taken from
``averaged`` unchanged and carry no optimiser state.

State
-----
:meth:`state_dict` returns a flat dict: JSON-able scalars (``"name"``,
``"step"`` and the hyperparameters) and float64 arrays under
``"m/<array key>"`` / ``"v/<array key>"``. The scalars fit a Flower
``ConfigRecord``, the arrays an ``ArrayRecord``; :meth:`load_state_dict`
restores all of it (hyperparameters included, as ``torch.optim`` does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from logging import INFO
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from flwr.common.logger import log

Arrays = dict[str, np.ndarray]
BiasCorrection = Literal["flower", "kingma", "none"]

#: Names accepted by :func:`make_server_optimizer` (run-config ``server-optimizer``).
SERVER_OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam", "yogi")

#: Default server learning rate per optimiser (Flower 1.42: FedAvgM 1.0,
#: FedAdam 0.1, FedYogi 0.01).
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "sgd": 1.0,
    "momentum": 1.0,
    "adam": 0.1,
    "yogi": 0.01,
}

_STATE_SEPARATOR = "/"


@runtime_checkable
class ServerOptimizer(Protocol):
    """A server-side optimiser over the pseudo-gradient ``current - averaged``."""

    name: str
    learning_rate: float

    def step(self, current: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray]) -> Arrays:
        """Return the new global arrays from ``x_t`` and the clients' aggregate."""

    def state_dict(self) -> dict[str, Any]:
        """The optimiser's state: JSON-able scalars and numpy arrays."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict`."""


# ------------------------------------------------------------------ pure helpers
def pseudo_gradient(
    current: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray]
) -> Arrays:
    """``g_t = x_t - averaged`` per floating-point key, float64.

    Raises
    ------
    ValueError
        When the keys or shapes of the two mappings differ.
    """
    if set(current) != set(averaged):
        missing = sorted(set(current) ^ set(averaged))
        raise ValueError(f"current and averaged arrays have different keys: {missing}")
    gradient: Arrays = {}
    for key, value in current.items():
        if np.shape(value) != np.shape(averaged[key]):
            raise ValueError(
                f"{key}: current shape {np.shape(value)} differs from averaged "
                f"{np.shape(averaged[key])}"
            )
        if _is_float(value):
            gradient[key] = np.asarray(value, np.float64) - np.asarray(averaged[key], np.float64)
    return gradient


def _is_float(value: np.ndarray) -> bool:
    return bool(np.issubdtype(np.asarray(value).dtype, np.floating))


def _descend(
    current: Mapping[str, np.ndarray],
    averaged: Mapping[str, np.ndarray],
    direction: Mapping[str, np.ndarray],
) -> Arrays:
    """``x_t - direction`` in ``current``'s dtypes; non-float keys from ``averaged``."""
    result: Arrays = {}
    for key, value in current.items():
        dtype = np.asarray(value).dtype
        if key in direction:
            result[key] = (np.asarray(value, np.float64) - direction[key]).astype(dtype)
        else:
            result[key] = np.array(averaged[key], dtype=dtype)
    return result


def _check_rate(name: str, value: float, low: float, high: float, high_open: bool) -> float:
    value = float(value)
    ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}{bracket}, got {value}")
    return value


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value}")
    return value


def _pack(prefix: str, arrays: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    if arrays is None:
        return {}
    return {f"{prefix}{_STATE_SEPARATOR}{key}": np.array(v) for key, v in arrays.items()}


def _unpack(prefix: str, state: Mapping[str, Any]) -> Arrays | None:
    head = prefix + _STATE_SEPARATOR
    found = {
        key[len(head):]: np.array(value, dtype=np.float64)
        for key, value in state.items()
        if key.startswith(head)
    }
    return found or None


def _check_state_keys(moment: Mapping[str, np.ndarray], gradient: Mapping[str, np.ndarray]) -> None:
    if set(moment) != set(gradient):
        raise ValueError(
            "optimiser state and model arrays have different keys: "
            f"{sorted(set(moment) ^ set(gradient))}"
        )


# ---------------------------------------------------------------- optimisers
class _Base:
    """Shared bookkeeping: name, learning rate, step counter, state round trip."""

    name = ""
    _hyper: tuple[str, ...] = ()
    _moments: tuple[str, ...] = ()

    def __init__(self, learning_rate: float) -> None:
        self.learning_rate = _check_positive("server learning rate", learning_rate)
        self.steps = 0

    def step(self, current: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray]) -> Arrays:
        """Return ``x_{t+1}`` from ``x_t`` (``current``) and the clients' ``averaged`` arrays."""
        gradient = pseudo_gradient(current, averaged)
        self.steps += 1
        direction = self._direction(gradient)
        return _descend(current, averaged, direction)

    def _direction(self, gradient: Arrays) -> Arrays:  # pragma: no cover - abstract
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """``learning_rate`` and the optimiser's other settings."""
        return {"learning_rate": self.learning_rate} | {h: getattr(self, h) for h in self._hyper}

    def state_dict(self) -> dict[str, Any]:
        """Scalars (name, step, hyperparameters) and float64 moment arrays, flat."""
        state: dict[str, Any] = {"name": self.name, "step": self.steps}
        state.update(self.hyperparameters())
        for moment in self._moments:
            state.update(_pack(moment, getattr(self, moment)))
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (hyperparameters included).

        Raises
        ------
        ValueError
            When the state belongs to another optimiser.
        """
        if state.get("name") != self.name:
            raise ValueError(f"state of optimiser {state.get('name')!r}, not {self.name!r}")
        fresh = type(self)(**{k: state[k] for k in self.hyperparameters() if k in state})
        for key in self.hyperparameters():
            setattr(self, key, getattr(fresh, key))
        self.steps = int(state["step"])
        for moment in self._moments:
            setattr(self, moment, _unpack(moment, state))

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({settings})"


class ServerSGD(_Base):
    """FedAvg with a server learning rate: ``x_{t+1} = x_t - eta (x_t - averaged)``.

    ``eta = 1`` returns ``averaged`` itself (cast to ``current``'s dtypes),
    so it is exactly FedAvg. Reddi et al. (2021), Algorithm 1 with SERVEROPT = SGD.

    Parameters
    ----------
    learning_rate : float (default: 1.0)
        ``eta``, the server learning rate.
    """

    name = "sgd"

    def __init__(self, learning_rate: float = DEFAULT_LEARNING_RATES["sgd"]) -> None:
        super().__init__(learning_rate)

    def step(self, current: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray]) -> Arrays:
        """``averaged`` for ``eta = 1``, else ``x_t - eta g_t``."""
        if self.learning_rate == 1.0:
            pseudo_gradient(current, averaged)  # same key and shape checks
            self.steps += 1
            return {k: np.array(averaged[k], dtype=np.asarray(v).dtype) for k, v in current.items()}
        return super().step(current, averaged)

    def _direction(self, gradient: Arrays) -> Arrays:
        return {k: self.learning_rate * g for k, g in gradient.items()}


class ServerMomentum(_Base):
    """FedAvgM: heavy-ball momentum on the pseudo-gradient (Hsu et al. 2019).

    ``m_t = beta m_{t-1} + g_t`` with ``m_0 = 0`` (so ``m_1 = g_1``, as
    Flower's ``FedAvgM``), ``x_{t+1} = x_t - eta m_t``.

    Parameters
    ----------
    learning_rate : float (default: 1.0)
        ``eta``; the effective step on a constant pseudo-gradient tends to
        ``eta / (1 - beta)``.
    momentum : float (default: 0.9)
        ``beta`` in [0, 1). Flower's ``FedAvgM`` defaults to 0 (plain FedAvg);
        0.9 is Hsu et al.'s usual choice.
    """

    name = "momentum"
    _hyper = ("momentum",)
    _moments = ("m",)

    def __init__(
        self, learning_rate: float = DEFAULT_LEARNING_RATES["momentum"], momentum: float = 0.9
    ) -> None:
        super().__init__(learning_rate)
        self.momentum = _check_rate("server momentum", momentum, 0.0, 1.0, high_open=True)
        self.m: Arrays | None = None

    def _direction(self, gradient: Arrays) -> Arrays:
        if self.m is None:
            self.m = {k: np.zeros_like(g) for k, g in gradient.items()}
        _check_state_keys(self.m, gradient)
        self.m = {k: self.momentum * self.m[k] + g for k, g in gradient.items()}
        return {k: self.learning_rate * m for k, m in self.m.items()}


class _Adaptive(_Base):
    """First moment as Adam; subclasses give the second moment and the step size."""

    _hyper = ("beta1", "beta2", "tau")
    _moments = ("m", "v")

    def __init__(self, learning_rate: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(learning_rate)
        self.beta1 = _check_rate("beta1", beta1, 0.0, 1.0, high_open=True)
        self.beta2 = _check_rate("beta2", beta2, 0.0, 1.0, high_open=True)
        self.tau = _check_positive("tau", tau)
        self.m: Arrays | None = None
        self.v: Arrays | None = None

    def _second_moment(self, v: np.ndarray, g: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _step_size(self) -> float:
        return self.learning_rate

    def _direction(self, gradient: Arrays) -> Arrays:
        if self.m is None or self.v is None:
            self.m = {k: np.zeros_like(g) for k, g in gradient.items()}
            self.v = {k: np.zeros_like(g) for k, g in gradient.items()}
        _check_state_keys(self.m, gradient)
        _check_state_keys(self.v, gradient)
        self.m = {k: self.beta1 * self.m[k] + (1.0 - self.beta1) * g for k, g in gradient.items()}
        self.v = {k: self._second_moment(self.v[k], g) for k, g in gradient.items()}
        eta = self._step_size()
        return {k: eta * self.m[k] / (np.sqrt(self.v[k]) + self.tau) for k in gradient}


class ServerAdam(_Adaptive):
    """FedAdam (Reddi et al. 2021, Algorithm 2) with Flower's bias correction.

    Parameters
    ----------
    learning_rate : float (default: 0.1)
        ``eta`` (Flower's ``FedAdam`` default).
    beta1, beta2 : float (default: 0.9, 0.99)
        Moment decay rates in [0, 1).
    tau : float (default: 1e-3)
        Adaptivity: added to ``sqrt(v_t)``.
    bias_correction : {"flower", "kingma", "none"} (default: "flower")
        ``eta_t = eta sqrt(1 - beta_2^s) / (1 - beta_1^s)`` with ``s = t + 1``
        (Flower 1.42), ``s = t`` (Kingma and Ba 2015), or ``eta_t = eta``
        (Reddi et al.'s Algorithm 2), ``t`` the 1-based step.
    """

    name = "adam"
    _hyper = ("beta1", "beta2", "tau", "bias_correction")

    def __init__(
        self,
        learning_rate: float = DEFAULT_LEARNING_RATES["adam"],
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        bias_correction: BiasCorrection = "flower",
    ) -> None:
        super().__init__(learning_rate, beta1, beta2, tau)
        if bias_correction not in ("flower", "kingma", "none"):
            raise ValueError(
                f"bias_correction must be 'flower', 'kingma' or 'none', got {bias_correction!r}"
            )
        self.bias_correction: BiasCorrection = bias_correction

    def _second_moment(self, v: np.ndarray, g: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * g * g

    def _step_size(self) -> float:
        if self.bias_correction == "none":
            return self.learning_rate
        s = self.steps + (1 if self.bias_correction == "flower" else 0)
        return self.learning_rate * math.sqrt(1.0 - self.beta2**s) / (1.0 - self.beta1**s)


class ServerYogi(_Adaptive):
    """FedYogi (Reddi et al. 2021, Algorithm 2; Zaheer et al. 2018's Yogi).

    ``v_t = v_{t-1} - (1 - beta_2) g_t^2 sign(v_{t-1} - g_t^2)``: the second
    moment grows or shrinks additively, so it forgets a large early
    pseudo-gradient more slowly than Adam. No bias correction.

    Parameters
    ----------
    learning_rate : float (default: 0.01)
        ``eta`` (Flower's ``FedYogi`` default).
    beta1, beta2 : float (default: 0.9, 0.99)
        Moment decay rates in [0, 1).
    tau : float (default: 1e-3)
        Adaptivity: added to ``sqrt(v_t)``.
    """

    name = "yogi"

    def __init__(
        self,
        learning_rate: float = DEFAULT_LEARNING_RATES["yogi"],
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(learning_rate, beta1, beta2, tau)

    def _second_moment(self, v: np.ndarray, g: np.ndarray) -> np.ndarray:
        g2 = g * g
        return v - (1.0 - self.beta2) * g2 * np.sign(v - g2)


_CLASSES: dict[str, type[_Base]] = {
    "sgd": ServerSGD,
    "momentum": ServerMomentum,
    "adam": ServerAdam,
    "yogi": ServerYogi,
}


def make_server_optimizer(
    name: str, learning_rate: float | None = None, **hyper: Any
) -> ServerOptimizer:
    """Build the server optimiser ``name`` (run-config ``server-optimizer``).

    Parameters
    ----------
    name : {"sgd", "momentum", "adam", "yogi"}
        FedAvg with a server learning rate, FedAvgM, FedAdam or FedYogi.
    learning_rate : float, optional
        Server learning rate ``eta``; ``None`` takes the optimiser's default
        (:data:`DEFAULT_LEARNING_RATES`).
    **hyper
        ``momentum`` (momentum); ``beta1``, ``beta2``, ``tau`` (adam, yogi);
        ``bias_correction`` (adam).

    Raises
    ------
    ValueError
        On an unknown name, a hyperparameter the optimiser does not take, or
        an out-of-range value.
    """
    if name not in _CLASSES:
        raise ValueError(f"server-optimizer {name!r} is not one of {', '.join(SERVER_OPTIMIZERS)}")
    cls = _CLASSES[name]
    unknown = sorted(set(hyper) - set(cls._hyper))
    if unknown:
        allowed = ", ".join(cls._hyper) or "none"
        raise ValueError(f"server-optimizer {name!r} takes no {unknown}; allowed: {allowed}")
    rate = DEFAULT_LEARNING_RATES[name] if learning_rate is None else learning_rate
    optimizer = cls(rate, **hyper)  # type: ignore[call-arg]
    log(INFO, "Server optimiser: %r", optimizer)
    return optimizer
