"""A federation run in a child process that a test can kill after a given round.

Usage: python -m tests.resume_child CONFIG_JSON RUN_ID [PAUSE_AFTER_ROUND]

With PAUSE_AFTER_ROUND the child blocks forever once that round's entry is in
metrics.json, so the parent can SIGKILL it at a known point.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> None:
    config = json.loads(argv[0])
    run_id = int(argv[1])
    pause_after = int(argv[2]) if len(argv) > 2 else -1

    from app import run_outputs
    from tests.inprocess import node_contexts, run_federation

    if pause_after >= 0:
        append = run_outputs.MetricsLog.append

        def append_then_pause(self, entry):  # type: ignore[no-untyped-def]
            append(self, entry)
            if entry.get("round") == pause_after:
                while True:  # wait for the parent's SIGKILL
                    time.sleep(1)

        run_outputs.MetricsLog.append = append_then_pause  # type: ignore[method-assign]
    run_federation(config, node_contexts(4, config, run_id=run_id))


if __name__ == "__main__":
    main(sys.argv[1:])
