"""The ServerApp: validate the config, run the strategy, write the run's outputs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from clients.private_layers import private_variable_paths, split_weights
from clients.server_training import ServerTrainer, make_server_update_fn
from clients.training import evaluate, get_model, initial_weights
from clients.weights import get_weights, set_weights
from data.dataset import LabeledData
from data.federation import (
    Federation,
    build_federation,
    load_server_data,
    load_server_split,
    local_train_size,
)
from privacy.accounting import calibrate_noise_multiplier
from privacy.central import NOISE_TO_SIGNAL_WARNING, NOT_COVERED
from privacy.randomness import NOT_PRIVATE
from privacy.sample_accounting import affordable_rounds, sample_epsilon
from secagg.parameters import SecAggError, SecAggParameters
from strategies import protocol
from strategies.dp_fedavg import DPFedAvg
from strategies.fedavg import FedAvg, RoundReport, to_arrayrecord, to_numpy
from strategies.sampling import NotEnoughNodes, wait_for_nodes
from strategies.robust import CoordinateMedian, Krum, NormBound, TrimmedMean
from strategies.secure_aggregation import SecAggPlus
from strategies.stages import AggregationStage
from strategies.server_optimizers import (
    DEFAULT_LEARNING_RATES,
    ServerOptimizer,
    make_server_optimizer,
)

from .checkpoint import (
    CheckpointError,
    ResumePlan,
    plan_resume,
    save_run_checkpoint,
    set_aside_damaged_metrics,
    write_privacy_ledger,
)
from .config import ConfigError, RunConfig, parse_run_config
from .data_report import log_client_summary, plot_label_distribution
from .mlflow_log import MlflowLog, TrackingError, check_tracking
from .plots import plot_run
from .progress import format_round_line, format_summary
from .run_outputs import (
    MetricsLog,
    OutputDirError,
    check_output_dir,
    create_run_dir,
    resolve_output_dir,
)
from .tensorboard_log import TensorBoardLog
from .task import federation_spec, model_spec

if TYPE_CHECKING:  # pragma: no cover
    import keras

app = ServerApp()


class CentralEvaluator:
    """Evaluates a global model on the server's held-out test set.

    The FedAvg procedure of the design ends every round by testing the new
    global model on held-out data to see whether it improved.
    """

    def __init__(self, config: RunConfig) -> None:
        try:
            _, self.test = load_server_split(
                config.dataset, config.data_path, config.test_fraction, config.seed,
                config.max_classes,
            )
        except (ValueError, OSError) as error:  # TableFileError is a ValueError
            raise ConfigError(
                f"run config 'dataset' = {config.dataset!r}, 'data-path' = "
                f"{config.data_path!r}: the server cannot load its test set: {error}"
            ) from error
        self.spec = model_spec(config, self.test)
        try:
            self.model = get_model(self.spec)
        except ValueError as error:  # e.g. the CNN for a table
            raise ConfigError(
                f"run config 'model' = {config.model!r} for dataset {config.dataset!r} "
                f"({self.test.kind} data): {error}"
            ) from error

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Return ``central-loss`` and ``central-accuracy`` of ``arrays``."""
        set_weights(self.model, to_numpy(arrays))
        loss, accuracy = evaluate(self.model, self.test)
        return MetricRecord({"central-loss": loss, "central-accuracy": accuracy})


def build_server_optimizer(config: RunConfig) -> ServerOptimizer | None:
    """The server optimiser (Reddi et al. 2021), or None for plain averaging.

    ``server-learning-rate`` 0 means the optimiser's default (sgd and momentum
    1.0, adam 0.1, yogi 0.01, as Flower's FedAvgM/FedAdam/FedYogi).
    """
    name = config.server_optimizer
    rate = config.server_learning_rate or DEFAULT_LEARNING_RATES[name]
    if name == "sgd" and rate == 1.0:
        return None  # x + 1.0 * mean update is the mean itself: FedAvg
    hyper = {"momentum": config.server_momentum} if name == "momentum" else {}
    return make_server_optimizer(name, rate, **hyper)


def build_secure_aggregation(config: RunConfig) -> SecAggPlus | None:
    """SecAgg+ with the run config's parameters (``secure-aggregation``), else ``None``."""
    if not config.secure_aggregation:
        return None
    try:
        parameters = SecAggParameters(
            threshold=config.secagg_threshold,
            neighbours=config.secagg_neighbours,
            clipping_range=config.secagg_clipping_range,
            quantization_bits=config.secagg_quantization_bits,
            modulus_bits=config.secagg_modulus_bits,
            max_weight=config.secagg_max_weight,
        )
    except SecAggError as error:
        raise ConfigError(f"invalid secure aggregation settings: {error}") from error
    return SecAggPlus(parameters)


def build_aggregator(config: RunConfig) -> AggregationStage | None:
    """The robust aggregation stage of ``aggregator`` (``None``: FedAvg's weighted mean)."""
    if config.aggregator == "median":
        return CoordinateMedian()
    if config.aggregator == "trimmed-mean":
        return TrimmedMean(config.trim_fraction)
    if config.aggregator in ("krum", "multi-krum"):
        keep = 1 if config.aggregator == "krum" else None
        return Krum(config.byzantine_clients, keep=keep)
    if config.aggregator == "norm-bound":
        return NormBound(config.update_norm_bound, adaptive=config.norm_bound_adaptive)
    return None


def check_simulation_only(config: RunConfig, grid: Grid) -> None:
    """Refuse simulated faulty clients outside Flower's simulation engine (before round 1)."""
    if config.faulty_fraction > 0 and not isinstance(grid, InMemoryGrid):
        raise ConfigError(
            f"run config 'faulty-fraction' = {config.faulty_fraction:g} makes clients "
            "misbehave on purpose to evaluate robust aggregation; it is allowed in Flower's "
            "simulation engine only, never in a deployment; set faulty-fraction = 0"
        )


def resolved_noise_multiplier(config: RunConfig) -> float:
    """``noise-multiplier``, or with ``'auto'`` the smallest that fits ``target-epsilon``.

    Calibrated by RDP (an upper bound on the PLD figure) for
    ``num-server-rounds`` Poisson-sampled rounds at rate ``fraction-train``,
    so the run's budget stop (``target-epsilon``) is not reached before its
    last round. With adaptive clipping it is the total multiplier, split
    between the update and the clipped-count query as always.
    """
    if config.noise_multiplier != "auto":
        return float(config.noise_multiplier)
    z = calibrate_noise_multiplier(
        config.target_epsilon,
        config.target_delta,
        config.num_server_rounds,
        config.fraction_train,
        "poisson",
    )
    log(
        INFO,
        "noise-multiplier 'auto': %.4g keeps %d rounds at sampling rate %.4g within "
        "epsilon %g at delta %.3g",
        z,
        config.num_server_rounds,
        config.fraction_train,
        config.target_epsilon,
        config.target_delta,
    )
    return z


def warn_if_noise_swamps_updates(
    strategy: FedAvg, num_nodes: int, num_parameters: int
) -> float | None:
    """Log a WARNING before round 1 when DP noise will drown the updates; the ratio.

    ``z sqrt(d) / m`` (:func:`privacy.central.noise_to_signal`): the norm of a
    round's noise against the largest mean update. Above
    :data:`~privacy.central.NOISE_TO_SIGNAL_WARNING` the run will stay near
    chance accuracy or learn far less than without noise; the warning says
    what to change and points to README's recipe.
    """
    if not isinstance(strategy, DPFedAvg) or num_nodes <= 0:
        return None
    mechanism = strategy.mechanism
    ratio = mechanism.noise_to_signal(list(range(num_nodes)), num_parameters)
    if ratio > NOISE_TO_SIGNAL_WARNING:
        expected = mechanism.plan_round(1, list(range(num_nodes))).denominator
        log(
            WARNING,
            "DP noise will drown the updates: each round's noise has %.3g times the norm "
            "of the largest possible mean update (noise-multiplier %.3g, about %.3g clients "
            "per round, %d shared parameters); expect accuracy near chance or far below "
            "a run without noise. User-level DP needs many clients per round (hundreds) "
            "and a small model: see README, 'A DP recipe that learns' (model='mlp', "
            "1000 clients, fraction-train 0.1, server-learning-rate 0.25, "
            "noise-multiplier='auto').",
            ratio,
            mechanism.noise_multiplier,
            expected,
            num_parameters,
        )
    return ratio


def build_strategy(config: RunConfig) -> FedAvg:
    """FedAvg (with the chosen aggregator), or DP-FedAvg, with the chosen server optimiser."""
    optimizer = build_server_optimizer(config)
    common = dict(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=config.min_evaluate_nodes,
        node_wait_timeout=config.node_wait_timeout,
        seed=config.seed,
    )
    secure = build_secure_aggregation(config)
    if config.strategy == "fedavg":
        return FedAvg(
            server_optimizer=optimizer,
            aggregator=build_aggregator(config),
            # Per-client figures need each update; secure aggregation hides them.
            report_clients=config.client_report and secure is None,
            secure_aggregation=secure,
            **common,
        )
    if config.aggregator == "norm-bound":
        log(
            INFO,
            "aggregator='norm-bound' under DP-FedAvg is DP-FedAvg's own clipping: every "
            "update is bounded to clipping-norm %g (update-norm-bound is not used)",
            config.clipping_norm,
        )
    sgd_rate = config.server_learning_rate or 1.0
    try:
        return DPFedAvg(
            noise_multiplier=resolved_noise_multiplier(config),
            clipping_norm=config.clipping_norm,
            clipping=config.clipping,  # type: ignore[arg-type]
            clipping_side=config.clipping_side,  # type: ignore[arg-type]
            # Noise first, then the optimiser: post-processing of the release.
            server_learning_rate=sgd_rate if config.server_optimizer == "sgd" else 1.0,
            server_optimizer=None if config.server_optimizer == "sgd" else optimizer,
            client_sampling=config.client_sampling,  # type: ignore[arg-type]
            target_delta=config.target_delta,
            target_epsilon=config.target_epsilon or None,
            target_unclipped_quantile=config.target_unclipped_quantile,
            clipping_learning_rate=config.clipping_learning_rate,
            local_dp_epsilon=config.local_dp_epsilon or None,
            insecure_dp_seed=None if config.insecure_dp_seed < 0 else config.insecure_dp_seed,
            secure_aggregation=secure,
            noise_placement=config.dp_noise,  # type: ignore[arg-type]
            **common,
        )
    except ValueError as error:
        raise ConfigError(f"invalid DP-FedAvg settings: {error}") from error


# What FedAvg's metric aggregation makes of the clients' sample-epsilon.
SAMPLE_EPSILON_MAX = f"{protocol.SAMPLE_EPSILON}-max"


def running_sample_epsilon_max(
    earlier: list[dict], entry: dict[str, float | int]
) -> float:
    """The largest sample-level epsilon any client has reported up to this round.

    Each client's epsilon only grows, and a client that stopped (budget
    exhausted) or was not sampled keeps the epsilon it last reported, so the
    figure that bounds every record of the federation is the maximum over
    all replies so far, not over this round's replies only.
    """
    values = [float(e[SAMPLE_EPSILON_MAX]) for e in earlier if e.get(SAMPLE_EPSILON_MAX) is not None]
    if SAMPLE_EPSILON_MAX in entry:
        values.append(float(entry[SAMPLE_EPSILON_MAX]))
    return max(values, default=0.0)


def log_dp_sgd_meaning(config: RunConfig) -> None:
    """State what DP-SGD's epsilon covers, and what it does not, before round 1."""
    log(
        INFO,
        "DP-SGD on every client: sample-level DP of each client's training records "
        "(clipping norm %g, noise multiplier %g); 'sample-epsilon-max' in metrics.json is "
        "the largest epsilon any client has spent (per run, at delta %g)%s",
        config.dp_sgd_clipping_norm,
        config.dp_sgd_noise_multiplier,
        config.target_sample_delta,
        "; 'epsilon' is DP-FedAvg's user-level epsilon (whole clients)"
        if config.strategy == "dp-fedavg" else "",
    )
    if config.fraction_evaluate > 0:
        log(
            WARNING,
            "DP-SGD covers training records only: federated evaluation (fraction-evaluate "
            "%g) sends accuracy and loss on the clients' validation records without noise; "
            "set fraction-evaluate=0 where those records need the guarantee too",
            config.fraction_evaluate,
        )


#: Per-round flag in metrics.json of a DP run without a guarantee: its noise a seed
#: replays (insecure-dp-seed), or it adds none (noise-multiplier 0, epsilon "inf").
NOT_PRIVATE_KEY = "not-private"


def privacy_statement(config: RunConfig, strategy: FedAvg) -> dict[str, object]:
    """What the run's privacy figures mean, written once at the top of ``metrics.json``.

    Who is protected against whom, under which neighbouring relation, and
    which published figures the guarantee does not cover (see README,
    "Threat model").
    """
    statement: dict[str, object] = {"user-level-dp": isinstance(strategy, DPFedAvg)}
    if isinstance(strategy, DPFedAvg):
        statement.update(
            {
                "private": strategy.private,
                "stamp": "private" if strategy.private else NOT_PRIVATE,
                "protects": "each client's whole contribution, against anyone who sees the "
                "released models or these figures (not against the server: central DP)",
                "relation": strategy.mechanism.relation,
                "noise-multiplier": strategy.mechanism.noise_multiplier,
                "noise-multiplier-from": "target-epsilon (noise-multiplier 'auto')"
                if config.noise_multiplier == "auto"
                else "run config",
                "not-covered": list(NOT_COVERED),
            }
        )
    if strategy.secure_aggregation is not None:
        statement["secure-aggregation"] = secure_aggregation_statement(config, strategy)
        if isinstance(strategy, DPFedAvg) and config.dp_noise == "distributed":
            statement["protects"] = (
                "each client's whole contribution, against anyone who sees the released "
                "models or these figures, and against the server: the clients add the noise "
                "under the masks, so the server only ever unmasks a noised sum (assuming the "
                "round's at least secagg-threshold survivors are honest)"
            )
    if config.dp_sgd:
        statement["sample-level-dp"] = (
            "each training record of a client, against the server and anyone after it "
            "(DP-SGD on the client; randomness from the client's OS)"
        )
    return statement


def secure_aggregation_statement(config: RunConfig, strategy: FedAvg) -> dict[str, object]:
    """What secure aggregation protects and what the server still sees (``metrics.json``)."""
    assert strategy.secure_aggregation is not None
    if not isinstance(strategy, DPFedAvg):
        sees = ("the sum of the round's weight-scaled updates and the sum of the (capped) "
                "example counts, never one client's update or count")
    elif config.dp_noise == "distributed":
        sees = ("the sum of the round's clipped updates with the clients' distributed discrete "
                "Gaussian noise already in it")
    else:
        sees = "the noiseless sum of the round's clipped updates (it adds the noise itself)"
    return {
        "protocol": "SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020)",
        "protects": "each client's update, against an honest-but-curious server and up to "
        "threshold - 1 clients colluding with it",
        "server-sees": sees,
        "not-protected": "an actively malicious client can add any vector within the "
        "quantisation range, or void rounds by dropping out; the server cannot check one "
        "update (NaN/Inf, norm): clients check and clip their own",
        "parameters": strategy.secure_aggregation.parameters.as_config(),
    }


def round_entry(report: RoundReport, strategy: FedAvg | None = None) -> dict[str, float | int]:
    """One round's entry of ``metrics.json`` (with the privacy ledger's figures under DP)."""
    entry: dict[str, float | int] = {"round": report.server_round}
    entry.update(report.train_metrics)
    for key, value in report.federated_metrics.items():
        entry[key.replace("eval-", "federated-")] = value
    if "eval-accuracy" in report.federated_metrics:
        # The global model's accuracy on the clients' validation data.
        entry["global-accuracy"] = report.federated_metrics["eval-accuracy"]
    entry.update(report.central_metrics)
    if report.server_round > 0:
        entry["num-sampled"] = report.num_sampled
        entry["num-accepted"] = report.num_accepted
        entry["num-rejected"] = report.num_rejected
        entry["elapsed-s"] = round(report.elapsed_s, 3)
        entry.update(report.aggregation_metrics)
        if report.client_figures:
            # Never under DP-FedAvg: its stage does not release per-client figures.
            entry["clients"] = report.client_figures
        if isinstance(strategy, DPFedAvg) and not strategy.private:
            entry[NOT_PRIVATE_KEY] = 1
        trainer = getattr(strategy, "server_update_fn", None)
        if isinstance(trainer, ServerTrainer) and trainer.last_loss is not None:
            entry["server-train-loss"] = trainer.last_loss
    return entry


@dataclass
class PreparedRun:
    """A run that passed every check; nothing of it is written yet."""

    config: RunConfig
    strategy: FedAvg
    evaluator: CentralEvaluator
    private_paths: frozenset[str]
    #: ``<output-dir>`` (a new run's folder is created in it) or, resuming, the run's folder.
    output_dir: Path
    #: The restored checkpoint and history (``resume``), else None.
    resume: ResumePlan | None
    federation: Federation
    server_data: LabeledData | None
    #: Values of the model's shared variables (what the clients send back).
    num_shared_parameters: int


def checked_output_dir(config: RunConfig) -> Path:
    """``output-dir`` resolved, or a ConfigError if it cannot hold run folders (reads only)."""
    path = resolve_output_dir(config.output_dir)
    try:
        check_output_dir(path)
    except OutputDirError as error:
        raise ConfigError(
            f"run config 'output-dir' = {config.output_dir!r}: {error}; name a folder "
            "(it is created if missing)"
        ) from error
    return path


def checked_resume_dir(config: RunConfig) -> Path:
    """The folder ``resume`` names, or a ConfigError if it is none (reads only)."""
    run_dir = resolve_output_dir(config.resume)
    if not run_dir.exists():
        raise ConfigError(
            f"run config 'resume' = {config.resume!r}: {run_dir} does not exist; name the "
            "folder of an earlier run (<output-dir>/<run id>)"
        )
    if not run_dir.is_dir():
        raise ConfigError(
            f"run config 'resume' = {config.resume!r}: {run_dir} is a file, not a run "
            "folder; name the folder of an earlier run (<output-dir>/<run id>)"
        )
    return run_dir


def resume_checkpoint(run_dir: Path, strategy: FedAvg, config: RunConfig) -> ResumePlan:
    """The checkpoint and history to continue from (strategy restored), or a ConfigError.

    Reads the run folder only: a refused resume changes nothing in it.
    """
    try:
        return plan_resume(run_dir, strategy, config.as_dict())
    except CheckpointError as error:
        raise ConfigError(f"run config 'resume' = {config.resume!r}: {error}") from error


def checked_federation(grid: Grid, config: RunConfig) -> Federation:
    """The clients' partition over the connected nodes, or a ConfigError (before round 1).

    The server rebuilds the partition from the same spec as the clients, with
    one partition per connected node (as Flower's simulation assigns them).
    A partition that cannot be built (more clients than samples, a natural
    split whose institutions do not match the nodes) is refused here.
    """
    nodes = wait_for_nodes(grid, config.min_train_nodes, config.node_wait_timeout)
    try:
        return build_federation(federation_spec(config, len(nodes)))
    except ValueError as error:
        raise ConfigError(
            f"run config 'dataset' = {config.dataset!r}, 'partitioner' = "
            f"{config.partitioner!r}: the data cannot be split over the {len(nodes)} "
            f"connected nodes: {error}"
        ) from error


def check_dp_plan(strategy: FedAvg, num_nodes: int) -> None:
    """Plan DP-FedAvg's first round for ``num_nodes`` nodes, or a ConfigError (before round 1).

    Some settings are only wrong for a number of nodes (adaptive clipping's
    count noise is sized from the expected clients per round), so they are
    checked once the nodes are known, before anything is written.
    """
    if not isinstance(strategy, DPFedAvg):
        return
    try:
        strategy.mechanism.plan_round(1, list(range(num_nodes)))
    except ValueError as error:
        raise ConfigError(
            f"invalid DP-FedAvg settings for {num_nodes} connected nodes (run config "
            f"'noise-multiplier', 'clipping', 'fraction-train'): {error}"
        ) from error


def check_secure_plan(strategy: FedAvg, num_nodes: int, num_parameters: int) -> None:
    """A ConfigError before round 1 if the secure sum of ``num_nodes`` clients could wrap.

    Under DP the round's encoding is planned too (the rounding margin of the
    clipped updates, the distributed noise's reach).
    """
    secure = strategy.secure_aggregation
    if secure is None:
        return
    if isinstance(strategy, DPFedAvg):
        try:
            strategy.stage.check_secure(secure.parameters, num_parameters, num_nodes)
        except ValueError as error:
            raise ConfigError(
                f"secure aggregation with DP-FedAvg for {num_nodes} nodes: {error}"
            ) from error
    most = secure.parameters.max_clients()
    if num_nodes > most:
        raise ConfigError(
            f"secure aggregation of up to {num_nodes} clients per round could wrap around the "
            f"modulus: run config 'secagg-quantization-bits' = "
            f"{secure.parameters.quantization_bits}, 'secagg-max-weight' = "
            f"{secure.parameters.max_weight} and 'secagg-modulus-bits' = "
            f"{secure.parameters.modulus_bits} allow at most {most}; lower the first two "
            "or raise the modulus"
        )


def checked_server_data(config: RunConfig) -> LabeledData | None:
    """The server's public slice (``server-data``), or a ConfigError."""
    try:
        return load_server_data(federation_spec(config, 1))
    except ValueError as error:
        raise ConfigError(f"run config 'server-data' = {config.server_data!r}: {error}") from error


def checked_tracking() -> None:
    """MLflow installed and ``MLFLOW_TRACKING_URI`` answering, or a ConfigError."""
    try:
        check_tracking()
    except TrackingError as error:
        raise ConfigError(f"run config 'tracking' = 'mlflow': {error}") from error


def prepare_run(grid: Grid, context: Context) -> PreparedRun:
    """Every check that can refuse the run, before anything is written.

    Config, output folder, data, private layers, the resume (checkpoint,
    run config against it, ``metrics.json``), the connected nodes and the
    partition. A refused run leaves no file behind and changes none: a new
    run's folder does not exist yet, and a resumed run's folder is only read.
    The refusal is logged at ERROR (naming the key, and the file at fault)
    before it is raised, so the run's log says why Flower marks it failed.

    Raises
    ------
    ConfigError
        Naming the run-config key (and file) at fault.
    NotEnoughNodes
        If too few nodes connect within node-wait-timeout.
    """
    try:
        config = parse_run_config(context.run_config)
        strategy = build_strategy(config)
        output_dir = checked_resume_dir(config) if config.resume else checked_output_dir(config)
        evaluator = CentralEvaluator(config)
        private_paths = check_private_layers(config, evaluator.model)
        check_simulation_only(config, grid)
        resume = resume_checkpoint(output_dir, strategy, config) if config.resume else None
        federation = checked_federation(grid, config)
        check_dp_plan(strategy, len(federation.partitions))
        num_shared = sum(
            int(np.prod(v.shape))
            for k, v in get_weights(evaluator.model).items()
            if k not in private_paths
        )
        check_secure_plan(strategy, len(federation.partitions), num_shared)
        server_data = checked_server_data(config)
        if config.tracking == "mlflow":
            checked_tracking()
    except (ConfigError, NotEnoughNodes) as error:
        log(ERROR, "Run %s refused (nothing written): %s", context.run_id, error)
        raise
    return PreparedRun(
        config, strategy, evaluator, private_paths, output_dir, resume, federation, server_data,
        num_shared,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated training as the run config says."""
    # A quiet log with Flower's lines printed once (app/logs.py; done when `app`
    # is imported, idempotent); FEDPRIVACY_VERBOSE=1 brings every log back.
    from app.logs import configure as configure_logging  # pylint: disable=import-outside-toplevel

    configure_logging()
    prepared = prepare_run(grid, context)
    config, strategy, evaluator = prepared.config, prepared.strategy, prepared.evaluator
    private_paths, resume = prepared.private_paths, prepared.resume
    if config.dp_sgd:
        log_dp_sgd_meaning(config)
    # Every check passed: only now is anything written.
    if resume is not None:
        run_dir = prepared.output_dir
        log(INFO, "Run %s continues the run in %s", context.run_id, run_dir)
        if resume.damaged_metrics is not None:
            set_aside_damaged_metrics(resume.damaged_metrics)
    else:
        run_dir = create_run_dir(prepared.output_dir, context.run_id)
        log(INFO, "Run %s: outputs in %s", context.run_id, run_dir)

    report_federation(prepared.federation, config, run_dir)
    noise_ratio = warn_if_noise_swamps_updates(
        strategy, len(prepared.federation.partitions), prepared.num_shared_parameters
    )
    # The server holds, and sends, only the shared variables.
    # The seeded initial weights, not the cached model's current ones (a process
    # that ran an earlier federation holds that run's trained weights in it).
    shared, _ = split_weights(initial_weights(evaluator.spec), private_paths)
    start_round, kept = 1, []
    if resume is not None:
        kept = resume.kept
        shared, start_round = resume.checkpoint.arrays, resume.checkpoint.round + 1
    central = evaluator
    if private_paths & head_paths(evaluator.model):
        central = None
        log(
            INFO,
            "Central evaluation is off: the classifier head is private, so the server "
            "has no complete model; see personalized-accuracy from the clients",
        )
    elif private_paths:
        log(
            INFO,
            "Central evaluation uses the shared weights with the seeded initial "
            "values of the %d private variables",
            len(private_paths),
        )

    server_data = prepared.server_data
    strategy.server_update_fn = make_server_update_fn(
        evaluator.model,
        server_data,
        epochs=config.server_train_epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=config.seed,
    )
    if strategy.server_update_fn is not None and server_data is not None:
        log(
            INFO,
            "Server fine-tunes each new global model for %d epoch(s) on %d public "
            "samples (held out from every client and from the test set)",
            config.server_train_epochs,
            len(server_data),
        )

    metrics_log = MetricsLog(run_dir / "metrics.json", config.as_dict(), kept)
    metrics_log.content["privacy"] = privacy_statement(config, strategy)
    if noise_ratio is not None:
        metrics_log.content["privacy"]["noise-to-signal"] = noise_ratio
    tensorboard = TensorBoardLog.rebuild(run_dir, kept) if kept else TensorBoardLog(run_dir)
    tracker = MlflowLog(run_dir, config.as_dict(), kept) if config.tracking == "mlflow" else None
    round_times = [float(e["elapsed-s"]) for e in kept if e.get("elapsed-s") is not None]
    if isinstance(strategy, DPFedAvg):
        strategy.on_privacy_spent = lambda server_round, ledger: write_privacy_ledger(
            run_dir, server_round, ledger
        )

    def on_round_end(report: RoundReport) -> None:
        entry = round_entry(report, strategy)
        if config.dp_sgd and report.server_round > 0:
            entry[SAMPLE_EPSILON_MAX] = running_sample_epsilon_max(
                metrics_log.content["rounds"], entry
            )
        # The checkpoint goes first: a run killed before metrics.json is
        # rewritten still gets this round's entry back on resume.
        save_run_checkpoint(
            run_dir, report.server_round, to_numpy(report.arrays), strategy,
            config.as_dict(), entry,
        )
        metrics_log.append(entry)
        tensorboard.log_round(entry)
        if tracker is not None:
            tracker.log_round(entry)
        if report.server_round > 0:
            round_times.append(report.elapsed_s)
        log(INFO, "%s", format_round_line(
            entry, config.num_server_rounds, sum(round_times), round_times
        ))

    t_start = time.monotonic()
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=to_arrayrecord(shared),
            num_rounds=config.num_server_rounds,
            timeout=config.round_timeout,
            train_config=ConfigRecord(
                {
                    protocol.LOCAL_EPOCHS: config.local_epochs,
                    protocol.BATCH_SIZE: config.batch_size,
                    protocol.LEARNING_RATE: config.learning_rate,
                    # Names the run across resumes: clients key their ledgers by it.
                    protocol.RUN_KEY: run_dir.name,
                    # A node without a ledger of those rounds counts them as spent.
                    protocol.ROUNDS_BEFORE_RESUME: start_round - 1,
                }
            ),
            evaluate_config=ConfigRecord({protocol.BATCH_SIZE: config.batch_size}),
            evaluate_fn=central,
            on_round_end=[on_round_end],
            start_round=start_round,
        )
        if strategy.stop_reason is not None:
            log(WARNING, "Run ended early: %s", strategy.stop_reason)
        if isinstance(strategy, DPFedAvg) and strategy.ledger.rounds:
            log(
                INFO,
                "Privacy spent: epsilon %.4g at delta %.3g after %d rounds "
                "(user-level, RDP accountant, %s sampling)",
                strategy.ledger.epsilon,
                strategy.ledger.target_delta,
                strategy.ledger.rounds,
                strategy.client_sampling,
            )
        plot_run(metrics_log.content, run_dir / "plots")
        save_model(evaluator, result.arrays, run_dir / "model.keras")
        for line in format_summary(
            metrics_log.content, run_dir, time.monotonic() - t_start
        ).splitlines():
            log(INFO, "%s", line)
        if tracker is not None:
            if strategy.stop_reason is not None:
                tracker.set_tags({"fedprivacy.stop-reason": strategy.stop_reason})
            tracker.log_artifacts([
                run_dir / "plots", run_dir / "label-distribution.png",
                run_dir / "model.keras", run_dir / "metrics.json",
            ])
            tracker.close("FINISHED")
    except BaseException as error:
        if tracker is not None:
            tracker.close("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        tensorboard.close()


def head_paths(model: keras.Model) -> frozenset[str]:
    """Variable paths of the classifier head."""
    return private_variable_paths(model, "head")


def check_private_layers(config: RunConfig, model: keras.Model) -> frozenset[str]:
    """The private variable paths, or a ConfigError before round 1.

    Clients with different tasks have heads of different sizes; that only
    works when the head is private (each client keeps its own).
    """
    try:
        private = private_variable_paths(model, config.private_layers)
    except ValueError as error:
        raise ConfigError(f"run config 'private-layers': {error}") from error
    tasks = {task.strip() for task in config.client_tasks.split(",")}
    if len(tasks) > 1 and not head_paths(model) <= private:
        raise ConfigError(
            f"run config 'client-tasks' = {config.client_tasks!r} gives clients "
            "different label spaces; that needs a private head "
            "(private-layers='head' or a pattern matching 'head')"
        )
    return private


def report_federation(federation: Federation, config: RunConfig, run_dir: Path) -> None:
    """Log what each client holds and plot it into ``run_dir``, before round 1.

    ``federation`` comes from :func:`checked_federation` (built before the
    run folder is written to).
    """
    plot = plot_label_distribution(federation, run_dir / "label-distribution.png")
    log_client_summary(federation, plot)
    if config.dp_sgd:
        train_sizes = [
            local_train_size(len(partition), config.val_fraction)
            for partition in federation.partitions
        ]
        log_projected_sample_privacy(config, train_sizes)


def log_projected_sample_privacy(config: RunConfig, train_sizes: list[int]) -> float:
    """Log the sample-level epsilon the run will spend at most, before round 1.

    The projection assumes every client trains in every round (no credit for
    the server's client sampling), so it bounds what any client can reach;
    the smallest client has the largest sampling rate ``B / n`` and so the
    largest epsilon. Returns that epsilon.
    """
    smallest = min(n for n in train_sizes if n > 0) if any(train_sizes) else 0
    if smallest == 0:
        log(WARNING, "DP-SGD: no client has training data; no sample-level epsilon to project")
        return 0.0
    rounds = config.num_server_rounds
    projected = sample_epsilon(
        smallest, config.batch_size, config.local_epochs, rounds,
        config.dp_sgd_noise_multiplier, config.target_sample_delta,
    )
    log(
        INFO,
        "DP-SGD: projected sample-level epsilon <= %.4g at delta %g after %d rounds "
        "(smallest client, %d training records, batch %d, %d local epochs, noise "
        "multiplier %g, clipping norm %g; RDP accountant, every round assumed)",
        projected, config.target_sample_delta, rounds, smallest, config.batch_size,
        config.local_epochs, config.dp_sgd_noise_multiplier, config.dp_sgd_clipping_norm,
    )
    if config.target_sample_delta >= 1.0 / smallest:
        log(
            WARNING,
            "DP-SGD: target-sample-delta %g is not below 1/n = %.3g of the smallest client; "
            "such a delta allows leaking a whole record",
            config.target_sample_delta, 1.0 / smallest,
        )
    if config.target_sample_epsilon > 0 and projected > config.target_sample_epsilon:
        log(
            WARNING,
            "DP-SGD: target-sample-epsilon %g: the smallest client can train %d of %d "
            "rounds before it stops",
            config.target_sample_epsilon,
            affordable_rounds(
                smallest, config.batch_size, config.local_epochs,
                config.dp_sgd_noise_multiplier, config.target_sample_epsilon, rounds,
                config.target_sample_delta,
            ),
            rounds,
        )
    return projected


def save_model(evaluator: CentralEvaluator, arrays: ArrayRecord, path: Path) -> None:
    """Save the final global model as a Keras file (``keras.saving.load_model`` reads it).

    Private variables keep their seeded initial values: each client's
    personalised part never reaches the server.
    """
    set_weights(evaluator.model, to_numpy(arrays))
    evaluator.model.save(path)
