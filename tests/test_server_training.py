"""Server-side training: the public slice is nobody's data, and epochs 0 means no step."""

from __future__ import annotations

import numpy as np
import pytest

from data.dataset import LabeledData
from data.federation import FederationSpec, build_federation_with_public_slice
from data.public_slice import (
    parse_server_data,
    public_slice_indices,
    split_public_slice,
)
from strategies.fedavg import FedAvg

keras = pytest.importorskip("keras")

from clients.models import build_model  # noqa: E402
from clients.server_training import (  # noqa: E402
    ServerTrainer,
    fine_tune,
    make_server_update_fn,
)
from clients.weights import get_weights  # noqa: E402


def digits_spec(partitioner: str = "shards") -> FederationSpec:
    return FederationSpec(
        dataset="digits",
        data_path="",
        partitioner=partitioner,
        num_partitions=10,
        seed=3,
        test_fraction=0.2,
        shards_per_client=2,
    )


def id_data(ids: np.ndarray, labels: np.ndarray) -> LabeledData:
    """Samples whose single feature is their id, so every part can be traced back."""
    return LabeledData(
        x=ids.astype(np.float32)[:, None], y=labels, num_classes=10, kind="tabular", name="ids"
    )


def ids(data: LabeledData) -> set[int]:
    return set(data.x[:, 0].astype(int).tolist())


def test_parse_server_data() -> None:
    assert parse_server_data("") is None
    assert parse_server_data("  ") is None
    assert parse_server_data("public-slice:0.01").size == 0.01
    assert parse_server_data("public-slice:600").size == 600
    assert parse_server_data("public-slice:600").count(60_000) == 600
    assert parse_server_data("public-slice:0.01").count(60_000) == 600
    for bad in ("mnist", "public-slice", "public-slice:0", "public-slice:1.5", "client:0.1"):
        with pytest.raises(ValueError, match="server-data"):
            parse_server_data(bad)


@pytest.mark.parametrize("partitioner", ["shards", "iid", "dirichlet"])
def test_public_slice_is_disjoint_from_test_and_every_client(partitioner, monkeypatch) -> None:
    import data.federation as federation

    def uncached() -> None:
        federation.build_federation.cache_clear()
        federation.load_server_data.cache_clear()

    rng = np.random.default_rng(0)
    train = id_data(np.arange(2000), rng.integers(0, 10, 2000))
    test = id_data(np.arange(2000, 2500), rng.integers(0, 10, 500))
    monkeypatch.setattr(federation, "load_server_split", lambda *args: (train, test))
    spec = FederationSpec(
        dataset="synthetic", data_path="", partitioner=partitioner, num_partitions=20,
        seed=7, test_fraction=0.2,
    )
    uncached()
    built = build_federation_with_public_slice(spec, "public-slice:0.05")
    pool, public = built.federation.train, built.public
    clients = [ids(pool.subset(p)) for p in built.federation.partitions]
    client_ids = set().union(*clients)
    assert len(public) == 100
    assert ids(public).isdisjoint(client_ids)
    assert ids(public).isdisjoint(ids(built.federation.test))
    assert client_ids.isdisjoint(ids(built.federation.test))
    assert client_ids | ids(public) == ids(train)  # nothing lost, nothing added
    assert sum(len(c) for c in clients) == len(client_ids)  # clients disjoint
    # Same spec, same parts: what the server and every client compute agrees.
    uncached()
    again = build_federation_with_public_slice(spec, "public-slice:0.05")
    assert ids(again.public) == ids(public)
    uncached()  # leave no synthetic federation in the caches


def test_public_slice_of_a_real_dataset_is_stratified() -> None:
    built = build_federation_with_public_slice(digits_spec(), "public-slice:0.1")
    public, pool = built.public, built.federation.train
    assert len(public) == round(0.1 * (len(public) + len(pool)))
    assert np.all(np.bincount(public.y, minlength=10) > 0)
    assert sum(len(p) for p in built.federation.partitions) == len(pool)
    with pytest.raises(ValueError, match="empty"):
        build_federation_with_public_slice(digits_spec(), "")


def test_slice_indices_are_disjoint_from_the_rest_and_seeded() -> None:
    labels = np.repeat(np.arange(10), 100)
    a = public_slice_indices(labels, 50, seed=1)
    assert len(a) == 50 and len(set(a.tolist())) == 50
    np.testing.assert_array_equal(a, public_slice_indices(labels, 50, seed=1))
    assert not np.array_equal(a, public_slice_indices(labels, 50, seed=2))
    np.testing.assert_array_equal(np.bincount(labels[a], minlength=10), 5)  # stratified
    data = LabeledData(
        x=np.arange(1000, dtype=np.float32)[:, None], y=labels, num_classes=10,
        kind="tabular", name="ids",
    )
    pool, public = split_public_slice(data, 50, seed=1)
    assert set(pool.x[:, 0].tolist()).isdisjoint(public.x[:, 0].tolist())
    assert len(pool) + len(public) == 1000
    with pytest.raises(ValueError):
        public_slice_indices(labels, 1000, seed=0)


# ---------------------------------------------------------------- the update
@pytest.fixture(scope="module")
def model() -> keras.Model:
    net = build_model("image", (8, 8, 1), 10, seed=0)
    net.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    return net


def test_epochs_zero_means_no_server_step(model: keras.Model) -> None:
    public = build_federation_with_public_slice(digits_spec(), "public-slice:0.1").public
    before = get_weights(model)
    assert make_server_update_fn(model, public, epochs=0, batch_size=8, learning_rate=0.1) is None
    assert make_server_update_fn(model, None, epochs=0, batch_size=8, learning_rate=0.1) is None
    assert np.isnan(fine_tune(model, public, 0, 8, 0.1))
    after = get_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert FedAvg(server_update_fn=None).server_step(1, before) is before
    with pytest.raises(ValueError, match="server-data"):
        make_server_update_fn(model, None, epochs=1, batch_size=8, learning_rate=0.1)


def test_server_training_uses_only_the_server_data(model: keras.Model, monkeypatch) -> None:
    import data.federation as federation

    spec = digits_spec()
    public = build_federation_with_public_slice(spec, "public-slice:0.1").public

    def forbidden(*args, **kwargs):
        raise AssertionError("server training touched client data")

    monkeypatch.setattr(federation, "load_client_data", forbidden)
    monkeypatch.setattr(federation, "build_federation", forbidden)

    trainer = make_server_update_fn(
        model, public, epochs=2, batch_size=16, learning_rate=0.1, seed=3
    )
    assert isinstance(trainer, ServerTrainer)
    assert trainer.data is public
    arrays = {k: v.copy() for k, v in get_weights(model).items()}
    tuned = trainer(1, arrays)  # would raise had it loaded any client's data
    assert set(tuned) == set(arrays)
    assert all(tuned[k].dtype == arrays[k].dtype for k in arrays)
    assert any(not np.allclose(tuned[k], arrays[k]) for k in arrays)
    assert np.isfinite(trainer.last_loss)
    # Deterministic per round, different across rounds.
    again = trainer(1, arrays)
    assert all(np.array_equal(again[k], tuned[k]) for k in arrays)
    other = trainer(2, arrays)
    assert any(not np.array_equal(other[k], tuned[k]) for k in arrays)
    # And as the strategy's hook, it runs on the aggregate.
    strategy = FedAvg(server_update_fn=trainer)
    out = strategy.server_step(1, arrays)
    assert all(np.array_equal(out[k], tuned[k]) for k in arrays)
