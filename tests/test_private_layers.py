"""Private weights never leave the client, persist between rounds and restarts, and personalise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from app.client_app import local_setup, private_part
from app.config import ConfigError
from app.private_state import PRIVATE_STATE_KEY
from clients.models import build_cnn, build_mlp
from clients.private_layers import (
    PrivateWeightLeak,
    guard_outgoing,
    private_variable_paths,
    split_weights,
)
from clients.training import initial_weights
from clients.weights import get_weights
from strategies.fedavg import to_numpy
from tests.inprocess import node_contexts, run_config, run_federation


def test_presets_and_patterns_select_variables_by_path() -> None:
    cnn = build_cnn((8, 8, 1), 10)
    assert private_variable_paths(cnn, "none") == frozenset()
    assert private_variable_paths(cnn, "head") == {"cnn/head/kernel", "cnn/head/bias"}
    assert private_variable_paths(cnn, "conv-2, */bias") == {
        "cnn/conv-2/kernel", "cnn/conv-2/bias", "cnn/conv-1/bias", "cnn/dense-1/bias", "cnn/head/bias",
    }
    mlp = build_mlp((10,), 2)
    assert private_variable_paths(mlp, "head") == {"mlp/head/kernel", "mlp/head/bias"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("batchnorm", "no normalisation layer"),
        ("conv-9", "matches no layer"),
        ("*", "nothing would be shared"),
        ("head,,conv-1", "empty pattern"),
    ],
)
def test_bad_private_layers_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        private_variable_paths(build_cnn((8, 8, 1), 10), spec)


def test_guard_refuses_any_key_that_is_not_shared() -> None:
    shared = frozenset({"cnn/conv-1/kernel"})
    guard_outgoing({"cnn/conv-1/kernel": np.zeros(1)}, shared)
    with pytest.raises(PrivateWeightLeak, match="cnn/head/kernel"):
        guard_outgoing({"cnn/conv-1/kernel": np.zeros(1), "cnn/head/kernel": np.zeros(1)}, shared)


def _sent_arrays(grid) -> list[tuple[str, np.ndarray]]:
    """Every array any client sent, in every reply."""
    sent = []
    for reply in grid.replies:
        if reply.has_content():
            for record in reply.content.array_records.values():
                sent.extend((key, array.numpy()) for key, array in record.items())
    return sent


def test_no_private_variable_leaves_a_client_by_name_or_by_value(tmp_path: Path) -> None:
    config = run_config(
        **{"private-layers": "head", "num-server-rounds": 2, "min-train-nodes": 3,
           "min-evaluate-nodes": 3, "local-epochs": 1, "output-dir": str(tmp_path / "out")}
    )
    contexts = node_contexts(3, config)
    grid = run_federation(config, contexts)
    sent = _sent_arrays(grid)
    train_replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train_replies) == 6 and not any(r.has_error() for r in train_replies)
    # By name: no key of any reply is a private variable.
    assert sent and all(not key.startswith("cnn/head/") for key, _ in sent)
    # By value: each node's trained head appears in no array any client sent.
    sent_bytes = b"".join(value.tobytes() for _, value in sent)
    for context in contexts.values():
        private = to_numpy(context.state[PRIVATE_STATE_KEY])
        assert set(private) == {"cnn/head/kernel", "cnn/head/bias"}
        kernel = private["cnn/head/kernel"]
        initial = initial_weights(local_setup(context).spec)["cnn/head/kernel"]
        assert not np.array_equal(kernel, initial)  # it was trained, so the check has teeth
        for row in kernel.T:  # any 40-byte run of the head would be found
            assert row[:10].tobytes() not in sent_bytes
    # The server never held a head either, and personalised accuracy was reported.
    run_dir = next((tmp_path / "out").iterdir())
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert all("central-accuracy" not in r for r in rounds)
    assert all(0 <= r["personalized-accuracy"] <= 1 and "global-accuracy" in r for r in rounds[1:])


def test_guard_turns_a_leaking_reply_into_an_error(tmp_path: Path, monkeypatch) -> None:
    import app.client_app as client_app_module

    def leaky_split(weights, private_paths):  # a bug: everything counted as shared
        return dict(weights), {}

    monkeypatch.setattr(client_app_module, "split_weights", leaky_split)
    config = run_config(
        **{"private-layers": "head", "num-server-rounds": 1, "min-train-nodes": 2,
           "fraction-evaluate": 0.0, "local-epochs": 1, "output-dir": str(tmp_path / "out")}
    )
    grid = run_federation(config, node_contexts(2, config))
    train_replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train_replies) == 2
    assert all(r.has_error() and "cnn/head/kernel" in r.error.reason for r in train_replies)
    assert not _sent_arrays(grid)


def test_private_weights_survive_a_restart_bit_for_bit(tmp_path: Path) -> None:
    config = run_config(
        **{"private-layers": "head", "num-server-rounds": 1, "min-train-nodes": 2,
           "fraction-evaluate": 0.0, "local-epochs": 1, "output-dir": str(tmp_path / "out")}
    )
    contexts = node_contexts(2, config, state_dir=tmp_path / "state")
    run_federation(config, contexts)
    for context in contexts.values():
        before = to_numpy(context.state[PRIVATE_STATE_KEY])
        # A restarted SuperNode: a fresh Context (empty state), same node config and run.
        restarted = Context(run_id=context.run_id, node_id=context.node_id,
                            node_config=dict(context.node_config), state=RecordDict(),
                            run_config=config)
        after = private_part(restarted, local_setup(restarted))
        assert set(after) == set(before)
        for key in before:
            assert after[key].tobytes() == before[key].tobytes()
            assert after[key].dtype == before[key].dtype
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "state").rglob("*.npz"))
    assert [str(f) for f in files] == [
        "state/node-0/run-7/private-weights.npz", "state/node-1/run-7/private-weights.npz",
    ]


def test_a_node_that_never_trained_uses_the_seeded_initial_private_part(caplog) -> None:
    config = run_config(**{"private-layers": "head"})
    context = node_contexts(2, config)[1000]
    setup = local_setup(context)
    part = private_part(context, setup)
    _, expected = split_weights(initial_weights(setup.spec), setup.private_paths)
    assert all(np.array_equal(part[k], expected[k]) for k in expected)
    assert "no private weights yet" in caplog.text


def test_two_tasks_share_the_body_with_private_heads_of_their_own_size(tmp_path: Path) -> None:
    config = run_config(
        **{"private-layers": "head", "client-tasks": "label,parity", "num-server-rounds": 2,
           "min-train-nodes": 4, "min-evaluate-nodes": 4, "local-epochs": 2,
           "output-dir": str(tmp_path / "out")}
    )
    contexts = node_contexts(4, config)
    grid = run_federation(config, contexts)
    heads = {c.node_config["partition-id"]: to_numpy(c.state[PRIVATE_STATE_KEY])["cnn/head/kernel"]
             for c in contexts.values()}
    assert heads[0].shape[-1] == 10 and heads[2].shape[-1] == 10
    assert heads[1].shape[-1] == 2 and heads[3].shape[-1] == 2
    evaluations = [r for r in grid.replies if r.metadata.message_type == "evaluate"]
    parity = [r.content["metrics"]["personalized-accuracy"] for r in evaluations
              if contexts[r.metadata.src_node_id].node_config["partition-id"] % 2 == 1]
    assert parity and all(0.0 <= a <= 1.0 for a in parity)


def test_tasks_with_different_label_spaces_need_a_private_head(tmp_path: Path) -> None:
    config = run_config(**{"client-tasks": "label,parity", "output-dir": str(tmp_path / "o")})
    with pytest.raises(ConfigError, match="private head"):
        run_federation(config, node_contexts(2, config))
    assert not (tmp_path / "o").exists()
