"""Finding where a stream stalls: ``TRUFFULA_STALL_LOG=<ms>`` in a server's environment logs
every engine turn (inputs, step, outputs), every delivery of a step's outputs in an API process
and every event-loop delay of an API process that takes at least that long. Each line names its
process and its parts, so a gap a client sees can be placed: the engine's step, the engine's
sending, the API process's formatting, or its event loop busy elsewhere. Off (and free) unless
set."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator

from truffula.envs import TRUFFULA_STALL_LOG

log = logging.getLogger("truffula.stalls")


def threshold_s() -> float | None:
    raw = os.environ.get(TRUFFULA_STALL_LOG)
    return float(raw) / 1e3 if raw else None


class TurnClock:
    """Times the parts of one turn of a loop; logs the turn when it took ``threshold_s`` or
    more."""

    def __init__(self, what: str, threshold: float, gaps: bool = False) -> None:
        self.what = what
        self.threshold = threshold
        self.gaps = gaps
        """Also log when a turn starts ``threshold`` or more after the last one started."""
        self.parts: list[tuple[str, float]] = []
        self.t0 = self.last = self.started = 0.0

    def start(self) -> None:
        self.parts.clear()
        self.t0 = self.last = now = time.perf_counter()
        if self.gaps and self.started and now - self.started >= self.threshold:
            log.warning("%s came %.1f ms after the last", self.what, (now - self.started) * 1e3)
        self.started = now

    def mark(self, part: str) -> None:
        now = time.perf_counter()
        self.parts.append((part, now - self.last))
        self.last = now

    def end(self, detail: str = "") -> None:
        took = time.perf_counter() - self.t0
        if self.t0 and took >= self.threshold:
            parts = ", ".join(f"{p} {dt * 1e3:.1f} ms" for p, dt in self.parts)
            log.warning(
                "%s turn took %.1f ms in %s: %s%s",
                self.what,
                took * 1e3,
                multiprocessing.current_process().name,
                parts,
                f" ({detail})" if detail else "",
            )
        self.t0 = 0.0


class _Off(TurnClock):
    """The clock while ``TRUFFULA_STALL_LOG`` is unset: does nothing."""

    def start(self) -> None:
        pass

    def mark(self, part: str) -> None:
        pass

    def end(self, detail: str = "") -> None:
        pass


def clock(what: str, gaps: bool = False) -> TurnClock:
    """A ``TurnClock`` when ``TRUFFULA_STALL_LOG`` is set, else one that does nothing."""
    t = threshold_s()
    return TurnClock(what, t, gaps) if t is not None else _Off(what, 0.0)


def event_loop_watch(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[None]]:
    """The task of ``watch_event_loop`` when ``TRUFFULA_STALL_LOG`` is set (none otherwise)."""
    held = threshold_s()
    return [] if held is None else [loop.create_task(watch_event_loop(held))]


async def watch_event_loop(threshold: float, tick: float = 0.002) -> None:
    """Log every time this event loop came back to a ``tick``-second sleep ``threshold``
    seconds or more late: something held the loop (a handler, a collection, the GIL). A
    watchdog thread logs where the loop's thread was while it was held."""
    beat = [time.perf_counter()]
    stop = threading.Event()
    threading.Thread(
        target=_watchdog,
        args=(threading.get_ident(), beat, threshold, stop),
        name="truffula-stall-watchdog",
        daemon=True,
    ).start()
    try:
        while True:
            t = beat[0] = time.perf_counter()
            await asyncio.sleep(tick)
            late = time.perf_counter() - t - tick
            if late >= threshold:
                log.warning(
                    "event loop of %s was held %.1f ms",
                    multiprocessing.current_process().name,
                    late * 1e3,
                )
    finally:
        stop.set()


def _watchdog(loop_thread: int, beat: list[float], threshold: float, stop: threading.Event) -> None:
    """Sample the loop thread's stack once per held stretch, until ``stop``."""
    reported = 0.0
    while not stop.wait(threshold / 2):
        since = beat[0]
        if time.perf_counter() - since < threshold or since == reported:
            continue
        frame = sys._current_frames().get(loop_thread)
        if frame is None:
            return
        reported = since
        stack = traceback.extract_stack(frame)[-10:]
        where = " <- ".join(
            f"{f.name} ({'/'.join(f.filename.split('/')[-2:])}:{f.lineno})" for f in reversed(stack)
        )
        log.warning(
            "event loop held for %.1f ms so far, in %s", (time.perf_counter() - since) * 1e3, where
        )


def timed_events(events: AsyncIterator[bytes], what: str) -> AsyncIterator[bytes]:
    """``events`` unchanged, or, when ``TRUFFULA_STALL_LOG`` is set, with every pause of one
    stream logged: how long the stream waited for its next event (the engine's outputs and
    their delivery) and how long the send of the last one took (the socket and the client)."""
    held = threshold_s()
    return events if held is None else _timed_events(events, what, held)


async def _timed_events(
    events: AsyncIterator[bytes], what: str, threshold: float
) -> AsyncIterator[bytes]:
    sent = time.perf_counter()
    send_took = 0.0
    async for ev in events:
        ready = time.perf_counter()
        if ready - sent + send_took >= threshold:
            log.warning(
                "%s stream paused %.1f ms: %.1f ms waiting for its event, %.1f ms sending the last",
                what,
                (ready - sent + send_took) * 1e3,
                (ready - sent) * 1e3,
                send_took * 1e3,
            )
        yield ev
        sent = time.perf_counter()
        send_took = sent - ready
