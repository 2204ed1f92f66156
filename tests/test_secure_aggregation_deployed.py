"""A secure round on the scripted TLS + authenticated deployment, one SuperNode killed mid-protocol."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.deploy_harness import finish, loopback_deployment, only_run_metrics, wait_for_log

TRAIN_MESSAGE = "Receiving: train message"


@pytest.mark.e2e
def test_a_secure_round_survives_a_supernode_killed_after_sharing_its_keys(
    tmp_path: Path,
) -> None:
    """3 SuperNodes (warm workers), SecAgg+ (threshold 2 of 3), 2 rounds.

    SuperNode 2 is SIGKILLed when round 1's third train message reaches it
    (setup, share-keys, then collect-masked: it has shared its keys but not
    sent its masked vector). The other two unmask its pair masks from their
    shares; round 1 sums their two vectors, round 2 runs on the two left.
    """
    outputs = tmp_path / "outputs"
    with loopback_deployment(tmp_path / "deployment", num_supernodes=3,
                             warm_workers=True) as deployment:
        superlink = deployment.superlink
        assert superlink is not None and "--enable-supernode-auth" in superlink.command
        assert "--insecure" not in superlink.command
        victim = deployment.supernodes[2].process
        assert victim is not None
        since = victim.log_size()
        started = time.monotonic()
        run = deployment.start_run(
            "num-server-rounds=2 local-epochs=1 batch-size=32 fraction-evaluate=0.0 "
            "min-evaluate-nodes=0 min-train-nodes=2 secure-aggregation=true "
            f"round-timeout=120 node-wait-timeout=120 output-dir='{outputs}'",
            log_path=tmp_path / "run.log",
        )
        for _ in range(3):  # setup, share-keys, collect-masked
            match = victim.wait_for(TRAIN_MESSAGE, 300, since=since)
            since = match.end()
        victim.kill()
        wait_for_log(run, r"\[round 1/2\]", 300)
        code = finish(run, timeout=400)
        elapsed = time.monotonic() - started
    log = run.log_text()
    assert code == 0, log[-4000:]
    rounds = only_run_metrics(outputs, log)["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    first, second = rounds[1], rounds[2]
    assert first["secagg-share-keys"] == 3 and first["secagg-collect"] == 2
    assert first["secagg-voided"] == 0 and first["secagg-contributors"] == 2
    assert "1 dropped after sharing keys" in log
    assert second["secagg-voided"] == 0 and second["secagg-contributors"] == 2
    assert first["central-accuracy"] > rounds[0]["central-accuracy"]
    print(f"\n[secure deployment] 2 secure rounds, one node killed mid-protocol: {elapsed:.1f} s")
