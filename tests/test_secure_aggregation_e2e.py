"""End to end through `flwr run` (simulation engine): SecAgg+ learns as plain FedAvg does, DP accounting holds."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import pytest

from tests.flwr_harness import flwr_run, simulation_superlink


def run_metrics(outputs: Path, result) -> dict:
    log = result.stdout + result.stderr
    runs = list(outputs.glob("*")) if outputs.exists() else []
    assert len(runs) == 1, log[-4000:]
    return json.loads((runs[0] / "metrics.json").read_text())


@pytest.mark.e2e
def test_secure_aggregation_on_the_digits_federation_learns_as_plain_fedavg(
    tmp_path: Path,
) -> None:
    """The README's main job (10 clients, 10 rounds) with and without secure aggregation."""
    final = {}
    with simulation_superlink(tmp_path / "flwr-home", num_supernodes=10) as env:
        for secure in (False, True):
            outputs = tmp_path / f"outputs-{secure}"
            result = flwr_run(
                env,
                f"secure-aggregation={str(secure).lower()} output-dir='{outputs}'",
                timeout=900,
            )
            metrics = run_metrics(outputs, result)
            rounds = metrics["rounds"]
            assert [r["round"] for r in rounds] == list(range(11))
            final[secure] = rounds[-1]["central-accuracy"]
            if secure:
                log = result.stdout + result.stderr
                assert all(r["secagg-contributors"] == 10 and r["secagg-voided"] == 0
                           for r in rounds[1:])
                assert "Round 10 secure aggregation: 10 of 10 sampled in the sum" in log
                assert metrics["privacy"]["secure-aggregation"]["parameters"][
                    "secagg-threshold"] == 0.6
                # No per-client figure exists to report.
                assert all("clients" not in r for r in rounds[1:])
    print(f"\n[secure aggregation] final central accuracy: plain {final[False]:.4f}, "
          f"secure {final[True]:.4f}")
    assert final[False] > 0.8
    assert abs(final[True] - final[False]) <= 0.02


@pytest.mark.e2e
def test_dp_fedavg_through_secure_aggregation_charges_what_dp_accounting_computes(
    tmp_path: Path,
) -> None:
    outputs = tmp_path / "outputs"
    z, q, rounds = 0.9, 0.5, 3
    with simulation_superlink(tmp_path / "flwr-home", num_supernodes=6) as env:
        result = flwr_run(
            env,
            f"secure-aggregation=true strategy='dp-fedavg' noise-multiplier={z} "
            f"fraction-train={q} clipping-norm=1.0 num-server-rounds={rounds} "
            f"local-epochs=1 fraction-evaluate=0.0 min-evaluate-nodes=0 output-dir='{outputs}'",
            timeout=600,
        )
    metrics = run_metrics(outputs, result)
    entries = metrics["rounds"][1:]
    released = [r for r in entries if r.get("secagg-voided") == 0]
    # Poisson sampling may sample fewer than 2 in a round (voided or skipped): at least one ran.
    assert released, result.stderr[-4000:]
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), len(released)
    )
    assert released[-1]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert metrics["privacy"]["secure-aggregation"]["server-sees"].startswith(
        "the noiseless sum of the round's clipped updates")
