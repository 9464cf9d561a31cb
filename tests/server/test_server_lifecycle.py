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


def every_route() -> list[tuple[str, str]]:
    """(method, path) of every route the application serves, HEAD included, in or out of the
    OpenAPI schema; path parameters filled in."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from truffula.server.app import create_app
    from truffula.server.metrics import Metrics
    from truffula.server.state import ServerSettings

    state = SimpleNamespace(settings=ServerSettings(model_id="m"), metrics=Metrics())
    app = create_app(state)  # type: ignore[arg-type]
    paths = set(app.openapi()["paths"]) | {"/", "/ping", "/docs", "/openapi.json", "/ui/app.js"}
    paths |= {"/api-doc/openapi.json", "/docs/oauth2-redirect", "/redoc"}
    routes = []
    with TestClient(app) as client:  # the Allow header of a 405 names each path's methods
        for path in sorted(paths):
            allow = client.request("TRACE", path).headers["allow"].split(", ")
            routes += [(method, path) for method in allow]
    return routes


def test_api_key_guards_every_route_but_health(keyed) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(keyed.url + "/health").status_code == 200
    assert httpx.head(keyed.url + "/health").status_code == 200
    routes = every_route()
    assert len(routes) >= 30 and ("POST", "/score") in routes and ("HEAD", "/info") in routes
    for method, path in routes:
        if path == "/health":
            continue
        if method in ("GET", "HEAD") and (path == "/" or path.startswith("/ui/")):
            # the playground's page loads without the key (and then asks for it)
            assert httpx.request(method, keyed.url + path).status_code == 200, path
            continue
        for headers in (
            {},
            {"Authorization": "Bearer nope"},
            {"Authorization": f"Basic {KEY}"},
            {"Authorization": f"Bearer {KEY}x"},
            {"Authorization": "Bearer ключ".encode()},  # not ASCII: was a 500
            {"Authorization": b"Bearer \xff\xfe"},
        ):
            r = httpx.request(method, keyed.url + path, json={"inputs": "hi"}, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            if method != "HEAD":
                err = r.json()["error"]
                kind = err["type"] if path.startswith("/v1/") else r.json()["error_type"]
                assert kind == "authentication"
    ok = httpx.post(
        keyed.url + "/generate",
        json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["generated_text"]
    text = httpx.get(keyed.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'truffula_requests_total{route="unauthorized",status="401"}' in text
    assert 'status="500"' not in text


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
