"""A second real server: API key on every route but /health, and graceful shutdown."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest
from serverproc import ServerProcess

KEY = "sekret-key"


@pytest.fixture(scope="module")
def keyed(model_dir):  # type: ignore[no-untyped-def]
    proc = ServerProcess("--api-key", KEY, "--drain-timeout", "30")
    yield proc
    proc.stop()


def test_api_key_guards_every_route_but_health(keyed) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(keyed.url + "/health").status_code == 200
    for method, path in (
        ("GET", "/info"),
        ("GET", "/metrics"),
        ("GET", "/v1/models"),
        ("POST", "/generate"),
        ("POST", "/v1/completions"),
        ("GET", "/"),
    ):
        r = httpx.request(method, keyed.url + path, json={"inputs": "hi"})
        assert r.status_code == 401, path
        assert r.json()["error_type"] == "authentication"
        wrong = httpx.request(
            method,
            keyed.url + path,
            json={"inputs": "hi"},
            headers={"Authorization": "Bearer nope"},
        )
        assert wrong.status_code == 401
    ok = httpx.post(
        keyed.url + "/generate",
        json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["generated_text"]


def test_sigterm_finishes_the_stream_in_flight_then_exits(keyed) -> None:  # type: ignore[no-untyped-def]
    events: list[dict] = []
    first = threading.Event()

    def consume() -> None:
        body = {
            "inputs": "Count from one to fifty:",
            "parameters": {"max_new_tokens": 40, "ignore_eos_token": True},
        }
        with httpx.stream(
            "POST",
            keyed.url + "/generate_stream",
            json=body,
            timeout=120,
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    first.set()

    t = threading.Thread(target=consume)
    t.start()
    assert first.wait(120)
    keyed.proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert len(events) == 40 and events[-1]["generated_text"] is not None
    assert keyed.proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(keyed.url + "/health", timeout=2)
    assert "serving" in keyed.log.read_text()
