"""Our Flower strategies: pure numpy aggregation math with thin Flower glue (no TensorFlow).

Usable as a library from any Flower 1.42 ServerApp (example:
``examples/flower_quickstart_with_our_strategies``)::

    from strategies import FedAvg, DPFedAvg

    strategy = DPFedAvg(noise_multiplier=0.8, clipping_norm=1.0, fraction_train=0.5)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(arrays), num_rounds=3)
    strategy.ledger.epsilon  # the run's user-level epsilon at strategy.ledger.target_delta

They send the ArrayRecord they are given (named or positional keys) and
accept a reply that returns the same keys, shapes and dtypes, finite values
and one MetricRecord with a positive whole ``num-examples`` (Flower's
quickstart reply). The names are loaded lazily, so ``strategies.aggregation``
and the other numpy-only modules import without Flower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from strategies.dp_fedavg import DPFedAvg
    from strategies.fedavg import FedAvg

__all__ = ["DPFedAvg", "FedAvg"]

_LAZY = {"FedAvg": "strategies.fedavg", "DPFedAvg": "strategies.dp_fedavg"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib  # pylint: disable=import-outside-toplevel

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
