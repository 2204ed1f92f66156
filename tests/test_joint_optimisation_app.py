"""FedProx, server optimisers and server-side training, wired through the real apps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.config import ConfigError, parse_run_config
from app.server_app import build_server_optimizer, build_strategy
from data.federation import FederationSpec, build_federation, load_server_data
from strategies.server_optimizers import ServerAdam
from tests.inprocess import node_contexts, run_config, run_federation


def test_public_slice_is_disjoint_from_every_client_and_the_test_set() -> None:
    spec = FederationSpec("digits", "", "iid", 5, 42, 0.2, server_data="public-slice:100")
    federation = build_federation(spec)
    public = load_server_data(spec)
    assert public is not None and len(public) == 100
    clients = np.concatenate(federation.partitions)
    assert len(clients) + len(public) == 1437  # the training side, all of it used once
    client_rows = {federation.train.x[i].tobytes() for i in clients}
    test_rows = {row.tobytes() for row in federation.test.x}
    overlap = sum(row.tobytes() in client_rows or row.tobytes() in test_rows for row in public.x)
    assert overlap <= 1  # digits itself holds one duplicated image
    assert load_server_data(FederationSpec("digits", "", "iid", 5, 42, 0.2)) is None


def test_server_learning_rate_zero_means_the_optimisers_default() -> None:
    assert build_server_optimizer(parse_run_config(run_config())) is None  # plain FedAvg
    adam = build_server_optimizer(parse_run_config(run_config(**{"server-optimizer": "adam"})))
    assert isinstance(adam, ServerAdam) and adam.learning_rate == 0.1
    dp = build_strategy(parse_run_config(run_config(
        **{"strategy": "dp-fedavg", "server-optimizer": "yogi", "server-learning-rate": 0.02}
    )))
    assert dp.server_optimizer is not None and dp.server_optimizer.learning_rate == 0.02


def test_server_training_needs_server_data() -> None:
    with pytest.raises(ConfigError, match="server-data"):
        parse_run_config(run_config(**{"server-train-epochs": 1}))
    with pytest.raises(ConfigError, match="'server-data'"):
        parse_run_config(run_config(**{"server-data": "client-3"}))


def test_fedprox_adam_and_server_training_run_end_to_end(tmp_path: Path) -> None:
    config = run_config(**{
        "proximal-mu": 0.1, "server-optimizer": "adam", "server-train-epochs": 1,
        "server-data": "public-slice:100", "num-server-rounds": 2, "min-train-nodes": 3,
        "min-evaluate-nodes": 3, "local-epochs": 1, "output-dir": str(tmp_path / "out"),
    })
    grid = run_federation(config, node_contexts(3, config))
    assert not any(r.has_error() for r in grid.replies)
    (run_dir,) = (tmp_path / "out").iterdir()
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(np.isfinite(r["server-train-loss"]) for r in rounds[1:])
    assert rounds[2]["central-accuracy"] > rounds[0]["central-accuracy"]
