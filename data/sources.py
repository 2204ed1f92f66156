"""The registry of dataset sources, looked up by the run-config key ``dataset``."""

from __future__ import annotations

from collections.abc import Callable

from .dataset import LabeledData
from .digits import load_digits

# A loader takes the run-config ``data-path`` ("" when unset) and returns the
# whole dataset; it raises FileNotFoundError/ValueError with a clear message.
SourceLoader = Callable[[str], LabeledData]

SOURCES: dict[str, SourceLoader] = {
    "digits": lambda data_path: load_digits(),
}


def load_source(name: str, data_path: str = "") -> LabeledData:
    """Load the dataset registered as ``name``."""
    try:
        loader = SOURCES[name]
    except KeyError:
        raise ValueError(
            f"dataset={name!r} is not one of {', '.join(sorted(SOURCES))}"
        ) from None
    return loader(data_path)
