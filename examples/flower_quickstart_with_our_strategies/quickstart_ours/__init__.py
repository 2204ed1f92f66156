"""Flower's quickstart-numpy pairing, with fedprivacy's strategies on the server."""
