"""What the quickstart's ServerApp and ClientApp share: the data and model settings.

As in Flower's quickstart-tensorflow ``task.py``, Keras is imported when this
module is. The data (this project's digits partitions) and the CNN come from
the fedprivacy packages through ``app.task``, so both contenders of
``bench/main_job_flwr_run.py`` train the same model on the same data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras  # noqa: F401  (the quickstart imports Keras with its task module)

from app.task import federation_spec, model_spec
from clients.models import build_model
from data.dataset import LabeledData
from data.federation import load_client_data


@dataclass(frozen=True)
class Settings:
    """The run-config values ``app.task.federation_spec`` and ``model_spec`` read."""

    dataset: str
    data_path: str
    partitioner: str
    seed: int
    test_fraction: float
    dirichlet_alpha: float
    shards_per_client: int
    val_fraction: float
    server_data: str
    max_classes: int
    model: str

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Settings:
        return cls(
            dataset=str(run_config["dataset"]),
            data_path=str(run_config["data-path"]),
            partitioner=str(run_config["partitioner"]),
            seed=int(run_config["seed"]),
            test_fraction=float(run_config["test-fraction"]),
            dirichlet_alpha=float(run_config["dirichlet-alpha"]),
            shards_per_client=int(run_config["shards-per-client"]),
            val_fraction=float(run_config["val-fraction"]),
            server_data=str(run_config["server-data"]),
            max_classes=int(run_config["max-classes"]),
            model=str(run_config["model"]),
        )


def load_data(
    run_config: Mapping[str, Any], partition_id: int, num_partitions: int
) -> tuple[LabeledData, LabeledData]:
    """This node's ``(train, validation)`` split of the federation."""
    settings = Settings.from_run_config(run_config)
    return load_client_data(federation_spec(settings, num_partitions), partition_id)  # type: ignore[arg-type]


def load_model(run_config: Mapping[str, Any], data: LabeledData) -> keras.Model:
    """A new CNN for ``data``, compiled with SGD (the quickstart builds one every call)."""
    settings = Settings.from_run_config(run_config)
    spec = model_spec(settings, data)  # type: ignore[arg-type]
    model = build_model(spec.kind, spec.input_shape, spec.num_classes, seed=spec.seed,
                        architecture=spec.architecture)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=float(run_config["learning-rate"])),
        loss="sparse_categorical_crossentropy", metrics=["accuracy"],
    )
    return model
