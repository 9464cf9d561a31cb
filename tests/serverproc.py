"""Start a real ``truffula serve`` process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, *extra: str, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or Path(f"/tmp/truffula-server-{self.port}.log")
        cmd = [
            sys.executable,
            "-m",
            "truffula.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *extra,
        ]
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()}")
            try:
                if (
                    httpx.get(self.url + "/health", timeout=1).status_code == 200
                    and "serving" in self.log.read_text()
                ):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        return stop_process(self.proc, self._out, sig, timeout)


def stop_process(proc: subprocess.Popen, out: IO[str], sig: int, timeout: float) -> int:
    """Signal ``proc`` (if it still runs), kill it after ``timeout`` seconds, close its log."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out.close()
    return proc.returncode
