"""The ClientApp: local training and evaluation on this node's part of the data.

Only shared variables ever leave the node: the private ones (``private-layers``)
stay in the node's state between rounds, and a guard refuses any reply that
would carry anything else, or anything not shaped and typed as the server sent it.

The run config is the server side's choice; the node's own limits in its node
config (:mod:`privacy.node_limits`) bind whatever it asks. A message that would
weaken them is answered with an error reply before anything is trained, saved
or sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from clients import secure_aggregation as secagg_client
from clients.dp_sgd import dp_sgd_train
from clients.private_layers import (
    PrivateWeightLeak,
    guard_outgoing,
    private_variable_paths,
    shared_spec,
    split_weights,
)
from clients.faults import faulty_update, flip_labels, is_faulty
from clients.proximal import local_seed, train_proximal
from clients.training import ModelSpec, get_model, initial_weights
from clients.training import evaluate as evaluate_model
from clients.weights import get_weights, set_weights
from data.dataset import LabeledData
from data.federation import load_client_data
from data.node_files import load_node_data, node_data
from data.tasks import apply_task, task_of
from privacy.clipping import clip_to_reference
from privacy.local_dp import privatize_arrays
from privacy.node_limits import (
    NodeLimits,
    ServerRequest,
    Violation,
    effective_sample_epsilon,
    parse_node_limits,
    private_layer_violations,
    violations,
)
from privacy.randomness import secure_generator
from privacy.sample_accounting import SampleDPRound
from strategies import protocol
from strategies.fedavg import to_arrayrecord, to_numpy

from . import warm_worker
from .config import RunConfig, parse_run_config
from .private_state import load_private, save_private
from .sample_ledger import (
    METRIC_SAMPLE_EPSILON_ALL_RUNS,
    reply_metrics,
    assume_spent,
    load_ledger,
    record_round,
)
from .task import federation_spec, model_spec

app = ClientApp()

# Error codes and config keys of the protocol (strategies.protocol).
PRIVATE_WEIGHT_LEAK = protocol.ERROR_PRIVATE_WEIGHT_LEAK
SAMPLE_BUDGET_EXHAUSTED = protocol.ERROR_SAMPLE_BUDGET_EXHAUSTED
NODE_PRIVACY_LIMIT = protocol.ERROR_NODE_PRIVACY_LIMIT
ROUNDS_BEFORE_RESUME = protocol.ROUNDS_BEFORE_RESUME


@dataclass(frozen=True)
class LocalSetup:
    """What a node works with: its data for its task, its model, the weight split.

    ``private_paths`` is the union of what the server's ``private-layers``
    and the node's own (``node_private_paths``) keep on the node;
    ``shared_paths`` is every other variable.
    """

    partition_id: int
    task: str
    train: LabeledData
    val: LabeledData
    spec: ModelSpec
    private_paths: frozenset[str]
    shared_paths: frozenset[str]
    limits: NodeLimits = NodeLimits()
    server_private_paths: frozenset[str] = frozenset()
    node_private_paths: frozenset[str] = frozenset()
    #: A simulated faulty client (``faulty-fraction``, simulation only).
    faulty: bool = False


@lru_cache(maxsize=16)
def _private_paths(spec: ModelSpec, private_layers: str) -> tuple[frozenset[str], frozenset[str]]:
    model = get_model(spec)
    private = private_variable_paths(model, private_layers)
    return private, frozenset(v.path for v in model.weights) - private


def local_setup(context: Context) -> LocalSetup:
    """This node's data, task and model, from the run config and the node config.

    In simulation Flower sets ``partition-id`` and ``num-partitions``; a
    deployed SuperNode gets them, or ``data-path`` (an institution's own
    file, loaded alone and not partitioned), from ``--node-config``: one code
    path (:mod:`data.node_files`). The node's privacy limits come from the
    same node config; a bad one fails here, before any data is loaded.

    Raises
    ------
    ValueError
        For a bad node config or private-layers that, united, leave nothing
        to share.
    """
    config = parse_run_config(context.run_config)
    limits = parse_node_limits(context.node_config)
    source = node_data(context.node_config)
    partition_id = source.partition_id
    if source.data_path is not None:
        train, val = load_node_data(
            config.dataset, source.data_path, config.val_fraction, config.seed, partition_id,
            max_classes=config.max_classes,
        )
    else:
        assert source.num_partitions is not None
        train, val = load_client_data(
            federation_spec(config, source.num_partitions), partition_id
        )
    task = task_of(partition_id, config.client_tasks)
    train, val = apply_task(train, task), apply_task(val, task)
    faulty = source.num_partitions is not None and is_faulty(
        partition_id, source.num_partitions, config.faulty_fraction
    )
    if faulty and config.faulty_kind == "label-flip":
        train = flip_labels(train)
    spec = model_spec(config, train)
    server_private, server_shared = _private_paths(spec, config.private_layers)
    node_private, node_shared = _private_paths(spec, limits.private_layers)
    shared = server_shared & node_shared
    if not shared:
        raise ValueError(
            f"run config private-layers={config.private_layers!r} and node config "
            f"private-layers={limits.private_layers!r} together make every variable "
            "private; nothing would be shared"
        )
    return LocalSetup(
        partition_id, task, train, val, spec, server_private | node_private, shared,
        limits, server_private, node_private, faulty,
    )


def private_part(context: Context, setup: LocalSetup) -> dict[str, np.ndarray]:
    """The node's private weights, or the deterministic initial ones if it has none yet."""
    _, initial = split_weights(initial_weights(setup.spec), setup.private_paths)
    stored = load_private(context, initial) if initial else None
    if stored is None and initial:
        log(
            INFO,
            "Node %d (partition %d): no private weights yet; using the seeded initial ones",
            context.node_id,
            setup.partition_id,
        )
        return initial
    return stored or {}


def received_shared(msg: Message, setup: LocalSetup) -> dict[str, np.ndarray]:
    """The global arrays, which must be exactly this model's shared variables."""
    arrays = to_numpy(msg.content["arrays"])
    if set(arrays) != setup.shared_paths:
        raise ValueError(
            "the server sent arrays "
            f"{sorted(set(arrays) - setup.shared_paths)} that are not shared variables "
            f"and lacks {sorted(setup.shared_paths - set(arrays))}; "
            "do the server's private-layers and the node's agree?"
        )
    return arrays


def outgoing_arrays(
    local: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray], config: ConfigRecord
) -> dict[str, np.ndarray]:
    """What leaves the client: its arrays, clipped or locally privatised when DP asks.

    Under DP-FedAvg with ``clipping-side='client'`` the update is clipped here
    to ``clipping-norm``; with ``local-dp-epsilon`` it is clipped and noised
    here (the noise drawn from the OS entropy pool, never known to the server).
    """
    if protocol.LOCAL_DP_EPSILON in config:
        return privatize_arrays(
            local,
            global_arrays,
            float(config[protocol.CLIPPING_NORM]),
            float(config[protocol.LOCAL_DP_EPSILON]),
            float(config[protocol.LOCAL_DP_DELTA]),
            secure_generator(),
        )
    if protocol.CLIPPING_NORM in config:
        return clip_to_reference(local, global_arrays, float(config[protocol.CLIPPING_NORM]))
    return local


def server_request(msg: Message, setup: LocalSetup, run_config: RunConfig) -> ServerRequest:
    """What the server asks of this node: its run config's privacy and the arrays it sent."""
    config = msg.content.get(protocol.CONFIG)
    return ServerRequest(
        secure_aggregation=config is not None
        and config.get(protocol.SECAGG_STAGE) == protocol.SECAGG_COLLECT,
        dp_sgd=run_config.dp_sgd,
        dp_sgd_noise_multiplier=run_config.dp_sgd_noise_multiplier,
        target_sample_epsilon=run_config.target_sample_epsilon,
        target_sample_delta=run_config.target_sample_delta,
        private_layers=run_config.private_layers,
        private_paths=setup.server_private_paths,
        sent_paths=frozenset(msg.content[protocol.ARRAYS].keys()),
    )


def refusal(msg: Message, context: Context, found: list[Violation]) -> Message:
    """The error reply to a message that would weaken the node's limits: no content at all."""
    reason = (
        f"node-privacy-limit: node {context.node_id} refuses this "
        f"{msg.metadata.message_type} message, which would weaken its node config's "
        "limits: " + "; ".join(str(v) for v in found)
    )
    log(WARNING, "%s", reason)
    return Message(Error(code=NODE_PRIVACY_LIMIT, reason=reason), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train: in this node's warm worker when its node config names one, else here."""
    return warm_worker.handle("train", msg, context, train_here)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate: in this node's warm worker when its node config names one, else here."""
    return warm_worker.handle("evaluate", msg, context, evaluate_here)


def train_here(msg: Message, context: Context) -> Message:
    """Train the received global model (with this node's private part) and send back the shared part.

    Refused with a ``NODE_PRIVACY_LIMIT`` error reply, before the model is
    touched, when the run config or the sent arrays would weaken the node's
    limits (:func:`privacy.node_limits.violations`).

    Under secure aggregation (:mod:`clients.secure_aggregation`) the key
    stages answer without training, and the collect stage trains as here but
    replies with the masked vector only.
    """
    try:
        stage = secagg_client.is_secure_stage(msg)
    except secagg_client.SecAggRefused as error:
        return secagg_client.refusal(msg, str(error))
    if stage is not None and stage != protocol.SECAGG_COLLECT:
        return secagg_client.handle_key_stage(stage, msg, context)
    setup = local_setup(context)
    run_config = parse_run_config(context.run_config)
    found = violations(
        setup.limits, server_request(msg, setup, run_config), setup.node_private_paths
    )
    if found:
        return refusal(msg, context, found)
    masking = None
    if stage == protocol.SECAGG_COLLECT:
        try:
            masking = secagg_client.receive_shares(msg, context)
        except (secagg_client.SecAggRefused, KeyError, TypeError, ValueError) as error:
            return secagg_client.refusal(msg, str(error))
    model = get_model(setup.spec)
    global_arrays = received_shared(msg, setup)
    set_weights(model, {**global_arrays, **private_part(context, setup)})
    config = msg.content["config"]
    epochs, batch_size = int(config[protocol.LOCAL_EPOCHS]), int(config[protocol.BATCH_SIZE])
    learning_rate = float(config[protocol.LEARNING_RATE])
    metrics: dict[str, float | int] = {}
    loss: float | None
    if run_config.dp_sgd:
        # DP-SGD (Abadi et al. 2016): sample-level privacy of this node's records.
        run_key = str(config[protocol.RUN_KEY]) if protocol.RUN_KEY in config else None
        ledger = load_ledger(context, run_config.target_sample_delta, run_key)
        spec = SampleDPRound(
            len(setup.train), batch_size, epochs, run_config.dp_sgd_noise_multiplier
        )
        assume_spent(context, ledger, spec, int(config.get(ROUNDS_BEFORE_RESUME, 0)), run_key)
        # The stricter of the server's target and the node's own max-sample-epsilon.
        budget = effective_sample_epsilon(setup.limits, run_config.target_sample_epsilon)
        if ledger.would_exceed(spec, budget.epsilon):
            reason = (
                f"sample-budget-exhausted: node {context.node_id} stops training; another "
                f"round would take its sample-level epsilon from {ledger.epsilon:.4g} to "
                f"{ledger.epsilon_after(spec):.4g} > {budget.key} "
                f"{budget.epsilon:g} (delta {ledger.delta:g}, "
                f"{ledger.rounds} rounds trained)"
            )
            log(WARNING, "%s", reason)
            return Message(Error(code=SAMPLE_BUDGET_EXHAUSTED, reason=reason), reply_to=msg)
        result = dp_sgd_train(
            model,
            setup.train,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            noise_multiplier=run_config.dp_sgd_noise_multiplier,
            clipping_norm=run_config.dp_sgd_clipping_norm,
        )
        all_runs = record_round(context, ledger, spec, run_key)
        log(INFO, "Node %d: %d DP-SGD steps, sample-level epsilon %.4g at delta %g",
            context.node_id, result.steps, ledger.epsilon, ledger.delta)
        # No train-loss: it is a statistic of the records, not covered by DP-SGD.
        loss = None
        metrics.update(reply_metrics(ledger))
        if all_runs is not None:
            metrics[METRIC_SAMPLE_EPSILON_ALL_RUNS] = all_runs
    else:
        # One compiled tf.while_loop per epoch: plain minibatch SGD at mu = 0
        # (FedAvg), FedProx (Li et al. 2020) with the proximal term on the
        # shared variables at mu > 0. model.fit costs ~0.1 s of set-up per call,
        # which dominated the rounds of many small clients (bench/scale.py).
        loss = train_proximal(
            model,
            setup.train,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            proximal_mu=run_config.proximal_mu,
            global_weights=global_arrays,
            shared_paths=set(setup.shared_paths),
            seed=local_seed(run_config.seed, int(config[protocol.SERVER_ROUND]), setup.partition_id),
        )
    shared, private = split_weights(get_weights(model), setup.private_paths)
    if private:
        save_private(context, private)
    if setup.faulty:
        # Simulation only (the ServerApp refuses faulty-fraction in a deployment).
        stale, _ = split_weights(initial_weights(setup.spec), setup.private_paths)
        shared = faulty_update(
            run_config.faulty_kind, shared, global_arrays, stale, np.random.default_rng()
        )
    arrays = outgoing_arrays(shared, global_arrays, config)
    try:
        guard_outgoing(arrays, setup.shared_paths, shared_spec(global_arrays))
    except PrivateWeightLeak as leak:
        log(WARNING, "Node %d: %s", context.node_id, leak)
        return Message(Error(code=PRIVATE_WEIGHT_LEAK, reason=str(leak)), reply_to=msg)
    if masking is not None:
        # Only the masked vector leaves: no metrics, no example count (both
        # are in the secure sum or not sent at all).
        try:
            return secagg_client.masked_reply(
                msg, context, masking, arrays, global_arrays, len(setup.train)
            )
        except secagg_client.SecAggRefused as error:
            log(WARNING, "Node %d: %s", context.node_id, error)
            return secagg_client.refusal(msg, str(error))
    content = RecordDict(
        {
            "arrays": to_arrayrecord(arrays),
            "metrics": MetricRecord(
                {
                    **({} if loss is None else {protocol.TRAIN_LOSS: loss}),
                    protocol.NUM_EXAMPLES: len(setup.train),
                    **metrics,
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)


def evaluate_here(msg: Message, context: Context) -> Message:
    """Evaluate the global model and this node's personalised model on local validation data.

    ``eval-*``: the global shared weights with the seeded initial private part
    (what a newcomer would get; the global model itself when nothing is
    private). ``personalized-*``: the global shared weights with this node's
    own private part. The private part is the union of the server's and the
    node's ``private-layers``; a server that sends any of the node's own
    private variables is refused as in :func:`train`.
    """
    setup = local_setup(context)
    run_config = parse_run_config(context.run_config)
    # Only metrics leave; DP-SGD limits bind training, the private split binds both.
    found = private_layer_violations(
        setup.limits, server_request(msg, setup, run_config), setup.node_private_paths
    )
    if found:
        return refusal(msg, context, found)
    model = get_model(setup.spec)
    global_arrays = received_shared(msg, setup)
    _, initial = split_weights(initial_weights(setup.spec), setup.private_paths)
    set_weights(model, {**global_arrays, **initial})
    loss, accuracy = evaluate_model(model, setup.val)
    metrics = {"eval-loss": loss, "eval-accuracy": accuracy}
    if setup.private_paths:
        set_weights(model, {**global_arrays, **private_part(context, setup)})
        loss, accuracy = evaluate_model(model, setup.val)
    metrics.update({"personalized-loss": loss, "personalized-accuracy": accuracy})
    metrics[protocol.NUM_EXAMPLES] = len(setup.val)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
