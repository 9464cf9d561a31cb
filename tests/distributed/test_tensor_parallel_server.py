"""``truffula serve --tensor-parallel-size 2`` on CPU: it serves; when a worker rank is killed,
the next request gets a 503, the server exits with status 1, and no process of it is left."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
from serverproc import ServerProcess

from distributed.tiny import PROMPTS, make_model

pytestmark = pytest.mark.slow  # starts a server and its ranks


def spawned(proc: psutil.Process) -> list[psutil.Process]:
    """The multiprocessing children of ``proc`` (not its resource tracker)."""
    return [c for c in proc.children() if "spawn_main" in " ".join(c.cmdline())]


def test_a_dead_worker_ends_the_server(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "tiny")
    server = ServerProcess(
        "--model", str(folder), "--device", "cpu", "--tensor-parallel-size", "2",
        log=tmp_path / "server.log",
    )  # fmt: skip
    try:
        body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4, "details": True}}
        ok = httpx.post(server.url + "/generate", json=body, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["details"]["tokens"]) == 4
        (engine,) = spawned(psutil.Process(server.proc.pid))
        (worker,) = spawned(engine)
        worker.send_signal(signal.SIGKILL)
        failed = httpx.post(server.url + "/generate", json=body, timeout=60)
        assert failed.status_code == 503
        assert server.proc.wait(60) == 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(p.is_running() for p in (engine, worker)):
            time.sleep(0.2)
        assert not engine.is_running() and not worker.is_running()
        assert "tensor-parallel worker rank 1 died" in (tmp_path / "server.log").read_text()
    finally:
        server.stop()
