"""One replica: an engine process and the FastAPI app of ``truffula serve``, called in-process.

The router hands each request over as plain data (``Call``); the replica runs it through the
server's own ASGI app (``truffula.server.app.create_app``) and yields the response back: first
its head (status and headers, ``x-truffula-replica`` added), then the body's chunks as the app
sends them, so streams stay streams. When the caller goes away (a client disconnect, cancelled
through Serve) the app sees ``http.disconnect`` and aborts the request, as it does on one server.

The adapter key the router read from the body comes with the call; the replica registers it
with Serve's multiplexer (``serve.multiplexed``), which tells the routers which adapters each
replica holds. The adapter itself is loaded by the route, as on one server, so a bad adapter id
is answered in the route's dialect.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from truffula.config import EngineConfig
from truffula.server.settings import ServerSettings

REPLICA_HEADER = "x-truffula-replica"
MAX_ADAPTERS_PER_REPLICA = 64
"""Adapter keys a replica reports to the routers (least recently used dropped); the engine keeps
its own bounds (``--max-cpu-adapters``, ``--max-active-adapters``)."""
DISCONNECT_GRACE_S = 5.0
"""Seconds the app gets to end a request whose caller went away before its task is cancelled."""


@dataclass
class Call:
    """An HTTP request as the router forwards it."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    adapter: str | None = None


@dataclass
class Head:
    """The first item a replica yields: the response's status and headers."""

    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class Held:
    """What the multiplexer keeps for an adapter (the engine keeps the weights)."""

    def __init__(self, adapter_id: str) -> None:
        self.adapter_id = adapter_id


class Replica:
    """The deployment class (``app.py`` wraps it in ``serve.deployment``)."""

    async def __init__(self, settings: ServerSettings, config: EngineConfig) -> None:  # type: ignore[misc]
        from truffula.engine.async_engine import AsyncEngine
        from truffula.server.app import create_app
        from truffula.server.launch import observe
        from truffula.server.metrics import Metrics
        from truffula.server.state import ServerState

        self.name = _replica_name()
        observe(settings, f"replica-{self.name} ")
        self.engine = await AsyncEngine.spawn(config)
        self.engine.start()
        state = ServerState(self.engine, settings, Metrics())
        for adapter_id in settings.preload_adapters:
            await state.preload_adapter(adapter_id)
        self.app = create_app(state)

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS_PER_REPLICA)
    async def hold(self, adapter_id: str) -> Held:
        return Held(adapter_id)

    async def check_health(self) -> None:
        """Serve replaces a replica whose engine process died."""
        if self.engine.dead is not None:
            raise RuntimeError(f"the engine process died: {self.engine.dead}")

    def pid(self) -> int:
        return os.getpid()

    async def handle(self, call: Call) -> AsyncIterator[Head | bytes]:
        if call.adapter is not None:
            await self.hold(serve.get_multiplexed_model_id() or call.adapter)
        async for item in run_asgi(self.app, call, self.name):
            yield item

    def __del__(self) -> None:
        proc = getattr(getattr(self, "engine", None), "_process", None)
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()


async def run_asgi(app: Any, call: Call, name: str) -> AsyncIterator[Head | bytes]:
    """``call`` through the ASGI ``app``: its head, then its body's chunks."""
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await queue.put(message)

    async def run() -> None:
        try:
            await app(_scope(call), receive, send)
        finally:
            queue.put_nowait(None)

    task = asyncio.get_running_loop().create_task(run())
    try:
        while (message := await queue.get()) is not None:
            if message["type"] == "http.response.start":
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                headers.append((REPLICA_HEADER.encode(), name.encode()))
                yield Head(int(message["status"]), headers)
            elif message["type"] == "http.response.body":
                if chunk := message.get("body", b""):
                    yield bytes(chunk)
                if not message.get("more_body", False):
                    break
    finally:
        gone.set()
        if not task.done():
            asyncio.get_running_loop().call_later(DISCONNECT_GRACE_S, task.cancel)


def _scope(call: Call) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": call.path,
        "raw_path": call.path.encode(),
        "query_string": call.query_string,
        "root_path": "",
        "headers": call.headers,
        "client": call.client,
        "server": None,
        "state": {},
    }


def _replica_name() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside Serve (tests of the bridge)
        return f"pid-{os.getpid()}"
