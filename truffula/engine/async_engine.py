"""``AsyncEngine``: the engine for asyncio servers, over ZeroMQ.

The engine loop (``truffula.engine.engine_proc``) runs in its own process (``spawn``), or in a
thread over an in-process socket (``AsyncEngine(core)``, for tests and notebooks). This side
holds the ``Frontend``: ``prepare`` validates and tokenizes, ``submit`` sends the request, and a
reader task turns each ``EngineOutput`` into a ``RequestOutput`` (text, token records) and puts it
on the request's queue. Leaving a ``RequestStream`` early aborts the request. If the engine
dies, every waiting request ends with ``EngineDeadError`` and ``healthy`` turns false.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from truffula import stalls
from truffula.config import EngineConfig
from truffula.engine import messages as m
from truffula.engine.frontend import Frontend
from truffula.engine.output import RequestOutput
from truffula.engine.tokenizer import Tokenizer
from truffula.errors import (
    EngineDeadError,
    EngineOverloadedError,
    ModelLoadError,
    RequestValidationError,
)
from truffula.sampling.params import SamplingParams

log = logging.getLogger("truffula.engine")


def engine_address() -> str:
    folder = Path(tempfile.gettempdir())
    return f"ipc://{folder}/truffula-engine-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"


class AsyncEngine:
    """A client of one engine loop; many clients (API processes) may share one engine."""

    def __init__(
        self,
        core: Any = None,
        *,
        address: str | None = None,
        info: Any = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """``AsyncEngine(core)`` runs the loop over ``core`` in a thread of this process;
        ``spawn`` and ``connect`` build clients of an engine process."""
        self._thread: threading.Thread | None = None
        self._process: Any = None
        self._engine_pid: int | None = None
        if core is not None:
            from truffula.engine.engine_proc import model_info, start_thread

            self.ctx = zmq.asyncio.Context()
            address = f"inproc://truffula-engine-{uuid.uuid4().hex}"
            self._thread = start_thread(core, self.ctx, address)
            info = model_info(core)
            self.frontend = Frontend(
                core.tokenizer,
                core.config,
                core.max_len,
                core.vocab_size,
                core.serving_path,
                core.architecture,
                core.table,
            )
        else:
            self.ctx = zmq.asyncio.Context()
        assert address is not None and info is not None
        self.address = address
        self.info: m.ModelInfo = info
        self.config = msgspec.convert(info.config, EngineConfig)
        if core is None:
            self.frontend = Frontend(
                tokenizer or Tokenizer(Path(info.folder)),
                self.config,
                info.max_len,
                info.vocab_size,
                info.serving_path,
                info.architecture,
            )
        self._sock = self.ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self._streams: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self.dead: str | None = None
        """Why the engine is gone (None while it serves)."""
        self.dead_event: asyncio.Event | None = None
        self.steps = 0

    # ---------------------------------------------------------------- construction
    @classmethod
    async def spawn(cls, config: EngineConfig) -> AsyncEngine:
        """Start an engine process, wait until its model is loaded, and connect to it."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        address = engine_address()
        from truffula.engine.engine_proc import run_engine_process

        proc = ctx.Process(
            target=run_engine_process, args=(config, address, child), name="truffula-engine"
        )
        proc.start()
        child.close()
        try:
            kind, payload = await asyncio.to_thread(_receive, parent, proc)
        finally:
            parent.close()
        if kind != "ready":
            proc.join(5)
            raise ModelLoadError(f"the engine process could not start: {payload}")
        info = msgspec.msgpack.decode(payload, type=m.ModelInfo)
        tokenizer = await asyncio.to_thread(Tokenizer, Path(info.folder))
        engine = cls(address=address, info=info, tokenizer=tokenizer)
        engine._process = proc
        engine._engine_pid = proc.pid
        return engine

    @classmethod
    def connect(cls, address: str, info: m.ModelInfo, engine_pid: int) -> AsyncEngine:
        """A client of an engine process started by another process (more API servers)."""
        engine = cls(address=address, info=info)
        engine._engine_pid = engine_pid
        return engine

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if not self._tasks:
            self.dead_event = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._read(), name="truffula-outputs"),
                loop.create_task(self._watch(), name="truffula-engine-watch"),
                *stalls.event_loop_watch(loop),
            ]

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Finish in-flight requests for up to ``drain_timeout`` seconds, abort the rest, and
        stop the engine this client started (process or thread)."""
        if drain_timeout > 0:
            deadline = asyncio.get_running_loop().time() + drain_timeout
            while self._streams and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        self.end_all("the server is shutting down")
        owner = self._process is not None or self._thread is not None
        if owner and self.dead is None:
            try:
                await asyncio.wait_for(self.call("shutdown"), 10)
            except Exception as exc:
                log.warning("engine did not acknowledge shutdown: %s", exc)
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self._process is not None:
            await asyncio.to_thread(self._process.join, 10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._sock.close()

    def end_all(self, why: str) -> None:
        """End every request in flight with ``EngineDeadError(why)`` (a 503) and abort it."""
        for rid in list(self._streams):
            self._fail(rid, EngineDeadError(why))

    @property
    def healthy(self) -> bool:
        return self.dead is None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---------------------------------------------------------------- requests
    def prepare(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> m.EngineRequest:
        return self.frontend.prepare(prompt, params, request_id)

    def submit(self, req: m.EngineRequest) -> RequestStream:
        """Send a prepared request; raises EngineOverloadedError at once when full."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if len(self._streams) >= self.config.scheduler.max_queued_requests:
            raise EngineOverloadedError("Model is overloaded")
        if req.request_id in self._streams:
            raise RequestValidationError(
                "request_id", f"request id {req.request_id!r} is already in use"
            )
        self.start()
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._streams[req.request_id] = queue
        self.frontend.begin(req)
        self._send(m.ADD, req)
        return RequestStream(self, req, queue)

    async def generate(
        self,
        prompt: str | list[int] | m.EngineRequest,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Prepare, submit and stream a request (validation errors raise before any output)."""
        if not isinstance(prompt, m.EngineRequest):
            prompt = self.prepare(prompt, params or SamplingParams(), request_id)
        async with self.submit(prompt) as stream:
            async for out in stream:
                yield out

    def abort(self, request_id: str, reason: str = "abort") -> None:
        self._send(m.ABORT, [m.Abort(request_id, reason)])

    def _release(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        self.frontend.forget(request_id)
        if not finished and self.dead is None:
            self.abort(request_id)

    # ---------------------------------------------------------------- utility calls
    async def call(self, method: str, *args: Any) -> Any:
        """Run ``method`` in the engine process (adapters, metrics) and return its result;
        errors come back as the engine raised them (AdapterError, ...)."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        self.start()
        call_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        self._send(m.CALL, m.Call(call_id, method, list(args)))
        try:
            return await fut
        finally:
            self._calls.pop(call_id, None)

    # ---------------------------------------------------------------- background tasks
    def _send(self, kind: bytes, payload: object) -> None:
        self._sock.send_multipart([kind, m.encoder.encode(payload)])

    async def _read(self) -> None:
        clock = stalls.clock("outputs", gaps=True)
        while True:
            kind, payload = await self._sock.recv_multipart()
            if kind == m.OUTPUTS:
                self.steps += 1
                clock.start()
                self._deliver(m.outputs_decoder.decode(payload))
                clock.end()
            elif kind == m.REPLY:
                self._resolve(m.reply_decoder.decode(payload))

    def _deliver(self, outputs: list[m.EngineOutput]) -> None:
        stopped = []
        for raw in outputs:
            queue = self._streams.get(raw.request_id)
            if queue is None:
                continue
            if raw.error is not None:
                self.frontend.forget(raw.request_id)
                queue.put_nowait(m.request_error(raw))
                continue
            out, stop = self.frontend.process(raw)
            if stop:
                stopped.append(m.Abort(raw.request_id, "stop_sequence"))
            if out is not None:
                queue.put_nowait(out)
        if stopped:
            self._send(m.ABORT, stopped)

    def _resolve(self, reply: m.Reply) -> None:
        fut = self._calls.get(reply.call_id)
        if fut is None or fut.done():
            return
        if reply.error is None:
            fut.set_result(reply.result)
        else:
            fut.set_exception(m.call_error(reply))

    async def _watch(self) -> None:
        """Notice an engine that died (process gone, thread ended)."""
        while self.dead is None:
            await asyncio.sleep(0.2)
            if not self._engine_alive():
                self._died("the engine process stopped")

    def _engine_alive(self) -> bool:
        if self._thread is not None:
            return self._thread.is_alive()
        if self._process is not None:
            return bool(self._process.is_alive())
        if self._engine_pid is not None:
            try:
                os.kill(self._engine_pid, 0)
            except ProcessLookupError:
                return False
        return True

    def _died(self, why: str) -> None:
        log.error("%s: failing %d requests in flight", why, len(self._streams))
        self.dead = why
        for rid in list(self._streams):
            self._fail(rid, EngineDeadError(why))
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(why))
        if self.dead_event is not None:
            self.dead_event.set()

    def _fail(self, request_id: str, exc: Exception) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(exc)


def _receive(conn: Any, proc: Any) -> tuple[str, Any]:
    """The engine process's first message (ready or error), or its death."""
    while not conn.poll(0.5):
        if not proc.is_alive():
            return "error", f"exited with code {proc.exitcode} while loading the model"
    try:
        return conn.recv()
    except EOFError:
        return "error", f"exited with code {proc.exitcode} while loading the model"


class RequestStream:
    """Async iterator over one request's outputs; closing it early aborts the request."""

    def __init__(
        self,
        engine: AsyncEngine,
        req: m.EngineRequest,
        queue: asyncio.Queue[RequestOutput | Exception],
    ):
        self.engine = engine
        self.request = req
        self._queue = queue
        self.finished = False
        self._closed = False
        self.timings: list[float] | None = None
        self.ended_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:
            self.close()
            raise
        if isinstance(item, Exception):
            self.finished = True
            self.close()
            raise item
        if item.timings is not None:
            self.timings = item.timings  # for the request's trace spans
        if item.finished:
            self.finished = True
            self.ended_at = time.monotonic()
            self.close()
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine._release(self.request_id, self.finished)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
