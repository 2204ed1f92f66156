"""Flower's quickstart-tensorflow pattern on fedprivacy's data and model (the bench's baseline)."""
