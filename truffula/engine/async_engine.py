"""``AsyncEngine``: the engine core behind asyncio, for the HTTP server.

One background task runs the step loop; each step executes in a dedicated worker thread so the
event loop stays free for HTTP. Only that thread touches the engine core: ``generate`` validates
and tokenizes on the caller's side, then passes the prepared request (and later aborts) through a
command queue drained at the start of every step. Each request has an asyncio queue of
RequestOutputs; leaving the ``generate`` iterator early (client gone, task cancelled) aborts the
request, which frees its KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from truffula.config import EngineConfig
from truffula.engine.core import EngineCore, Request
from truffula.engine.output import RequestOutput
from truffula.errors import EngineOverloadedError, GenerationError
from truffula.sampling.params import SamplingParams

log = logging.getLogger("truffula.engine")

_Command = tuple[str, object]


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="truffula-step")
        self._commands: list[_Command] = []
        self._lock = threading.Lock()
        self._streams: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.steps = 0

    @classmethod
    async def create(cls, config: EngineConfig, progress: bool = True) -> AsyncEngine:
        core = await asyncio.to_thread(EngineCore, config, progress)
        return cls(core)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="truffula-steps")

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Finish in-flight requests for up to ``drain_timeout`` seconds, abort the rest, stop."""
        if drain_timeout > 0:
            deadline = asyncio.get_running_loop().time() + drain_timeout
            while self._streams and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        for rid in list(self._streams):
            self.abort(rid)
        await asyncio.sleep(0)
        self._stopping = True
        self._notify()
        if self._task is not None:
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    @property
    def healthy(self) -> bool:
        """The step loop is running (or not started yet) and has not died."""
        return self._task is None or not self._task.done()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---------------------------------------------------------------- requests
    def prepare(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> Request:
        return self.core.prepare_request(prompt, params, request_id)

    def submit(self, req: Request) -> RequestStream:
        """Queue a prepared request; raises EngineOverloadedError at once when full."""
        if len(self._streams) >= self.core.config.scheduler.max_queued_requests:
            raise EngineOverloadedError("Model is overloaded")
        if req.request_id in self._streams:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.start()
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._streams[req.request_id] = queue
        self._submit(("add", req))
        return RequestStream(self, req, queue)

    async def generate(
        self,
        prompt: str | list[int] | Request,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Prepare, submit and stream a request (validation errors raise before any output)."""
        if not isinstance(prompt, Request):
            prompt = self.prepare(prompt, params or SamplingParams(), request_id)
        async with self.submit(prompt) as stream:
            async for out in stream:
                yield out

    def _release(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        if not finished:
            self._submit(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    # ---------------------------------------------------------------- step loop
    def _submit(self, cmd: _Command) -> None:
        with self._lock:
            self._commands.append(cmd)
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            with self._lock:
                idle = not self._commands
            if idle and not self.core.has_work():
                if self._stopping:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self._step)
            except Exception as exc:  # a failed step must not take the server down
                log.exception("engine step failed; failing the requests in flight")
                await loop.run_in_executor(self._executor, self._abort_all)
                for queue in self._streams.values():
                    queue.put_nowait(GenerationError(f"Request failed during generation: {exc}"))
                continue
            self.steps += 1
            for out in outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)

    def _step(self) -> list[RequestOutput]:
        with self._lock:
            commands, self._commands = self._commands, []
        outputs: list[RequestOutput] = []
        for kind, arg in commands:
            if kind == "add":
                assert isinstance(arg, Request)
                try:
                    self.core.enqueue(arg)
                except Exception as exc:
                    self._fail(arg.request_id, exc)
            elif kind == "abort":
                out = self.core.abort(str(arg))
                if out is not None:
                    outputs.append(out)
        return outputs + self.core.step()

    def _fail(self, request_id: str, exc: Exception) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(queue.put_nowait, exc)

    def _abort_all(self) -> None:
        for rid in list(self.core.requests):
            self.core.abort(rid)


class RequestStream:
    """Async iterator over one request's outputs; closing it early aborts the request."""

    def __init__(
        self, engine: AsyncEngine, req: Request, queue: asyncio.Queue[RequestOutput | Exception]
    ):
        self.engine = engine
        self.request = req
        self._queue = queue
        self.finished = False
        self._closed = False

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
        if item.finished:
            self.finished = True
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
