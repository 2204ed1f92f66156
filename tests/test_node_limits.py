"""The data owner's limits: a node's own privacy bounds bind whatever the server's run config asks.

Parsing and the violation check are pure and tested alone; the ClientApp's
handlers are called with real Messages through an in-process grid that
records every reply, so the tests see everything a refusing node sends.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from app.client_app import (
    NODE_PRIVACY_LIMIT,
    PRIVATE_WEIGHT_LEAK,
    SAMPLE_BUDGET_EXHAUSTED,
    local_setup,
)
from app.client_app import app as client_app
from app.private_state import PRIVATE_STATE_KEY
from clients.private_layers import PrivateWeightLeak, guard_outgoing, shared_spec, split_weights
from clients.training import get_model, initial_weights
from clients.weights import get_weights
from privacy.node_limits import (
    LIMIT_KEYS,
    MAX_SAMPLE_DELTA,
    MAX_SAMPLE_EPSILON,
    MIN_DP_SGD_NOISE_MULTIPLIER,
    PRIVATE_LAYERS,
    REQUIRE_DP_SGD,
    REQUIRE_SECURE_AGGREGATION,
    NodeLimits,
    NodeLimitsError,
    SampleBudget,
    ServerRequest,
    Violation,
    effective_sample_epsilon,
    parse_node_limits,
    violations,
)
from strategies import protocol
from strategies.fedavg import to_arrayrecord, to_numpy
from tests.inprocess import InProcessGrid, node_contexts, run_config
from tests.messages import instruction

HEAD = frozenset({"cnn/head/kernel", "cnn/head/bias"})
BODY = frozenset({"cnn/conv-1/kernel", "cnn/conv-1/bias", "cnn/dense-1/kernel"})


# ----------------------------------------------------------------------- parsing
def test_the_module_imports_neither_tensorflow_nor_flower_nor_the_app() -> None:
    code = (
        "import sys, privacy.node_limits; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'tensorflow', 'keras', 'flwr', 'app', 'clients', 'data', 'strategies'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_absent_keys_set_no_limit_and_other_node_keys_are_left_alone() -> None:
    limits = parse_node_limits(
        {"partition-id": 0, "num-partitions": 2, "state-dir": "/s", "data-path": "/d"}
    )
    assert limits == NodeLimits()
    assert limits.private_layers == "none" and limits.dp_sgd_required_by == ()


def test_cli_values_and_their_text_parse_alike() -> None:
    # What Flower's --node-config parser gives (TOML types) and the same as text.
    typed = {
        PRIVATE_LAYERS: " head ", REQUIRE_DP_SGD: True, MIN_DP_SGD_NOISE_MULTIPLIER: 1,
        MAX_SAMPLE_EPSILON: 3.0, MAX_SAMPLE_DELTA: 1e-6,
    }
    text = {
        PRIVATE_LAYERS: "head", REQUIRE_DP_SGD: "True", MIN_DP_SGD_NOISE_MULTIPLIER: "1",
        MAX_SAMPLE_EPSILON: "3", MAX_SAMPLE_DELTA: "1e-6",
    }
    expected = NodeLimits("head", True, 1.0, 3.0, 1e-6)
    assert parse_node_limits(typed) == expected == parse_node_limits(text)
    assert expected.dp_sgd_required_by == LIMIT_KEYS[1:5]
    assert parse_node_limits({REQUIRE_DP_SGD: "false"}).require_dp_sgd is False
    assert parse_node_limits({PRIVATE_LAYERS: "conv-2, */bias"}).private_layers == "conv-2, */bias"


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        (PRIVATE_LAYERS, "", "'none', 'head', 'batchnorm'"),
        (PRIVATE_LAYERS, "head,,conv-1", "no empty pattern"),
        (PRIVATE_LAYERS, 3, "comma-separated layer-name patterns"),
        (REQUIRE_DP_SGD, "yes", "true or false"),
        (REQUIRE_DP_SGD, 1, "true or false"),
        (MIN_DP_SGD_NOISE_MULTIPLIER, 0, "a number > 0"),
        (MIN_DP_SGD_NOISE_MULTIPLIER, -1.1, "a number > 0"),
        (MIN_DP_SGD_NOISE_MULTIPLIER, "lots", "a number > 0"),
        (MIN_DP_SGD_NOISE_MULTIPLIER, True, "a number > 0"),
        (MAX_SAMPLE_EPSILON, 0, "a number > 0 (omit the key for no limit)"),
        (MAX_SAMPLE_EPSILON, "inf", "a number > 0"),
        (MAX_SAMPLE_EPSILON, float("nan"), "a number > 0"),
        (MAX_SAMPLE_EPSILON, [3], "a number > 0"),
        (MAX_SAMPLE_DELTA, 0, "a number in (0, 1)"),
        (MAX_SAMPLE_DELTA, 1, "a number in (0, 1)"),
        (MAX_SAMPLE_DELTA, "tiny", "a number in (0, 1)"),
    ],
)
def test_every_bad_value_names_the_key_and_the_allowed_values(
    key: str, value: object, allowed: str
) -> None:
    with pytest.raises(NodeLimitsError) as error:
        parse_node_limits({"partition-id": 0, key: value})
    assert f"node config {key}=" in str(error.value)
    assert allowed in str(error.value)


@pytest.mark.parametrize(
    ("key", "meant"),
    [
        ("require-dpsgd", REQUIRE_DP_SGD),
        ("private-layer", PRIVATE_LAYERS),
        ("max_sample_epsilon", MAX_SAMPLE_EPSILON),
        ("dp-sgd", REQUIRE_DP_SGD),  # run-config keys are the server's, not the node's
        ("target-sample-epsilon", MAX_SAMPLE_EPSILON),
        ("dp-sgd-noise-multiplier", MIN_DP_SGD_NOISE_MULTIPLIER),
    ],
)
def test_a_misspelt_limit_is_refused_rather_than_ignored(key: str, meant: str) -> None:
    with pytest.raises(NodeLimitsError, match=f"{key!r}.*{meant!r}"):
        parse_node_limits({key: True})


# ----------------------------------------------------------------- the violations
def _dp_request(**changes: object) -> ServerRequest:
    values: dict[str, object] = {
        "dp_sgd": True, "dp_sgd_noise_multiplier": 1.1, "target_sample_epsilon": 8.0,
        "target_sample_delta": 1e-6, "private_layers": "head", "private_paths": HEAD,
        "sent_paths": BODY,
    }
    values.update(changes)
    return ServerRequest(**values)  # type: ignore[arg-type]


def test_a_request_within_every_limit_has_no_violation() -> None:
    limits = NodeLimits("head", True, 1.0, 3.0, 1e-5)
    assert violations(limits, _dp_request(), HEAD) == []
    # The server keeping more private than the node asks for is within the limit.
    wider = _dp_request(private_layers="head,conv-1", private_paths=HEAD | {"cnn/conv-1/kernel"})
    assert violations(limits, wider, HEAD) == []


def test_dp_sgd_off_breaks_require_and_every_numeric_limit() -> None:
    assert violations(NodeLimits(require_dp_sgd=True), _dp_request(dp_sgd=False)) == [
        Violation(REQUIRE_DP_SGD, "dp-sgd=false", "require-dp-sgd=true")
    ]
    numeric = NodeLimits(
        min_dp_sgd_noise_multiplier=1.5, max_sample_epsilon=3.0, max_sample_delta=1e-6
    )
    found = violations(numeric, _dp_request(dp_sgd=False))
    assert [v.key for v in found] == list(LIMIT_KEYS[2:5])
    for violation, limit in zip(found, ("=1.5", "=3", "=1e-06")):
        assert str(violation).startswith(f"{violation.key}: the server asks dp-sgd=false")
        assert f"{violation.key}{limit}, which needs DP-SGD" in str(violation)


def test_too_little_noise_and_too_large_a_delta_are_violations() -> None:
    limits = NodeLimits(min_dp_sgd_noise_multiplier=1.5, max_sample_delta=1e-6)
    found = violations(limits, _dp_request(dp_sgd_noise_multiplier=1.1, target_sample_delta=1e-5))
    assert [str(v) for v in found] == [
        "min-dp-sgd-noise-multiplier: the server asks dp-sgd-noise-multiplier=1.1; "
        "this node's limit is min-dp-sgd-noise-multiplier=1.5",
        "max-sample-delta: the server asks target-sample-delta=1e-05; "
        "this node's limit is max-sample-delta=1e-06",
    ]
    # At the limit exactly is within it.
    assert violations(limits, _dp_request(dp_sgd_noise_multiplier=1.5, target_sample_delta=1e-6)) == []


def test_a_larger_server_epsilon_is_no_violation_the_stricter_budget_binds() -> None:
    capped = NodeLimits(max_sample_epsilon=3.0)
    assert violations(capped, _dp_request(target_sample_epsilon=50.0)) == []
    assert effective_sample_epsilon(NodeLimits(), 0.0) == SampleBudget(0.0, "")
    assert effective_sample_epsilon(NodeLimits(), 5.0) == SampleBudget(5.0, "target-sample-epsilon")
    assert effective_sample_epsilon(capped, 0.0) == SampleBudget(3.0, MAX_SAMPLE_EPSILON)
    assert effective_sample_epsilon(capped, 5.0) == SampleBudget(3.0, MAX_SAMPLE_EPSILON)
    assert effective_sample_epsilon(capped, 2.0) == SampleBudget(2.0, "target-sample-epsilon")


@pytest.mark.parametrize(
    ("server_layers", "server_private", "sent", "says"),
    [
        # Asks for every head: sends it and expects it back.
        ("none", frozenset(), BODY | HEAD,
         "sends cnn/head/bias, cnn/head/kernel; expects back cnn/head/bias, cnn/head/kernel"),
        # Its run config says 'head' but it sends the head anyway.
        ("head", HEAD, BODY | HEAD, "sends cnn/head/bias, cnn/head/kernel)"),
        # Keeps another layer private, so it expects the head back.
        ("conv-1", frozenset({"cnn/conv-1/kernel"}), BODY - {"cnn/conv-1/kernel"},
         "expects back cnn/head/bias, cnn/head/kernel)"),
    ],
)
def test_a_server_that_sends_or_wants_a_node_private_variable_violates_private_layers(
    server_layers: str, server_private: frozenset[str], sent: frozenset[str], says: str
) -> None:
    request = ServerRequest(private_layers=server_layers, private_paths=server_private, sent_paths=sent)
    (violation,) = violations(NodeLimits(private_layers="head"), request, HEAD)
    assert violation.key == PRIVATE_LAYERS
    assert violation.asked.startswith(f"private-layers={server_layers!r}")
    assert says in violation.asked
    assert violation.limit.startswith("private-layers='head'")


# -------------------------------------------------------------- the outgoing guard
def test_guard_checks_shapes_and_dtypes_against_what_the_server_sent() -> None:
    sent = {"cnn/dense-1/kernel": np.zeros((4, 3), np.float32), "cnn/conv-1/bias": np.zeros(2, np.float32)}
    shared = frozenset(sent)
    spec = shared_spec(sent)
    guard_outgoing({k: v + 1 for k, v in sent.items()}, shared, spec)
    guard_outgoing(sent, shared)  # the names-only form still works
    # A private head of another task under a shared name: right key, wrong shape.
    wrong_shape = r"cnn/dense-1/kernel is float32\[4, 2\] where the server sent float32\[4, 3\]"
    with pytest.raises(PrivateWeightLeak, match=wrong_shape):
        guard_outgoing({**sent, "cnn/dense-1/kernel": np.zeros((4, 2), np.float32)}, shared, spec)
    wrong_dtype = r"cnn/conv-1/bias is float64\[2\] where the server sent float32\[2\]"
    with pytest.raises(PrivateWeightLeak, match=wrong_dtype):
        guard_outgoing({**sent, "cnn/conv-1/bias": np.zeros(2)}, shared, spec)
    with pytest.raises(PrivateWeightLeak, match="cnn/conv-1/bias is missing"):
        guard_outgoing({"cnn/dense-1/kernel": sent["cnn/dense-1/kernel"]}, shared, spec)
    wider = shared | {"cnn/conv-2/bias"}
    with pytest.raises(PrivateWeightLeak, match="cnn/conv-2/bias was not sent by the server"):
        guard_outgoing({**sent, "cnn/conv-2/bias": np.zeros(2, np.float32)}, wider, spec)
    with pytest.raises(PrivateWeightLeak, match="not shared variables: cnn/head/kernel"):
        guard_outgoing({**sent, "cnn/head/kernel": np.zeros((4, 3), np.float32)}, shared, spec)


# ------------------------------------------------------------- the ClientApp's handlers
TRAIN_CONFIG = {"server-round": 1, "local-epochs": 1, "batch-size": 32, "learning-rate": 0.1}


def _nodes(tmp_path: Path, node_limits: dict[str, object], **run: object) -> dict[int, Context]:
    """Two nodes of one run, each with ``node_limits`` added to its node config."""
    config = run_config(**{"output-dir": str(tmp_path / "out"), **run})
    contexts = node_contexts(2, config, state_dir=tmp_path / "state")
    for context in contexts.values():
        context.node_config.update(node_limits)
    return contexts


def _message(context: Context, arrays: dict[str, np.ndarray], kind: str = MessageType.TRAIN) -> Message:
    config = TRAIN_CONFIG if kind == MessageType.TRAIN else {"server-round": 1, "batch-size": 32}
    return instruction(
        RecordDict({protocol.ARRAYS: to_arrayrecord(arrays), protocol.CONFIG: ConfigRecord(config)}),
        node_id=context.node_id, kind=kind,
    )


def _sent_arrays(replies: list[Message]) -> list[tuple[str, np.ndarray]]:
    """Every array in every captured reply."""
    return [
        (key, array.numpy())
        for reply in replies if reply.has_content()
        for record in reply.content.array_records.values()
        for key, array in record.items()
    ]


def _never_train(*args: object, **kwargs: object) -> None:
    raise AssertionError("a refused node must not train")


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import app.client_app as module

    for trainer in ("dp_sgd_train", "train_proximal"):
        monkeypatch.setattr(module, trainer, _never_train)


def _untouched(contexts: dict[int, Context], state_dir: Path) -> None:
    """Nothing saved by any node: no node state, no file in any state folder."""
    assert all(not list(c.state.keys()) for c in contexts.values())
    assert not state_dir.exists() or not any(p.is_file() for p in state_dir.rglob("*"))


def test_a_node_pinning_its_head_refuses_a_server_that_asks_for_every_head(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, no_training: None
) -> None:
    contexts = _nodes(tmp_path, {PRIVATE_LAYERS: "head"}, **{"private-layers": "none"})
    setup = local_setup(next(iter(contexts.values())))
    assert setup.node_private_paths == HEAD and setup.server_private_paths == frozenset()
    global_model = initial_weights(setup.spec)  # the whole model, head included
    assert HEAD <= set(global_model)
    model = get_model(setup.spec)
    before = get_weights(model)
    grid = InProcessGrid(client_app, contexts)
    messages = [_message(c, global_model, kind) for c in contexts.values()
                for kind in (MessageType.TRAIN, MessageType.EVALUATE)]
    with caplog.at_level("WARNING", logger="flwr"):
        grid.send_and_receive(messages)

    assert len(grid.replies) == 4
    for reply in grid.replies:
        assert reply.has_error() and not reply.has_content()
        assert reply.error.code == NODE_PRIVACY_LIMIT
        assert "private-layers: the server asks private-layers='none'" in reply.error.reason
        assert "private-layers='head'" in reply.error.reason and "cnn/head/kernel" in reply.error.reason
    # No array of the head, by name or by value, in anything any node sent.
    sent = _sent_arrays(grid.replies)
    assert not any(key in HEAD for key, _ in sent)
    sent_bytes = b"".join(value.tobytes() for _, value in sent)
    assert all(global_model[key].tobytes() not in sent_bytes for key in HEAD)
    assert sent == []
    _untouched(contexts, tmp_path / "state")
    assert all(np.array_equal(before[k], v) for k, v in get_weights(model).items())
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert sum("node-privacy-limit" in r.getMessage() for r in warnings) == 4


def test_a_server_whose_run_config_keeps_the_head_but_sends_it_is_refused(
    tmp_path: Path, no_training: None
) -> None:
    contexts = _nodes(tmp_path, {PRIVATE_LAYERS: "head"}, **{"private-layers": "head"})
    context = next(iter(contexts.values()))
    reply = client_app(_message(context, initial_weights(local_setup(context).spec)), context)
    assert reply.has_error() and reply.error.code == NODE_PRIVACY_LIMIT
    assert "sends cnn/head/bias, cnn/head/kernel" in reply.error.reason
    _untouched(contexts, tmp_path / "state")


def test_a_server_honouring_the_pin_trains_and_only_the_shared_part_leaves(tmp_path: Path) -> None:
    contexts = _nodes(tmp_path, {PRIVATE_LAYERS: "head"}, **{"private-layers": "head"})
    context = next(iter(contexts.values()))
    setup = local_setup(context)
    shared, _ = split_weights(initial_weights(setup.spec), setup.private_paths)
    reply = client_app(_message(context, shared), context)
    assert not reply.has_error()
    arrays = to_numpy(reply.content[protocol.ARRAYS])
    assert set(arrays) == set(shared) and not HEAD & set(arrays)
    assert shared_spec(arrays) == shared_spec(shared)
    assert set(to_numpy(context.state[PRIVATE_STATE_KEY])) == HEAD


def test_united_private_layers_that_leave_nothing_shared_fail_the_node(tmp_path: Path) -> None:
    contexts = _nodes(tmp_path, {PRIVATE_LAYERS: "head"}, **{"private-layers": "conv-*,dense-*"})
    with pytest.raises(ValueError, match="together make every variable private"):
        local_setup(next(iter(contexts.values())))


@pytest.mark.parametrize("required", [True, "true"])
def test_a_node_requiring_dp_sgd_refuses_to_train_without_it(
    tmp_path: Path, no_training: None, required: object
) -> None:
    contexts = _nodes(tmp_path, {REQUIRE_DP_SGD: required}, **{"dp-sgd": False})
    context = next(iter(contexts.values()))
    setup = local_setup(context)
    model = get_model(setup.spec)
    before = get_weights(model)
    grid = InProcessGrid(client_app, contexts)
    grid.send_and_receive([_message(context, initial_weights(setup.spec))])
    (reply,) = grid.replies
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == NODE_PRIVACY_LIMIT
    assert "require-dp-sgd: the server asks dp-sgd=false" in reply.error.reason
    assert "require-dp-sgd=true" in reply.error.reason
    _untouched(contexts, tmp_path / "state")
    assert all(np.array_equal(before[k], v) for k, v in get_weights(model).items())


def test_too_little_noise_or_too_large_a_delta_is_refused_before_any_ledger_entry(
    tmp_path: Path, no_training: None
) -> None:
    contexts = _nodes(
        tmp_path, {MIN_DP_SGD_NOISE_MULTIPLIER: 2.0, MAX_SAMPLE_DELTA: 1e-6},
        **{"dp-sgd": True, "dp-sgd-noise-multiplier": 1.1, "target-sample-delta": 1e-5},
    )
    context = next(iter(contexts.values()))
    reply = client_app(_message(context, initial_weights(local_setup(context).spec)), context)
    assert reply.has_error() and reply.error.code == NODE_PRIVACY_LIMIT
    reason = reply.error.reason
    assert "dp-sgd-noise-multiplier=1.1; this node's limit is min-dp-sgd-noise-multiplier=2" in reason
    assert "target-sample-delta=1e-05; this node's limit is max-sample-delta=1e-06" in reason
    _untouched(contexts, tmp_path / "state")


@pytest.mark.parametrize(
    ("node_cap", "server_target", "binding"),
    [(0.01, 0.0, "max-sample-epsilon 0.01"), (5.0, 0.01, "target-sample-epsilon 0.01")],
)
def test_dp_sgd_stops_at_the_stricter_of_the_two_epsilons(
    tmp_path: Path, no_training: None, node_cap: float, server_target: float, binding: str
) -> None:
    contexts = _nodes(
        tmp_path, {MAX_SAMPLE_EPSILON: node_cap},
        **{"dp-sgd": True, "target-sample-epsilon": server_target},
    )
    context = next(iter(contexts.values()))
    reply = client_app(_message(context, initial_weights(local_setup(context).spec)), context)
    assert reply.has_error() and reply.error.code == SAMPLE_BUDGET_EXHAUSTED
    assert binding in reply.error.reason


def test_a_reply_not_shaped_as_the_server_sent_becomes_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.client_app as module

    def upcast(local, global_arrays, config):  # a bug: a shared array leaves in another dtype
        return {k: v.astype(np.float64) if k == "cnn/conv-1/bias" else v for k, v in local.items()}

    monkeypatch.setattr(module, "train_proximal", lambda *args, **kwargs: 0.0)
    monkeypatch.setattr(module, "outgoing_arrays", upcast)
    contexts = _nodes(tmp_path, {})
    context = next(iter(contexts.values()))
    reply = client_app(_message(context, initial_weights(local_setup(context).spec)), context)
    assert reply.has_error() and reply.error.code == PRIVATE_WEIGHT_LEAK
    assert "cnn/conv-1/bias is float64" in reply.error.reason


def test_a_node_requiring_secure_aggregation_refuses_to_send_its_update_in_the_clear(
    tmp_path: Path, no_training: None
) -> None:
    assert parse_node_limits({REQUIRE_SECURE_AGGREGATION: "true"}).require_secure_aggregation
    with pytest.raises(NodeLimitsError, match=REQUIRE_SECURE_AGGREGATION):
        parse_node_limits({"secure-aggregation": True})  # the run-config key, misplaced
    contexts = _nodes(tmp_path, {REQUIRE_SECURE_AGGREGATION: True})
    context = next(iter(contexts.values()))
    grid = InProcessGrid(client_app, contexts)
    grid.send_and_receive([_message(context, initial_weights(local_setup(context).spec))])
    (reply,) = grid.replies
    assert reply.has_error() and reply.error.code == NODE_PRIVACY_LIMIT
    assert "require-secure-aggregation" in reply.error.reason
    assert not violations(
        NodeLimits(require_secure_aggregation=True), ServerRequest(secure_aggregation=True)
    )
