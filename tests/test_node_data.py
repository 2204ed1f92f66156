"""A node's data from its node config: its partition, or an institution's own file.

Fast: no Flower run; the ClientApp's ``local_setup`` is called with a
Context as a deployed SuperNode would build it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, MessageType, RecordDict

from app.client_app import app as client_app
from app.client_app import local_setup
from app.config import parse_run_config
from app.task import model_spec
from clients.models import build_model
from clients.weights import get_weights
from data.federation import load_server_split, standardize, stratified_split
from data.heart import HEART_SITES, load_heart
from data.node_files import (
    NodeData,
    load_node_data,
    load_node_file,
    node_data,
    split_classes,
)
from strategies.fedavg import to_arrayrecord, to_numpy
from tests.messages import instruction
from tests.test_config import defaults

HEART_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "heart-disease"
needs_heart = pytest.mark.skipif(
    not (HEART_DIR / "processed.switzerland.data").is_file(),
    reason=f"UCI heart files not found in {HEART_DIR} (the shared datasets folder)",
)


def context(node_config: dict[str, object], **run_config: object) -> Context:
    config = defaults()
    config.update(run_config)
    return Context(
        run_id=1, node_id=11, node_config=node_config, state=RecordDict(), run_config=config
    )


def write_csv(path: Path, rows: list[tuple[float, float, float, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["age", "pressure", "weight", "diagnosis"])
        writer.writerows(rows)
    return path


def table_rows(n: int, labels: list[str], seed: int) -> list[tuple[float, float, float, str]]:
    rng = np.random.default_rng(seed)
    return [
        (float(rng.integers(20, 90)), float(rng.normal(120, 15)), float(rng.normal(75, 10)),
         labels[k % len(labels)])
        for k in range(n)
    ]


# ---------------------------------------------------------------------- the node config
def test_node_config_names_a_partition_or_a_file() -> None:
    # What Flower's simulation sets: unchanged.
    assert node_data({"partition-id": 1, "num-partitions": 4}) == NodeData(1, 4)
    # A file wins over a partition; partition-id only names the node then.
    assert node_data({"data-path": "/x.csv", "partition-id": 2, "num-partitions": 4}) == (
        NodeData(2, None, "/x.csv")
    )
    assert node_data({"data-path": "/x.csv"}) == NodeData(0, None, "/x.csv")
    # An empty data-path is no data-path.
    assert node_data({"data-path": "", "partition-id": 0, "num-partitions": 2}) == NodeData(0, 2)


@pytest.mark.parametrize(
    "node_config", [{}, {"partition-id": 0}, {"num-partitions": 2}, {"data-path": "  "}]
)
def test_a_node_config_without_partition_or_file_names_the_keys(node_config) -> None:
    with pytest.raises(ValueError) as error:
        node_data(node_config)
    message = str(error.value)
    assert "partition-id" in message and "num-partitions" in message
    assert "data-path" in message and "--node-config" in message


def test_a_non_integer_partition_id_is_refused() -> None:
    with pytest.raises(ValueError, match="partition-id='a' must be an integer"):
        node_data({"partition-id": "a", "num-partitions": 2})


def test_local_setup_without_partition_or_file_fails_with_the_keys() -> None:
    with pytest.raises(ValueError, match="data-path"):
        local_setup(context({}))


# -------------------------------------------------------------------- a hospital's file
@needs_heart
@pytest.mark.parametrize("site", HEART_SITES)
def test_a_heart_node_reads_only_its_own_hospital(site: str) -> None:
    whole = load_heart(str(HEART_DIR))
    own = load_node_file("heart", str(HEART_DIR / f"processed.{site}.data"))
    expected = whole.subset(np.flatnonzero(whole.groups == HEART_SITES.index(site)))
    np.testing.assert_array_equal(own.x, expected.x)
    np.testing.assert_array_equal(own.y, expected.y)
    assert own.num_classes == whole.num_classes == 2 and own.kind == "tabular"


@needs_heart
def test_a_heart_node_splits_reproducibly_and_standardises_with_its_own_train_split() -> None:
    path = str(HEART_DIR / "processed.cleveland.data")
    load_node_data.cache_clear()
    train, val = load_node_data("heart", path, 0.1, 42, 0)
    assert len(train) + len(val) == 303 and len(val) == pytest.approx(30.3, abs=1)
    load_node_data.cache_clear()
    again_train, again_val = load_node_data("heart", path, 0.1, 42, 0)
    np.testing.assert_array_equal(again_val.x, val.x)
    np.testing.assert_array_equal(again_train.y, train.y)
    other_train, _ = load_node_data("heart", path, 0.1, 42, 3)  # another node's seed
    assert not np.array_equal(other_train.x, train.x)
    # The same rule as a partition's split, then per-node standardisation.
    raw_train, raw_val = stratified_split(load_node_file("heart", path), 0.1, 42)
    expected_train, expected_val = standardize(raw_train, raw_val)
    np.testing.assert_allclose(train.x, expected_train.x)
    np.testing.assert_allclose(val.x, expected_val.x)
    np.testing.assert_allclose(train.x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.x.std(axis=0), 1.0, atol=1e-4)


@needs_heart
def test_a_heart_node_holding_almost_one_class_builds_the_servers_model() -> None:
    # Switzerland: 45 of 46 patients have the disease.
    run = {"dataset": "heart", "data-path": str(HEART_DIR)}
    own = local_setup(context(
        {"data-path": str(HEART_DIR / "processed.switzerland.data"), "partition-id": 2}, **run
    ))
    assert len(own.train) + len(own.val) == 46
    assert own.train.label_histogram().min() <= 1
    partitioned = local_setup(context({"partition-id": 2, "num-partitions": 4}, **run))
    config = parse_run_config({**defaults(), **run})
    _, server_test = load_server_split("heart", str(HEART_DIR), config.test_fraction, config.seed)
    assert own.spec == partitioned.spec == model_spec(config, server_test)
    assert own.shared_paths == partitioned.shared_paths


@needs_heart
def test_a_heart_node_trains_the_servers_model_through_the_client_app() -> None:
    run = {"dataset": "heart", "data-path": str(HEART_DIR)}
    config = parse_run_config({**defaults(), **run})
    _, test = load_server_split("heart", str(HEART_DIR), config.test_fraction, config.seed)
    spec = model_spec(config, test)
    weights = get_weights(build_model(spec.kind, spec.input_shape, spec.num_classes, seed=spec.seed))
    message = instruction(
        RecordDict({
            "arrays": to_arrayrecord(weights),
            "config": ConfigRecord({"server-round": 1, "local-epochs": 1,
                                    "batch-size": 16, "learning-rate": 0.1}),
        }),
        node_id=11,
    )
    node = context({"data-path": str(HEART_DIR / "processed.va.data")}, **run)
    reply = client_app(message, node)
    assert not reply.has_error(), reply.error
    assert set(to_numpy(reply.content["arrays"])) == set(weights)
    own_train, _ = load_node_data("heart", str(HEART_DIR / "processed.va.data"),
                                  config.val_fraction, config.seed, 0)
    assert reply.content["metrics"]["num-examples"] == len(own_train) < 130


def test_a_heart_node_refuses_a_folder_and_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one\\s+hospital's file"):
        load_node_file("heart", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist on this node"):
        load_node_file("heart", str(tmp_path / "processed.cleveland.data"))


# ----------------------------------------------------------------- an institution's table
def test_a_csv_node_holding_some_classes_keeps_the_declared_label_space(tmp_path: Path) -> None:
    server = write_csv(tmp_path / "server.csv", table_rows(120, ["0", "1", "2"], seed=1))
    node = write_csv(tmp_path / "clinic.csv", table_rows(40, ["0", "2"], seed=2))
    run = {"dataset": "csv", "data-path": f"{server}?label=diagnosis", "val-fraction": 0.25}
    own = local_setup(context({"data-path": f"{node}?label=diagnosis&classes=3"}, **run))
    # Only the clinic's own rows, labels 0 and 2 of the three classes.
    assert len(own.train) + len(own.val) == 40 and len(own.val) == 10
    assert own.train.num_classes == 3
    assert own.train.label_histogram()[1] == 0 and own.val.label_histogram()[1] == 0
    partitioned = local_setup(context({"partition-id": 0, "num-partitions": 2}, **run))
    assert own.spec == partitioned.spec
    assert own.spec.input_shape == (3,) and own.spec.num_classes == 3


def test_a_csv_node_maps_named_classes_onto_the_declared_order(tmp_path: Path) -> None:
    node = write_csv(tmp_path / "clinic.csv", table_rows(20, ["malignant"], seed=3))
    data = load_node_file("csv", f"{node}?label=diagnosis&classes=benign,malignant")
    assert data.num_classes == 2 and set(data.y.tolist()) == {1}
    rows = np.array([r[:3] for r in table_rows(20, ["malignant"], seed=3)], dtype=np.float32)
    np.testing.assert_allclose(data.x, rows)


def test_a_csv_node_must_declare_its_classes_and_hold_only_those(tmp_path: Path) -> None:
    node = write_csv(tmp_path / "clinic.csv", table_rows(20, ["0", "3"], seed=4))
    with pytest.raises(ValueError, match="classes=N"):
        load_node_file("csv", f"{node}?label=diagnosis")
    with pytest.raises(ValueError, match="labels \\['3'\\] are not among"):
        load_node_file("csv", f"{node}?label=diagnosis&classes=3")


def test_classes_are_taken_out_of_the_table_query() -> None:
    assert split_classes("a.csv?label=y&classes=3&institution=s") == (
        "a.csv?label=y&institution=s", ("0", "1", "2")
    )
    assert split_classes("a.csv?classes=b,a") == ("a.csv", ("b", "a"))
    assert split_classes("a.csv?label=y") == ("a.csv?label=y", None)
    with pytest.raises(ValueError, match="repeats"):
        split_classes("a.csv?classes=a,a")


@pytest.mark.parametrize(
    ("dataset", "message"),
    [("digits", "ships no files"), ("heart+csv", "fuses several sources")],
)
def test_datasets_without_node_files_are_refused(dataset: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_node_file(dataset, "/somewhere/file")


def test_an_mnist_node_reads_its_keras_layout_file_with_all_ten_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = np.array([3, 7] * 15, dtype=np.uint8)  # a node with two of the ten digits
    np.savez(tmp_path / "mnist.npz", x_train=images[:20], y_train=labels[:20],
             x_test=images[20:], y_test=labels[20:])
    load_node_data.cache_clear()
    train, val = load_node_data("mnist", str(tmp_path), 0.2, 42, 0)
    assert len(train) + len(val) == 30 and len(val) == 6
    assert train.num_classes == 10 and train.input_shape == (28, 28, 1)
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0  # scaled, not standardised
    assert set(np.flatnonzero(train.label_histogram())) == {3, 7}
