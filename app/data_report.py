"""What each client holds: a one-line summary (per client at DEBUG) and a label-distribution plot."""

from __future__ import annotations

from logging import DEBUG, INFO
from pathlib import Path

import numpy as np

from flwr.common.logger import log

from data.federation import Federation


def label_counts(federation: Federation) -> np.ndarray:
    """``(clients, classes)`` matrix of label counts per client."""
    labels = federation.train.y
    return np.stack(
        [np.bincount(labels[p], minlength=federation.train.num_classes) for p in federation.partitions]
    )


def log_client_summary(federation: Federation, plot: Path | None = None) -> None:
    """One INFO line for the federation, one DEBUG line per client.

    A thousand-client run must not print a thousand lines; the plot and
    ``FEDPRIVACY_VERBOSE=1`` show each client.
    """
    counts = label_counts(federation)
    sizes = counts.sum(axis=1)
    groups = federation.train.group_names
    for client, row in enumerate(counts):
        log(DEBUG, "client %d: %d samples, labels %s", client, int(row.sum()), row.tolist())
    institutions = (
        f" (institutions: {', '.join(groups)})" if groups and len(groups) == len(counts) else ""
    )
    log(
        INFO,
        "%d clients%s, %d-%d samples each (median %d), %.1f classes each on average%s",
        len(counts),
        institutions,
        int(sizes.min()),
        int(sizes.max()),
        int(np.median(sizes)),
        float((counts > 0).sum(axis=1).mean()),
        "" if plot is None else f"; label distribution: {plot}",
    )


#: Above this many clients the plot is a heatmap (a bar per client would be
#: metres wide: 1,000 clients took 15 s and a 38,000-pixel-wide PNG).
MAX_BAR_CLIENTS = 50


def plot_label_distribution(federation: Federation, path: Path) -> Path:
    """Save the label counts per client as PNG: stacked bars, or a heatmap for many clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = label_counts(federation)
    num_clients, num_classes = counts.shape
    if num_clients > MAX_BAR_CLIENTS:
        fig, ax = plt.subplots(figsize=(10.0, 4.0))
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(shares.T, aspect="auto", interpolation="nearest", cmap="viridis",
                          extent=(-0.5, num_clients - 0.5, num_classes - 0.5, -0.5))
        fig.colorbar(image, ax=ax, label="share of the client's samples")
        ax.set_xlabel("client (partition id)")
        ax.set_ylabel("label")
        ax.set_title(f"Label distribution per client: {federation.train.name} "
                     f"({num_clients} clients, {int(counts.sum(axis=1).min())}-"
                     f"{int(counts.sum(axis=1).max())} samples each)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * num_clients + 2), 4.0))
    bottom = np.zeros(num_clients)
    colors = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    for label in range(num_classes):
        ax.bar(range(num_clients), counts[:, label], bottom=bottom,
               color=colors(label % colors.N), label=str(label))
        bottom += counts[:, label]
    names = federation.train.group_names
    if names and len(names) == num_clients:
        ax.set_xticks(range(num_clients), names, rotation=30, ha="right")
        ax.set_xlabel("client (institution)")
    else:
        ax.set_xticks(range(num_clients))
        ax.set_xlabel("client (partition id)")
    ax.set_ylim(0, counts.sum(axis=1).max() * 1.05)
    ax.set_ylabel("training samples")
    ax.set_title(f"Label distribution per client: {federation.train.name}")
    ax.legend(title="label", fontsize="small", ncol=2 if num_classes > 10 else 1,
              bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
