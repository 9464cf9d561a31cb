"""The collector settles after start-up: survivors frozen, long collections logged on request."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import gc, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
keep = [[i] for i in range(200_000)]  # start-up objects that live for good
from truffula import heap
heap.settle()
assert gc.get_freeze_count() >= len(keep), gc.get_freeze_count()
assert gc.get_threshold()[0] == heap.YOUNG_THRESHOLD
garbage = [[{"j": j}] for j in range(300_000)]
del garbage
gc.collect()
"""


def test_settle_freezes_the_start_up_heap_and_logs_long_collections() -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={"TRUFFULA_GC_LOG": "0", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "garbage collection of generation 2 took" in run.stdout
    quiet = subprocess.run(
        [sys.executable, "-c", SCRIPT], env={"PATH": ""}, capture_output=True, text=True
    )
    assert quiet.returncode == 0, quiet.stderr
    assert "garbage collection" not in quiet.stdout
