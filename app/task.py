"""What the ServerApp and ClientApp share: the federation spec and the model spec."""

from __future__ import annotations

from clients.training import ModelSpec
from data.dataset import LabeledData
from data.federation import FederationSpec

from .config import RunConfig


def federation_spec(config: RunConfig, num_partitions: int) -> FederationSpec:
    """The data a run's clients and server agree on."""
    return FederationSpec(
        dataset=config.dataset,
        data_path=config.data_path,
        partitioner=config.partitioner,
        num_partitions=num_partitions,
        seed=config.seed,
        test_fraction=config.test_fraction,
        dirichlet_alpha=config.dirichlet_alpha,
        shards_per_client=config.shards_per_client,
        val_fraction=config.val_fraction,
        server_data=config.server_data,
        max_classes=config.max_classes,
    )


def model_spec(config: RunConfig, data: LabeledData) -> ModelSpec:
    """The architecture every party builds for ``data``."""
    return ModelSpec(
        kind=data.kind,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        seed=config.seed,
        architecture=config.model,
    )
