"""Jobs released in stages by the test: job ``tag`` (an index) of stage
``int(tag) // per_stage`` waits until the file ``<gates>-<stage>`` exists,
so a test can look at a page while a known number of jobs are done and
others still run."""

from __future__ import annotations

import os
import time

from examples.jobs import mark


def staged_mark(seconds: float, gates: str, per_stage: int, path: str, tag: str,
                deadline: float = 60.0) -> str:
    """Wait for this job's stage to open (time.sleep: cooperative in a
    patched worker), sleep ``seconds``, then mark ``tag`` in ``path``."""
    gate = f"{gates}-{int(tag) // per_stage}"
    end = time.monotonic() + deadline
    while not os.path.exists(gate):
        if time.monotonic() > end:
            raise TimeoutError(f"{gate} never appeared")
        time.sleep(0.01)
    time.sleep(seconds)
    return mark(path, tag)
