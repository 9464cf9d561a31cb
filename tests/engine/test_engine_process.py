"""The engine in its own process: several API processes in front of it, gzip, a drain that ends
what is left with a 503, and an engine that dies (503s, /health fails, the server exits)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from serverproc import ServerProcess

pytestmark = pytest.mark.slow

LONG = {
    "inputs": "Count to a thousand:",
    "parameters": {"max_new_tokens": 4000, "ignore_eos_token": True},
}


def spawned_children(pid: int) -> list[int]:
    """Processes started by ``pid`` through multiprocessing's spawn (engine, API servers)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmd:
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class LongRequests:
    """One streamed and one plain long request in threads; ``wait`` joins both."""

    def __init__(self, url: str) -> None:
        self.events: list[dict] = []
        self.result: dict = {}
        self.first = threading.Event()
        self.threads = [
            threading.Thread(target=self._stream, args=(url,)),
            threading.Thread(target=self._plain, args=(url,)),
        ]
        for t in self.threads:
            t.start()
        assert self.first.wait(120), "no token streamed"

    def _stream(self, url: str) -> None:
        with httpx.stream("POST", url + "/generate_stream", json=LONG, timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    self.events.append(json.loads(line[5:]))
                    self.first.set()

    def _plain(self, url: str) -> None:
        r = httpx.post(url + "/generate", json=LONG, timeout=120)
        self.result.update(status=r.status_code, body=r.json())

    def wait(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a request hung"


def test_two_api_processes_share_one_engine(model_dir) -> None:  # type: ignore[no-untyped-def]
    proc = ServerProcess("--api-server-count", "2")
    try:
        assert len(spawned_children(proc.proc.pid)) == 2  # the engine and a second API process
        info = httpx.get(proc.url + "/info").json()
        assert info["api_servers"] == 2
        body = {
            "inputs": "The capital of France is",
            "parameters": {"max_new_tokens": 6, "return_k_alternatives": 3},
        }
        # fresh connections are spread over both processes by the kernel; every answer is equal
        outs = []
        for _ in range(8):
            with httpx.Client() as c:
                outs.append(c.post(proc.url + "/generate", json=body, timeout=60).json())
        assert len({json.dumps(o, sort_keys=True) for o in outs}) == 1
        tokens = outs[0]["details"]["tokens"]
        assert len(tokens) == 6 and all(len(t["alternative_tokens"]) == 3 for t in tokens)
        # gzip when asked, the same JSON; never for event streams
        raw = httpx.post(
            proc.url + "/generate",
            json={**body, "parameters": {**body["parameters"], "max_new_tokens": 20}},
            headers={"Accept-Encoding": "gzip"},
            timeout=60,
        )
        assert raw.headers["content-encoding"] == "gzip"
        assert raw.json()["details"]["generated_tokens"] == 20  # httpx decompressed it
        assert len(raw.content) > int(raw.headers["content-length"])
        metrics = httpx.get(proc.url + "/metrics").text
        assert "truffula_generated_tokens_total" in metrics and "truffula_requests_total" in metrics
    finally:
        assert proc.stop(signal.SIGTERM) == 0
    time.sleep(0.5)
    assert not [p for p in spawned_children(proc.proc.pid) if alive(p)]


def test_drain_ends_what_is_left_with_503(model_dir) -> None:  # type: ignore[no-untyped-def]
    proc = ServerProcess("--drain-timeout", "1")
    children = spawned_children(proc.proc.pid)
    reqs = LongRequests(proc.url)
    proc.proc.send_signal(signal.SIGTERM)
    reqs.wait(60)
    assert reqs.result["status"] == 503 and reqs.result["body"]["error_type"] == "unavailable"
    assert "error" in reqs.events[-1] and 1 <= len(reqs.events) < 4000
    assert proc.proc.wait(60) == 0
    assert not [p for p in children if alive(p)]
    log = proc.log.read_text()
    assert "Traceback" not in log


def test_engine_death_is_503_and_the_server_exits(model_dir) -> None:  # type: ignore[no-untyped-def]
    proc = ServerProcess()
    (engine,) = spawned_children(proc.proc.pid)
    reqs = LongRequests(proc.url)
    os.kill(engine, signal.SIGKILL)
    reqs.wait(30)
    assert reqs.result["status"] == 503, reqs.result
    assert "error" in reqs.events[-1]
    assert proc.proc.wait(30) == 1
