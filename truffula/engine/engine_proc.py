"""The engine loop behind a ZeroMQ ROUTER socket: in its own process for the server, or in a
thread for in-process use (``AsyncEngine(core)``).

Clients (one per API process) connect DEALER sockets and send ``add`` (an ``EngineRequest``),
``abort`` and ``call`` messages; the loop drains them, runs one step, and sends every client the
``EngineOutput``s of its own requests. Utility calls that read from disk (adapter loads and
merges) run in a worker thread, so the step loop never waits for them. A step that fails
fails only the request that made it fail (``truffula.engine.isolation``); the others go on.
A device error that poisons the CUDA context ends the loop, and with it the engine process:
the API processes notice and answer 503. An error that cannot be pinned on a request (the
scheduler's own) fails the requests in flight, and the loop goes on.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import zmq

from truffula import heap, stalls
from truffula.config import EngineConfig
from truffula.engine import messages as m
from truffula.engine.core import EngineCore
from truffula.engine.isolation import device_lost
from truffula.engine.stats import EngineMetrics
from truffula.errors import AdapterError, EngineOverloadedError, RequestValidationError
from truffula.logs import configure_engine_logging

log = logging.getLogger("truffula.engine")


def error_status(exc: BaseException) -> int:
    if isinstance(exc, EngineOverloadedError):
        return 429
    if isinstance(exc, AdapterError):
        return exc.status
    if isinstance(exc, RequestValidationError):
        return 422
    return 500


def model_info(core: EngineCore) -> m.ModelInfo:
    sizing = getattr(core, "sizing", None)
    return m.ModelInfo(
        folder=str(core.model_folder),
        architecture=core.architecture,
        serving_path=core.serving_path,
        dtype=str(core.dtype).removeprefix("torch."),
        device=core.device.type,
        max_len=core.max_len,
        vocab_size=core.vocab_size,
        kv_blocks=core.pool.capacity,
        kv_block_size=core.config.cache.block_size,
        config=msgspec.to_builtins(core.config),
        sizing=msgspec.to_builtins(asdict(sizing)) if sizing is not None else {},
    )


class EngineLoop:
    def __init__(self, core: EngineCore, sock: zmq.Socket) -> None:
        self.core = core
        self.sock = sock
        self.metrics = EngineMetrics(core)
        self.owner: dict[str, bytes] = {}
        """Request id -> identity of the client that sent it."""
        self.calls: list[tuple[bytes, int, Future[Any]]] = []
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="truffula-adapters")
        self.stopping = False
        self.stop_requested = False
        """Set by a signal handler; the loop shuts down at its next turn."""
        self.parent = os.getppid()
        self.handlers: dict[str, Callable[..., Any]] = {
            "info": lambda: model_info(core),
            "adapters": self._adapters,
            "unload_adapter": core.adapters.unload,
            "metrics": self.metrics.render,
            "stats": self.metrics.snapshot,
            "shutdown": self._shutdown,
        }
        self.slow: dict[str, Callable[..., Any]] = {
            "load_adapter": lambda adapter_id, source: core.adapters.load(adapter_id, source),
            "load_merged": self._load_merged,
        }

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        clock = stalls.clock("engine")
        try:
            while not (self.stopping and not self.core.has_work()):
                if self.stop_requested and not self.stopping:
                    self._shutdown()
                busy = self.core.has_work()
                if busy:
                    clock.start()
                timeout = 0 if busy else (2 if self.calls else 250)
                if poller.poll(timeout):
                    self._drain()
                self._reply_done()
                if self.core.has_work():
                    clock.mark("inputs")
                    outputs = self._step()
                    clock.mark("step")
                    self._send_outputs(outputs)
                    clock.mark("outputs")
                    clock.end(
                        f"{len(outputs)} outputs, {self.core.scheduler.num_requests} requests"
                    )
                elif not busy and os.getppid() != self.parent:
                    log.error("the process that started the engine is gone; stopping")
                    return
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _drain(self) -> None:
        while True:
            try:
                ident, kind, payload = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if kind == m.ADD:
                self._add(ident, m.request_decoder.decode(payload))
            elif kind == m.ABORT:
                self._send_outputs(
                    [
                        out
                        for a in m.aborts_decoder.decode(payload)
                        if (out := self.core.abort(a.request_id, a.reason)) is not None
                    ]
                )
            elif kind == m.CALL:
                self._call(ident, m.call_decoder.decode(payload))

    def _add(self, ident: bytes, req: m.EngineRequest) -> None:
        try:
            self.core.add(req)
        except Exception as exc:
            status = error_status(exc)
            if status == 500:
                log.exception("request %s could not be queued", req.request_id)
            out = m.EngineOutput(req.request_id, error=str(exc), status=status)
            self.sock.send_multipart([ident, m.OUTPUTS, m.encoder.encode([out])])
            return
        self.owner[req.request_id] = ident

    def _step(self) -> list[m.EngineOutput]:
        try:
            return self.core.step_outputs()
        except Exception as exc:  # not pinned on one request: fail them all and go on
            if device_lost(exc):
                log.critical("the device cannot be used any more: the engine process stops")
                raise
            log.exception("engine step failed outside a launch or a read; failing every request")
            self.core.inflight = None
            self.core.isolation.groups.clear()
            failed = []
            for rid in list(self.core.requests):
                self.core.abort(rid)
                failed.append(m.EngineOutput(rid, error=f"Request failed during generation: {exc}"))
            return failed

    def _send_outputs(self, outputs: list[m.EngineOutput]) -> None:
        by_client: dict[bytes, list[m.EngineOutput]] = {}
        for out in outputs:
            ident = self.owner.get(out.request_id)
            if out.finish_reason is not None or out.error is not None:
                self.owner.pop(out.request_id, None)
            if ident is not None:
                by_client.setdefault(ident, []).append(out)
        for ident, outs in by_client.items():
            self.sock.send_multipart([ident, m.OUTPUTS, m.encoder.encode(outs)])

    # ---------------------------------------------------------------- utility calls
    def _call(self, ident: bytes, call: m.Call) -> None:
        if call.method in self.slow:
            self.calls.append(
                (ident, call.call_id, self.pool.submit(self.slow[call.method], *call.args))
            )
            return
        fut: Future[Any] = Future()
        try:
            fut.set_result(self.handlers[call.method](*call.args))
        except Exception as exc:
            fut.set_exception(exc)
        self.calls.append((ident, call.call_id, fut))
        self._reply_done()

    def _reply_done(self) -> None:
        pending = []
        for ident, call_id, fut in self.calls:
            if not fut.done():
                pending.append((ident, call_id, fut))
                continue
            exc = fut.exception()
            if exc is None:
                reply = m.Reply(call_id, result=fut.result())
            else:
                if error_status(exc) == 500:
                    log.error("engine call failed: %r", exc)
                reply = m.Reply(
                    call_id,
                    error=str(exc),
                    error_type=type(exc).__name__,
                    status=error_status(exc),
                    field=getattr(exc, "field", None),
                )
            self.sock.send_multipart([ident, m.REPLY, m.encoder.encode(reply)])
        self.calls = pending

    def _adapters(self) -> dict[str, Any]:
        store = self.core.adapters
        listing = store.listing()
        info = {
            "max_active_adapters": store.num_slots,
            "max_lora_rank": store.max_rank,
            "active_adapters": store.num_active,
            "loaded_adapters": len(listing),
            "adapter_root": str(store.root),
            "adapter_sources": ["local", "hub"],
        }
        return {"adapters": listing, "info": info}

    def _load_merged(self, spec: dict[str, Any], source: str | None) -> str:
        from truffula.adapters.merge import MergeSpec

        max_ids = self.core.config.lora.max_merged_adapters
        return self.core.adapters.load_merged(MergeSpec.parse(**spec, max_ids=max_ids), source)

    def _shutdown(self) -> bool:
        """Abort what is left and leave the loop once the last outputs are out."""
        for rid in list(self.core.requests):
            self.core.abort(rid)
        self.stopping = True
        return True


def run_engine_process(config: EngineConfig, address: str, conn: Connection) -> None:
    """Entry point of the engine process: load, bind, say ready (or why not), loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process decides when to stop
    configure_engine_logging()
    try:
        core = EngineCore(config)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(address)
        loop = EngineLoop(core, sock)
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    signal.signal(signal.SIGTERM, lambda *_: setattr(loop, "stop_requested", True))
    conn.send(("ready", m.encoder.encode(model_info(core))))
    conn.close()
    heap.settle()
    loop.run()
    sock.close()
    ctx.term()


def start_thread(core: EngineCore, ctx: zmq.Context, address: str) -> threading.Thread:
    """Run the loop over ``core`` in a daemon thread (in-process use); returns once bound.
    ``ctx`` may be an asyncio context: the loop uses a blocking socket of the same context."""
    bound = threading.Event()

    def main() -> None:
        sock: zmq.Socket[bytes] = zmq.Context.shadow(ctx.underlying).socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(address)
        loop = EngineLoop(core, sock)
        bound.set()
        loop.run()
        sock.close()

    thread = threading.Thread(target=main, name="truffula-engine", daemon=True)
    thread.start()
    bound.wait()
    return thread
