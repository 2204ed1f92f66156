"""The run config: every key, its type, its allowed values, checked before round 1.

Kept free of TensorFlow and Flower imports so the check is instant and the
same function serves the ServerApp, the ClientApp and the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from data.partition import PARTITIONERS
from data.public_slice import parse_server_data
from data.sources import SOURCES, is_known_dataset
from data.tabular_file import DEFAULT_MAX_CLASSES
from data.tasks import TASKS
from clients.faults import FAULT_KINDS
from clients.models import MODELS
from strategies.robust import AGGREGATORS
from strategies.server_optimizers import SERVER_OPTIMIZERS


class ConfigError(ValueError):
    """A run-config value that is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class Rule:
    """How one run-config key is checked."""

    kind: type
    allowed: str
    check: Callable[[Any], bool] = lambda value: True
    #: Strings accepted verbatim by a numeric key (``noise-multiplier = 'auto'``).
    words: tuple[str, ...] = ()


def _one_of(options: tuple[str, ...]) -> Rule:
    return Rule(str, "one of " + ", ".join(repr(o) for o in options), lambda v: v in options)


def _valid_server_data(value: str) -> bool:
    try:
        parse_server_data(value)
    except ValueError:
        return False
    return True


_POSITIVE_INT = Rule(int, "an integer >= 1", lambda v: v >= 1)
_NON_NEGATIVE_INT = Rule(int, "an integer >= 0", lambda v: v >= 0)
_POSITIVE_FLOAT = Rule(float, "a number > 0", lambda v: v > 0)
_OPEN_UNIT = Rule(float, "a number in (0, 1)", lambda v: 0 < v < 1)
_HALF_OPEN_UNIT = Rule(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
_UNIT = Rule(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
_ANY_STR = Rule(str, "a string")
_BOOL = Rule(bool, "true or false")
_NON_EMPTY_STR = Rule(str, "a non-empty string", lambda v: bool(v.strip()))

RULES: dict[str, Rule] = {
    "num-server-rounds": _POSITIVE_INT,
    "fraction-train": _HALF_OPEN_UNIT,
    "min-train-nodes": _POSITIVE_INT,
    "fraction-evaluate": _UNIT,
    "min-evaluate-nodes": _NON_NEGATIVE_INT,
    "local-epochs": _POSITIVE_INT,
    "batch-size": _POSITIVE_INT,
    "learning-rate": _POSITIVE_FLOAT,
    "dataset": Rule(
        str,
        "one of " + ", ".join(repr(s) for s in sorted(SOURCES))
        + ", or several joined by '+' to fuse them (e.g. 'heart+csv')",
        is_known_dataset,
    ),
    "data-path": _ANY_STR,
    "max-classes": Rule(
        int,
        f"an integer >= 1 (the most classes a table file's labels may make; "
        f"default {DEFAULT_MAX_CLASSES})",
        lambda v: v >= 1,
    ),
    "partitioner": _one_of(PARTITIONERS),
    "dirichlet-alpha": _POSITIVE_FLOAT,
    "shards-per-client": _POSITIVE_INT,
    "test-fraction": _OPEN_UNIT,
    "val-fraction": _OPEN_UNIT,
    "seed": _NON_NEGATIVE_INT,
    "insecure-dp-seed": Rule(
        int,
        "-1 (off: DP noise and sampling from fresh OS entropy, the only private setting) "
        "or a seed >= 0 (tests only: the DP noise is replayable, the run is NOT PRIVATE)",
        lambda v: v >= -1,
    ),
    "output-dir": _NON_EMPTY_STR,
    "round-timeout": _POSITIVE_FLOAT,
    "node-wait-timeout": _POSITIVE_FLOAT,
    "strategy": _one_of(("fedavg", "dp-fedavg")),
    "noise-multiplier": Rule(
        float,
        "a number >= 0, or 'auto' (dp-fedavg: the smallest noise that keeps the run's "
        "num-server-rounds within target-epsilon at target-delta)",
        lambda v: v == "auto" or v >= 0,
        words=("auto",),
    ),
    "clipping-norm": _POSITIVE_FLOAT,
    "clipping": _one_of(("fixed", "adaptive")),
    "clipping-side": _one_of(("server", "client")),
    "server-learning-rate": Rule(
        float, "a number >= 0 (0: the server optimiser's default)", lambda v: v >= 0
    ),
    "server-optimizer": _one_of(SERVER_OPTIMIZERS),
    "server-momentum": Rule(float, "a number in [0, 1)", lambda v: 0 <= v < 1),
    "proximal-mu": Rule(float, "a number >= 0 (0: FedAvg)", lambda v: v >= 0),
    "server-train-epochs": _NON_NEGATIVE_INT,
    "server-data": Rule(
        str, "'' (none) or 'public-slice:<fraction in (0,1) or count>'", _valid_server_data
    ),
    "client-sampling": _one_of(("poisson", "fixed")),
    "target-delta": _OPEN_UNIT,
    "target-epsilon": Rule(float, "a number >= 0 (0: no budget)", lambda v: v >= 0),
    "target-unclipped-quantile": _OPEN_UNIT,
    "clipping-learning-rate": _POSITIVE_FLOAT,
    "local-dp-epsilon": Rule(float, "a number >= 0 (0: off)", lambda v: v >= 0),
    "dp-sgd": _BOOL,
    "dp-sgd-noise-multiplier": _POSITIVE_FLOAT,
    "dp-sgd-clipping-norm": _POSITIVE_FLOAT,
    "target-sample-epsilon": Rule(float, "a number >= 0 (0: no budget)", lambda v: v >= 0),
    "target-sample-delta": _OPEN_UNIT,
    "private-layers": Rule(
        str,
        "'none', 'head', 'batchnorm', or comma-separated layer-name patterns",
        lambda v: bool(v.strip()) and all(p.strip() for p in v.split(",")),
    ),
    "resume": Rule(str, "'' (a new run) or the folder of a run to continue"),
    "client-tasks": Rule(
        str,
        "comma-separated tasks from " + ", ".join(repr(t) for t in TASKS)
        + " (client k takes the k-th in turn)",
        lambda v: all(t.strip() in TASKS for t in v.split(",")),
    ),
    "aggregator": _one_of(AGGREGATORS),
    "trim-fraction": Rule(float, "a number in [0, 0.5)", lambda v: 0 <= v < 0.5),
    "byzantine-clients": _NON_NEGATIVE_INT,
    "update-norm-bound": _POSITIVE_FLOAT,
    "norm-bound-adaptive": _BOOL,
    "client-report": _BOOL,
    "faulty-fraction": Rule(
        float, "a number in [0, 1) (simulation only: that fraction of clients misbehaves)",
        lambda v: 0 <= v < 1,
    ),
    "faulty-kind": _one_of(FAULT_KINDS),
    "tracking": _one_of(("none", "mlflow")),
    "secure-aggregation": _BOOL,
    "secagg-threshold": Rule(
        float,
        "a number in (0.5, 1] (the fraction of each client's key holders whose shares "
        "rebuild its masks; fewer survivors void the round)",
        lambda v: 0.5 < v <= 1,
    ),
    "secagg-neighbours": Rule(
        int,
        "0 (every pair of clients masks: SecAgg) or an even number >= 2 (SecAgg+: that "
        "many neighbours on a random ring)",
        lambda v: v == 0 or (v >= 2 and v % 2 == 0),
    ),
    "secagg-clipping-range": _POSITIVE_FLOAT,
    "secagg-quantization-bits": Rule(int, "an integer in [2, 40]", lambda v: 2 <= v <= 40),
    "secagg-modulus-bits": Rule(
        int, "an integer in [4, 63], above secagg-quantization-bits + 1", lambda v: 4 <= v <= 63
    ),
    "secagg-max-weight": _POSITIVE_INT,
    "dp-noise": _one_of(("central", "distributed")),
    "model": Rule(
        str,
        "one of " + ", ".join(repr(m) for m in MODELS)
        + " ('default': the CNN for images, the MLP for tables; 'mlp' and '2nn' suit "
        "user-level DP, whose noise grows with the parameter count)",
        lambda v: v in MODELS,
    ),
}


@dataclass(frozen=True)
class RunConfig:
    """The validated run config, one attribute per kebab-case key."""

    num_server_rounds: int
    fraction_train: float
    min_train_nodes: int
    fraction_evaluate: float
    min_evaluate_nodes: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    dataset: str
    data_path: str
    max_classes: int
    partitioner: str
    dirichlet_alpha: float
    shards_per_client: int
    test_fraction: float
    val_fraction: float
    seed: int
    insecure_dp_seed: int
    output_dir: str
    round_timeout: float
    node_wait_timeout: float
    strategy: str
    noise_multiplier: float | str
    clipping_norm: float
    clipping: str
    clipping_side: str
    server_learning_rate: float
    server_optimizer: str
    server_momentum: float
    proximal_mu: float
    server_train_epochs: int
    server_data: str
    client_sampling: str
    target_delta: float
    target_epsilon: float
    target_unclipped_quantile: float
    clipping_learning_rate: float
    local_dp_epsilon: float
    dp_sgd: bool
    dp_sgd_noise_multiplier: float
    dp_sgd_clipping_norm: float
    target_sample_epsilon: float
    target_sample_delta: float
    private_layers: str
    resume: str
    client_tasks: str
    aggregator: str
    trim_fraction: float
    byzantine_clients: int
    update_norm_bound: float
    norm_bound_adaptive: bool
    client_report: bool
    faulty_fraction: float
    faulty_kind: str
    tracking: str
    secure_aggregation: bool
    secagg_threshold: float
    secagg_neighbours: int
    secagg_clipping_range: float
    secagg_quantization_bits: int
    secagg_modulus_bits: int
    secagg_max_weight: int
    dp_noise: str
    model: str

    def as_dict(self) -> dict[str, Any]:
        """The config with its kebab-case keys, as written to ``metrics.json``."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def _coerce(key: str, value: Any, rule: Rule) -> Any:
    """Return ``value`` as ``rule.kind``, or raise a ConfigError naming the key."""
    if rule.kind is bool:
        # Only a real boolean: the string 'false' would be truthy.
        if not isinstance(value, bool):
            raise ConfigError(
                f"run config '{key}' = {value!r} has type {type(value).__name__}; "
                f"allowed: {rule.allowed}"
            )
        return value
    # bool is an int subclass; `true` is never a valid count or rate.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(
            f"run config '{key}' = {value!r} has type {type(value).__name__}; "
            f"allowed: {rule.allowed}"
        )
    if isinstance(value, str) and value in rule.words:
        return value
    if rule.kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"run config '{key}' = {value!r}; allowed: {rule.allowed}")
        return value
    if isinstance(value, str):
        raise ConfigError(
            f"run config '{key}' = {value!r} is a string; allowed: {rule.allowed}"
        )
    if rule.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"run config '{key}' = {value!r}; allowed: {rule.allowed}")
        return int(value)
    if not math.isfinite(value):
        raise ConfigError(f"run config '{key}' = {value!r}; allowed: {rule.allowed}")
    return float(value)


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Validate every key of ``run_config`` and return it typed.

    Raises
    ------
    ConfigError
        Naming the first bad key, its value and what is allowed. Unknown keys
        are errors too, so a typo is never silently ignored.
    """
    unknown = sorted(set(run_config) - set(RULES))
    if unknown:
        raise ConfigError(
            f"unknown run config key(s) {unknown}; known keys: {', '.join(RULES)}"
        )
    missing = [key for key in RULES if key not in run_config]
    if missing:
        raise ConfigError(f"run config is missing key(s) {missing}")
    values: dict[str, Any] = {}
    for key, rule in RULES.items():
        value = _coerce(key, run_config[key], rule)
        if not rule.check(value):
            raise ConfigError(
                f"run config '{key}' = {value!r} is not allowed; allowed: {rule.allowed}"
            )
        values[key.replace("-", "_")] = value
    config = RunConfig(**values)
    if config.server_train_epochs > 0 and not config.server_data.strip():
        raise ConfigError(
            f"run config 'server-train-epochs' = {config.server_train_epochs} needs "
            "'server-data' (e.g. 'public-slice:0.01'): the server trains only on data "
            "that is not any client's"
        )
    if config.dp_sgd and config.proximal_mu > 0:
        raise ConfigError(
            f"run config 'proximal-mu' = {config.proximal_mu} cannot be combined with "
            "'dp-sgd' = true: the proximal term is not part of DP-SGD's clipped "
            "per-example gradients; set proximal-mu = 0 or dp-sgd = false"
        )
    if config.strategy == "dp-fedavg" and config.aggregator not in ("mean", "norm-bound"):
        raise ConfigError(
            f"run config 'aggregator' = {config.aggregator!r} cannot be combined with "
            "'strategy' = 'dp-fedavg': DP-FedAvg's noise is calibrated to the sensitivity "
            "C/m of a clipped mean, and the sensitivity of a median, trimmed mean or Krum "
            "selection is not derived here, so its epsilon would not hold; use "
            "aggregator='mean' or 'norm-bound' (DP-FedAvg's clipping is norm bounding)"
        )
    if config.strategy == "dp-fedavg" and config.noise_multiplier == "auto":
        if config.target_epsilon <= 0:
            raise ConfigError(
                "run config 'noise-multiplier' = 'auto' needs 'target-epsilon' > 0: the "
                "noise is calibrated so that num-server-rounds rounds stay within it"
            )
        if config.client_sampling != "poisson":
            raise ConfigError(
                "run config 'noise-multiplier' = 'auto' needs 'client-sampling' = "
                "'poisson': fixed-size sampling's epsilon depends on the number of nodes, "
                "which is known only once they connect; give a number instead"
            )
        if config.local_dp_epsilon > 0:
            raise ConfigError(
                "run config 'noise-multiplier' = 'auto' cannot be combined with "
                "'local-dp-epsilon' > 0 (local DP sets the noise itself); give a number"
            )
    _check_secure_aggregation(config)
    if config.fraction_evaluate > 0 and config.min_evaluate_nodes < 1:
        raise ConfigError(
            f"run config 'min-evaluate-nodes' = {config.min_evaluate_nodes} must be "
            "at least 1 when 'fraction-evaluate' > 0"
        )
    return config


def _check_secure_aggregation(config: RunConfig) -> None:
    """Settings secure aggregation and distributed noise cannot be combined with."""
    if config.secure_aggregation:
        if config.secagg_modulus_bits <= config.secagg_quantization_bits + 1:
            raise ConfigError(
                f"run config 'secagg-modulus-bits' = {config.secagg_modulus_bits} must be above "
                f"'secagg-quantization-bits' + 1 = {config.secagg_quantization_bits + 1}: the "
                "sum of the clients' quantised values must fit in the modulus"
            )
        allowed = ("mean", "norm-bound") if config.strategy == "dp-fedavg" else ("mean",)
        if config.aggregator not in allowed:
            raise ConfigError(
                f"run config 'aggregator' = {config.aggregator!r} cannot be combined with "
                "'secure-aggregation' = true: it needs each client's update, and secure "
                f"aggregation shows the server only their sum; use aggregator = 'mean'"
            )
        if config.local_dp_epsilon > 0:
            raise ConfigError(
                "run config 'local-dp-epsilon' > 0 cannot be combined with "
                "'secure-aggregation' = true; for noise the server never sees removed, use "
                "dp-noise = 'distributed'"
            )
    if config.dp_noise == "distributed":
        if not (config.secure_aggregation and config.strategy == "dp-fedavg"):
            raise ConfigError(
                "run config 'dp-noise' = 'distributed' needs 'strategy' = 'dp-fedavg' and "
                "'secure-aggregation' = true: each client adds its share of the noise "
                "under the masks, so no party sees a noiseless sum"
            )
        if config.clipping != "fixed":
            raise ConfigError(
                "run config 'dp-noise' = 'distributed' needs 'clipping' = 'fixed' "
                "(adaptive clipping's count query has no distributed noise here)"
            )
        if config.noise_multiplier == "auto":
            raise ConfigError(
                "run config 'noise-multiplier' = 'auto' cannot be combined with 'dp-noise' = "
                "'distributed' (its accounting takes no sampling amplification); give a number"
            )
