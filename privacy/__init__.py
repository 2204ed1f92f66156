"""Differential privacy: mechanisms, randomness, accounting and ledgers (numpy and dp-accounting only)."""

import logging


class _NotFlower(logging.Filter):
    """Pass every record except Flower's, which its own handler already prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "flwr" or record.name.startswith("flwr."))


def quiet_root_logger() -> None:
    """Give the root logger a handler before absl does; Flower's lines stay single.

    dp-accounting logs through absl, and ``absl.logging.log`` calls
    ``logging.basicConfig()`` whenever the root logger has no handler. That
    root handler then printed every Flower record a second time (Flower's
    ``flwr`` logger propagates to root): ``INFO:flwr:...`` beside the coloured
    line. This handler is what ``basicConfig`` would install (stderr, the same
    format) minus Flower's records. Idempotent; a root logger that already has
    handlers (the user configured logging) is left alone.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    handler.addFilter(_NotFlower())
    root.addHandler(handler)


quiet_root_logger()
