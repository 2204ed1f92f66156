"""The data owner's limits: a SuperNode's own minimum privacy, from its node config.

The run config is chosen by whoever starts the run, i.e. the server side; a
node's operator pins what no run may weaken with ``--node-config`` keys. This
module parses them (:func:`parse_node_limits`) and lists how a server's
requested settings would break them (:func:`violations`). It is pure (stdlib
only, no TensorFlow, no Flower) so the check is instant and testable alone;
resolving ``private-layers`` against a model is the ClientApp's job.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

# ------------------------------------------------------------ node-config keys
#: The node's layers that never leave it: same grammar as the run config's key,
#: united with the server's ``private-layers``.
PRIVATE_LAYERS = "private-layers"
#: ``true``: the node trains only under DP-SGD.
REQUIRE_DP_SGD = "require-dp-sgd"
#: The smallest DP-SGD noise multiplier the node accepts.
MIN_DP_SGD_NOISE_MULTIPLIER = "min-dp-sgd-noise-multiplier"
#: The node's cap on its sample-level epsilon per run.
MAX_SAMPLE_EPSILON = "max-sample-epsilon"
#: The largest sample-level delta the node accepts.
MAX_SAMPLE_DELTA = "max-sample-delta"
#: ``true``: the node's update leaves only masked, inside secure aggregation.
REQUIRE_SECURE_AGGREGATION = "require-secure-aggregation"
LIMIT_KEYS = (
    PRIVATE_LAYERS,
    REQUIRE_DP_SGD,
    MIN_DP_SGD_NOISE_MULTIPLIER,
    MAX_SAMPLE_EPSILON,
    MAX_SAMPLE_DELTA,
    REQUIRE_SECURE_AGGREGATION,
)

# The run-config keys the server's side of each check comes from. Written out
# here because this module may not import app/ (app.config imports data/).
RUN_DP_SGD = "dp-sgd"
RUN_DP_SGD_NOISE_MULTIPLIER = "dp-sgd-noise-multiplier"
RUN_TARGET_SAMPLE_EPSILON = "target-sample-epsilon"
RUN_TARGET_SAMPLE_DELTA = "target-sample-delta"
RUN_PRIVATE_LAYERS = "private-layers"
RUN_SECURE_AGGREGATION = "secure-aggregation"

# A run-config key written into a node config is a likely mistake for the limit
# beside it: the node would otherwise ignore it and train with no limit at all.
_RUN_KEY_HINTS = {
    RUN_DP_SGD: REQUIRE_DP_SGD,
    RUN_DP_SGD_NOISE_MULTIPLIER: MIN_DP_SGD_NOISE_MULTIPLIER,
    RUN_TARGET_SAMPLE_EPSILON: MAX_SAMPLE_EPSILON,
    RUN_TARGET_SAMPLE_DELTA: MAX_SAMPLE_DELTA,
    RUN_SECURE_AGGREGATION: REQUIRE_SECURE_AGGREGATION,
}
_PRIVATE_LAYERS_ALLOWED = "'none', 'head', 'batchnorm', or comma-separated layer-name patterns"


class NodeLimitsError(ValueError):
    """A node-config limit with a bad value; the message names the key and what is allowed."""


@dataclass(frozen=True)
class NodeLimits:
    """The node's own minimum privacy, whatever the server asks.

    Attributes
    ----------
    private_layers : str
        Layers whose variables never leave the node (``none``: no own pin).
    require_dp_sgd : bool
        Whether the node trains only under DP-SGD.
    min_dp_sgd_noise_multiplier, max_sample_epsilon, max_sample_delta : float or None
        The numeric limits; None when not set. Any of them set implies that
        DP-SGD is required: without it there is no noise and no finite
        sample-level epsilon to bound.
    require_secure_aggregation : bool
        Whether the node sends its update only masked (SecAgg+), never in the clear.
    """

    private_layers: str = "none"
    require_dp_sgd: bool = False
    min_dp_sgd_noise_multiplier: float | None = None
    max_sample_epsilon: float | None = None
    max_sample_delta: float | None = None
    require_secure_aggregation: bool = False

    @property
    def dp_sgd_required_by(self) -> tuple[str, ...]:
        """The keys that make DP-SGD mandatory on this node (empty: it is not)."""
        numeric = (
            (MIN_DP_SGD_NOISE_MULTIPLIER, self.min_dp_sgd_noise_multiplier),
            (MAX_SAMPLE_EPSILON, self.max_sample_epsilon),
            (MAX_SAMPLE_DELTA, self.max_sample_delta),
        )
        return ((REQUIRE_DP_SGD,) if self.require_dp_sgd else ()) + tuple(
            key for key, value in numeric if value is not None
        )


@dataclass(frozen=True)
class ServerRequest:
    """What the server asks of this node, as plain values.

    Attributes
    ----------
    dp_sgd, dp_sgd_noise_multiplier, target_sample_epsilon, target_sample_delta
        The run config's values (``target_sample_epsilon`` 0: no budget).
    private_layers : str
        The run config's ``private-layers``, for messages.
    private_paths : frozenset of str
        Variable paths the server's ``private-layers`` leaves on the client;
        every other variable the server expects back.
    sent_paths : frozenset of str
        Variable paths of the global arrays the server actually sent.
    secure_aggregation : bool
        Whether the update is asked for masked (a SecAgg+ collect message).
    """

    dp_sgd: bool = False
    dp_sgd_noise_multiplier: float = 0.0
    target_sample_epsilon: float = 0.0
    target_sample_delta: float = 0.0
    private_layers: str = "none"
    private_paths: frozenset[str] = frozenset()
    sent_paths: frozenset[str] = frozenset()
    secure_aggregation: bool = False


@dataclass(frozen=True)
class Violation:
    """One node limit the server's request would break."""

    key: str
    asked: str
    limit: str

    def __str__(self) -> str:
        return f"{self.key}: the server asks {self.asked}; this node's limit is {self.limit}"


class SampleBudget(NamedTuple):
    """The sample-level epsilon budget a node trains under, and the key it comes from."""

    epsilon: float
    key: str


# ----------------------------------------------------------------------- parsing
def _bad(key: str, value: object, allowed: str) -> NodeLimitsError:
    return NodeLimitsError(f"node config {key}={value!r} is not allowed; allowed: {allowed}")


def _boolean(key: str, value: object) -> bool:
    # Flower's --node-config parser gives a real bool for `true`; other
    # sources may give the text. Anything else (1, 'yes') is refused rather
    # than guessed, because a wrong guess here switches a privacy limit off.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _bad(key, value, "true or false")


def _number(key: str, value: object, allowed: str, check: Callable[[float], bool]) -> float:
    # bool is an int subclass, and `true` is never a noise multiplier.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _bad(key, value, allowed)
    try:
        number = float(value)
    except ValueError:
        raise _bad(key, value, allowed) from None
    if not math.isfinite(number) or not check(number):
        raise _bad(key, value, allowed)
    return number


def _private_layers(value: object) -> str:
    if not isinstance(value, str):
        raise _bad(PRIVATE_LAYERS, value, _PRIVATE_LAYERS_ALLOWED)
    spec = value.strip()
    if not spec or not all(p.strip() for p in spec.split(",")):
        raise _bad(PRIVATE_LAYERS, value, _PRIVATE_LAYERS_ALLOWED + " (no empty pattern)")
    return spec


def _refuse_near_misses(node_config: Mapping[str, object]) -> None:
    # A misspelt limit would be ignored and the node would train with less
    # privacy than its operator meant: refuse it instead.
    for key in node_config:
        if key in LIMIT_KEYS:
            continue
        if key in _RUN_KEY_HINTS:
            raise NodeLimitsError(
                f"node config key {key!r} is a run-config key, which the server chooses; "
                f"the node's own limit is {_RUN_KEY_HINTS[key]!r}"
            )
        close = difflib.get_close_matches(key, LIMIT_KEYS, n=1, cutoff=0.85)
        if close:
            raise NodeLimitsError(
                f"node config key {key!r} is not a known key; did you mean {close[0]!r}? "
                f"(the node's privacy limits are {', '.join(LIMIT_KEYS)})"
            )


def parse_node_limits(node_config: Mapping[str, object]) -> NodeLimits:
    """Read the node's privacy limits from its node config; absent keys set no limit.

    Other keys (``partition-id``, ``data-path``, ``state-dir``...) are left
    to their own readers.

    Raises
    ------
    NodeLimitsError
        Naming the key, its value and the allowed values, for a bad value, a
        run-config key written where a limit belongs, or a near-miss spelling
        of a limit key.
    """
    _refuse_near_misses(node_config)
    positive = "a number > 0 (omit the key for no limit)"
    limits: dict[str, object] = {}
    if PRIVATE_LAYERS in node_config:
        limits["private_layers"] = _private_layers(node_config[PRIVATE_LAYERS])
    if REQUIRE_DP_SGD in node_config:
        limits["require_dp_sgd"] = _boolean(REQUIRE_DP_SGD, node_config[REQUIRE_DP_SGD])
    if REQUIRE_SECURE_AGGREGATION in node_config:
        limits["require_secure_aggregation"] = _boolean(
            REQUIRE_SECURE_AGGREGATION, node_config[REQUIRE_SECURE_AGGREGATION]
        )
    if MIN_DP_SGD_NOISE_MULTIPLIER in node_config:
        limits["min_dp_sgd_noise_multiplier"] = _number(
            MIN_DP_SGD_NOISE_MULTIPLIER,
            node_config[MIN_DP_SGD_NOISE_MULTIPLIER],
            positive,
            lambda v: v > 0,
        )
    if MAX_SAMPLE_EPSILON in node_config:
        limits["max_sample_epsilon"] = _number(
            MAX_SAMPLE_EPSILON, node_config[MAX_SAMPLE_EPSILON], positive, lambda v: v > 0
        )
    if MAX_SAMPLE_DELTA in node_config:
        limits["max_sample_delta"] = _number(
            MAX_SAMPLE_DELTA,
            node_config[MAX_SAMPLE_DELTA],
            "a number in (0, 1) (omit the key for no limit)",
            lambda v: 0 < v < 1,
        )
    return NodeLimits(**limits)  # type: ignore[arg-type]


# -------------------------------------------------------------------- the checks
def effective_sample_epsilon(limits: NodeLimits, target_sample_epsilon: float) -> SampleBudget:
    """The stricter of the node's ``max-sample-epsilon`` and the server's target.

    A non-positive ``target_sample_epsilon`` means the server sets no budget;
    ``SampleBudget(0.0, "")`` means neither side does.
    """
    server = SampleBudget(target_sample_epsilon, RUN_TARGET_SAMPLE_EPSILON)
    if limits.max_sample_epsilon is None:
        return server if target_sample_epsilon > 0 else SampleBudget(0.0, "")
    node = SampleBudget(limits.max_sample_epsilon, MAX_SAMPLE_EPSILON)
    if target_sample_epsilon > 0 and target_sample_epsilon < limits.max_sample_epsilon:
        return server
    return node


def private_layer_violations(
    limits: NodeLimits, request: ServerRequest, node_private_paths: frozenset[str]
) -> list[Violation]:
    """The node's own private variables that the server sent or would expect back.

    ``node_private_paths`` is ``limits.private_layers`` resolved against the
    model. A variable the server's ``private-layers`` does not leave on the
    client is one the server expects in the reply; a sent one means the
    server's split is not the node's, whatever its run config says.
    """
    sent = sorted(request.sent_paths & node_private_paths)
    expected = sorted(node_private_paths - request.private_paths)
    if not sent and not expected:
        return []
    parts = []
    if sent:
        parts.append(f"sends {', '.join(sent)}")
    if expected:
        parts.append(f"expects back {', '.join(expected)}")
    return [
        Violation(
            PRIVATE_LAYERS,
            f"{RUN_PRIVATE_LAYERS}={request.private_layers!r} ({'; '.join(parts)})",
            f"{PRIVATE_LAYERS}={limits.private_layers!r}: these variables never leave it",
        )
    ]


def _numeric_limit(limits: NodeLimits, key: str) -> float:
    value = {
        MIN_DP_SGD_NOISE_MULTIPLIER: limits.min_dp_sgd_noise_multiplier,
        MAX_SAMPLE_EPSILON: limits.max_sample_epsilon,
        MAX_SAMPLE_DELTA: limits.max_sample_delta,
    }[key]
    assert value is not None  # only keys that dp_sgd_required_by lists
    return value


def dp_sgd_violations(limits: NodeLimits, request: ServerRequest) -> list[Violation]:
    """The DP-SGD limits the server's run config would break.

    A larger server ``target-sample-epsilon`` is not one: the node trains to
    the stricter of the two (:func:`effective_sample_epsilon`).
    """
    if not request.dp_sgd:
        asked = f"{RUN_DP_SGD}=false"
        return [
            Violation(
                key,
                asked,
                f"{REQUIRE_DP_SGD}=true"
                if key == REQUIRE_DP_SGD
                else f"{key}={_numeric_limit(limits, key):g}, which needs DP-SGD",
            )
            for key in limits.dp_sgd_required_by
        ]
    found = []
    floor = limits.min_dp_sgd_noise_multiplier
    if floor is not None and request.dp_sgd_noise_multiplier < floor:
        found.append(
            Violation(
                MIN_DP_SGD_NOISE_MULTIPLIER,
                f"{RUN_DP_SGD_NOISE_MULTIPLIER}={request.dp_sgd_noise_multiplier:g}",
                f"{MIN_DP_SGD_NOISE_MULTIPLIER}={floor:g}",
            )
        )
    ceiling = limits.max_sample_delta
    if ceiling is not None and request.target_sample_delta > ceiling:
        found.append(
            Violation(
                MAX_SAMPLE_DELTA,
                f"{RUN_TARGET_SAMPLE_DELTA}={request.target_sample_delta:g}",
                f"{MAX_SAMPLE_DELTA}={ceiling:g}",
            )
        )
    return found


def violations(
    limits: NodeLimits,
    request: ServerRequest,
    node_private_paths: frozenset[str] = frozenset(),
) -> list[Violation]:
    """Every way ``request`` would weaken the node's ``limits``; empty when it does not.

    Parameters
    ----------
    limits : NodeLimits
        The node's limits (:func:`parse_node_limits`).
    request : ServerRequest
        The server's requested settings and the arrays it sent.
    node_private_paths : frozenset of str
        ``limits.private_layers`` resolved against the model (empty: no pin).

    Returns
    -------
    list of Violation
        Each names the node-config key, what the server asked and the node's limit.
    """
    found = private_layer_violations(limits, request, node_private_paths) + dp_sgd_violations(
        limits, request
    )
    if limits.require_secure_aggregation and not request.secure_aggregation:
        found.append(
            Violation(
                REQUIRE_SECURE_AGGREGATION,
                "the update in the clear (a train message outside secure aggregation)",
                "true: the update leaves only masked",
            )
        )
    return found
