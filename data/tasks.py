"""Learning tasks that clients of one federation may pursue over the same inputs.

With a private head, clients need not share a label space: some may learn the
digit, others a label derived from it, while all of them train the shared
body (multi-task personalised FL, e.g. FedPer's heads; Smith et al. 2017).
"""

from __future__ import annotations

from dataclasses import replace

from .dataset import LabeledData

TASKS = ("label", "parity")


def apply_task(data: LabeledData, task: str) -> LabeledData:
    """The same samples with the labels of ``task``.

    ``label``: the dataset's own labels. ``parity``: label modulo 2 (even or
    odd digit), two classes.
    """
    if task == "label":
        return data
    if task == "parity":
        return replace(data, y=data.y % 2, num_classes=2, name=f"{data.name}/parity")
    raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")


def task_of(partition_id: int, tasks: str) -> str:
    """Client ``partition_id``'s task: the comma-separated ``tasks`` in turn."""
    names = [t.strip() for t in tasks.split(",")]
    for name in names:
        if name not in TASKS:
            raise ValueError(f"client-tasks entry {name!r} is not one of {', '.join(TASKS)}")
    return names[partition_id % len(names)]
