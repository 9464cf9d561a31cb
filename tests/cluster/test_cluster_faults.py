"""``truffula cluster`` when a replica cannot start: the deploy fails with the replica's error."""

from __future__ import annotations

import subprocess
import sys

import pytest
from serverproc import ROOT, free_port

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow


def test_a_replica_that_cannot_start_names_its_error() -> None:
    cmd = [sys.executable, "-m", "truffula.cli", "cluster", "--port", str(free_port())]
    cmd += ["--model", "/nonexistent/model"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1
    assert "the replicas did not start" in r.stderr
    assert "model '/nonexistent/model' not found" in r.stderr
