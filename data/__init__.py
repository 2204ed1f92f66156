"""Datasets: real loaders, the server's held-out split and partitioning into clients."""
