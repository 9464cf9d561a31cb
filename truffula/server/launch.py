"""``truffula serve``: bind the port, start the engine process, serve HTTP from one or more API
processes, drain on SIGINT/SIGTERM, and stop when the engine dies. Everything it was told is
one ``ServerSettings`` (built by the CLI) and one ``EngineConfig``.

Processes: this one binds the listening socket first (a port in use fails before the model
loads), spawns the engine process and waits for its model, then serves HTTP; with
``--api-server-count N`` it spawns N-1 more API processes that accept on the same socket. All of
them talk to the one engine over ZeroMQ. A signal drains for ``--drain-timeout`` seconds: new
connections are refused, running requests go on; what is still running then ends with a 503
(or an error event on a stream). If the engine process dies, every waiting request gets a 503,
``/health`` fails, and the servers exit with status 1.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
from typing import Any

import msgspec

from truffula import envs, heap
from truffula.config import EngineConfig
from truffula.engine.async_engine import AsyncEngine
from truffula.engine.messages import ModelInfo
from truffula.server import tracing
from truffula.server.metrics import Metrics
from truffula.server.observe import configure_logging
from truffula.server.protocol import set_strict_fields
from truffula.server.settings import ServerSettings
from truffula.server.state import ServerState

log = logging.getLogger("truffula.server")


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything slow happens. Its protocol is named
    (``IPPROTO_TCP``): asyncio turns Nagle's algorithm off (``TCP_NODELAY``) only on accepted
    sockets that say they are TCP, and with it on, a token event written while the last one is
    unacknowledged waits for the client's delayed ACK (40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(
            f"truffula: error: cannot listen on {host}:{port} (--port): {exc}"
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server:
    """uvicorn on an already bound socket; a signal starts the drain."""

    def __init__(
        self,
        state: ServerState,
        sock: socket.socket,
        log_config: dict[str, Any] | None = None,
    ) -> None:
        import uvicorn

        from truffula.server.app import create_app

        self.state = state
        self.sock = sock
        self.drain = float(state.settings.drain_timeout)
        extra: dict[str, Any] = {} if log_config is None else {"log_config": log_config}
        config = uvicorn.Config(
            create_app(state),
            log_level=state.settings.log_level,
            timeout_graceful_shutdown=int(self.drain) + 3,
            lifespan="off",
            access_log=False,  # the ``request`` lines of truffula.access replace uvicorn's
            **extra,
        )
        outer = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                super().handle_exit(sig, frame)
                outer.on_signal()

        self.server = Server(config)
        self._drain_task: asyncio.Task[None] | None = None
        self.engine_died = False

    def on_signal(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        engine = self.state.engine
        deadline = asyncio.get_running_loop().time() + self.drain
        while engine.num_in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if engine.num_in_flight:
            log.warning("drain timeout: ending %d requests with 503", engine.num_in_flight)
        engine.end_all("the server is shutting down")

    async def _watch_engine(self) -> None:
        assert self.state.engine.dead_event is not None
        await self.state.engine.dead_event.wait()
        self.engine_died = True
        self.server.should_exit = True

    async def run(self, on_started: Any = None) -> int:
        engine = self.state.engine
        engine.start()
        watch = asyncio.create_task(self._watch_engine())

        async def announce() -> None:
            while not self.server.started:
                await asyncio.sleep(0.05)
            if on_started is not None:
                on_started()

        ann = asyncio.create_task(announce())
        try:
            await self.server.serve(sockets=[self.sock])
        finally:
            ann.cancel()
            watch.cancel()
            await engine.shutdown(drain_timeout=0)
            tracing.shutdown()
        return 1 if self.engine_died else 0


def _quiet_signals() -> None:
    # uvicorn re-raises the signal after a clean drain; that must not kill the process.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)


def observe(settings: ServerSettings, prefix: str = "") -> dict[str, Any] | None:
    """This process's logs (``--log-format``), traces (``--otlp-endpoint``) and
    ``--strict-params``; returns uvicorn's ``log_config``."""
    set_strict_fields(settings.strict_params)
    os.environ[envs.TRUFFULA_LOG_FORMAT] = settings.log_format  # the engine process's too
    tracing.setup(settings.otlp_endpoint, settings.otlp_service_name)
    return configure_logging(settings.log_format, settings.log_level, prefix)


def serve(settings: ServerSettings, config: EngineConfig) -> int:
    # a missing tracing SDK fails before the model loads
    log_config = observe(settings)
    sock = bind_socket(settings.host, settings.port)
    count = settings.api_server_count

    async def main() -> int:
        engine = await AsyncEngine.spawn(config)
        state = ServerState(engine, settings, Metrics())
        for adapter_id in settings.preload_adapters:
            await state.preload_adapter(adapter_id)
        ctx = mp.get_context("spawn")
        others = [
            ctx.Process(
                target=run_api_server,
                args=(
                    settings,
                    sock,
                    engine.address,
                    msgspec.json.encode(engine.info),
                    engine._engine_pid,
                    i,
                ),
                name=f"truffula-api-{i}",
            )
            for i in range(1, count)
        ]
        for p in others:
            p.start()
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host

        def announce() -> None:
            print(
                f"truffula {settings.version} serving {state.settings.model_id} at "
                f"http://{host}:{settings.port} ({count} API process{'es' if count > 1 else ''})",
                flush=True,
            )

        _quiet_signals()
        heap.settle()
        try:
            return await _Server(state, sock, log_config).run(announce)
        finally:
            for p in others:
                if p.is_alive():
                    p.terminate()  # SIGTERM: each drains its own requests
            for p in others:
                await asyncio.to_thread(p.join, settings.drain_timeout + 5)
                if p.is_alive():
                    p.kill()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.stdout.flush()


def run_api_server(
    settings: ServerSettings,
    sock: socket.socket,
    address: str,
    info: bytes,
    engine_pid: int,
    index: int,
) -> None:
    """Entry point of API process ``index`` (> 0): a client of the running engine process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the first API process forwards SIGTERM
    log_config = observe(settings, f"api-{index} ")

    async def main() -> int:
        engine = AsyncEngine.connect(address, msgspec.json.decode(info, type=ModelInfo), engine_pid)
        state = ServerState(engine, settings, Metrics())
        heap.settle()
        return await _Server(state, sock, log_config).run()

    sys.exit(asyncio.run(main()))
