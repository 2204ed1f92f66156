"""The real ClientApp under secure aggregation (in process): only masked shared parameters leave."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from app.client_app import local_setup
from clients.training import initial_weights
from clients.private_layers import split_weights
from privacy.node_limits import REQUIRE_SECURE_AGGREGATION
from strategies import protocol
from tests.inprocess import node_contexts, run_config, run_federation


def test_private_layers_never_enter_and_the_masked_reply_carries_nothing_else(
    tmp_path: Path,
) -> None:
    """3 nodes that require secure aggregation, a private head, DP-SGD: one secure round."""
    config = run_config(**{
        "output-dir": str(tmp_path / "out"), "num-server-rounds": 1, "local-epochs": 1,
        "secure-aggregation": True, "private-layers": "head", "dp-sgd": True,
        "fraction-evaluate": 0.0, "min-evaluate-nodes": 0,
    })
    contexts = node_contexts(3, config, state_dir=tmp_path / "state")
    for context in contexts.values():
        context.node_config[REQUIRE_SECURE_AGGREGATION] = True
    grid = run_federation(config, contexts)

    setup = local_setup(next(iter(contexts.values())))
    shared, private = split_weights(initial_weights(setup.spec), setup.private_paths)
    assert private  # the head is private
    num_shared = sum(int(v.size) for v in shared.values())
    masked = []
    for reply in grid.replies:
        assert not reply.has_error(), reply.error.reason
        assert set(reply.content.keys()) <= {protocol.SECAGG_RECORD, protocol.SECAGG_MASKED}
        assert not reply.content.metric_records  # no metrics, no num-examples, no sample-epsilon
        if protocol.SECAGG_MASKED in reply.content:
            record = reply.content[protocol.SECAGG_MASKED]
            assert isinstance(record, ArrayRecord)
            masked.append(record[protocol.SECAGG_MASKED].numpy())
    assert len(masked) == 3
    # The shared variables' update, the example count and the clamp count: no head.
    assert all(m.shape == (num_shared + 2,) and m.dtype == np.uint32 for m in masked)
    rounds = json.loads(next((tmp_path / "out").rglob("metrics.json")).read_text())["rounds"]
    assert rounds[1]["secagg-contributors"] == 3 and rounds[1]["secagg-voided"] == 0
    assert rounds[1]["num-examples"] == sum(len(local_setup(c).train) for c in contexts.values())
