"""A real ``truffula cluster`` process (a local Ray instance) on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from serverproc import ROOT, free_port, stop_process


class ClusterProcess:
    def __init__(self, *extra: str, key: str | None = None, timeout: float = 400) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log = Path(f"/tmp/truffula-cluster-{self.port}.log")
        cmd = [sys.executable, "-m", "truffula.cli", "cluster", "--port", str(self.port), *extra]
        if key is not None:
            cmd += ["--api-key", key]
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"},
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"truffula cluster exited early:\n{self.log.read_text()}")
            if "serving" in self.log.read_text():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"truffula cluster not ready:\n{self.log.read_text()}")

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.key is None else {"authorization": f"Bearer {self.key}"}

    def post(self, path: str, body: dict, timeout: float = 120) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=timeout)

    def stop(self, timeout: float = 90) -> int:
        return stop_process(self.proc, self._out, signal.SIGINT, timeout)
