"""``TRUFFULA_STALL_LOG``: slow turns and a held event loop are logged with their parts; off, the
clock does nothing."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator

import pytest

from truffula import stalls
from truffula.envs import TRUFFULA_STALL_LOG


def test_a_slow_turn_is_logged_with_its_parts(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(TRUFFULA_STALL_LOG, "20")
    clock = stalls.clock("engine")
    with caplog.at_level(logging.WARNING, logger="truffula.stalls"):
        clock.start()
        clock.mark("inputs")
        clock.end("fast")  # well under 20 ms: nothing
        clock.start()
        time.sleep(0.03)
        clock.mark("step")
        clock.end("3 outputs")
    lines = [r.getMessage() for r in caplog.records]
    slow = [line for line in lines if line.endswith("(3 outputs)")]
    assert len(slow) == 1 and slow[0].startswith("engine turn took")
    step = re.search(r"step (\d+(?:\.\d+)?) ms", slow[0])
    assert step is not None and float(step.group(1)) >= 30  # a busy host may sleep longer
    for line in lines:  # besides it, the fast turn only if the host paused it past 20 ms
        if line not in slow:
            took = re.search(r"took (\d+(?:\.\d+)?) ms .*\(fast\)$", line)
            assert took is not None and float(took.group(1)) >= 20, line


def test_off_by_default(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(TRUFFULA_STALL_LOG, raising=False)
    clock = stalls.clock("engine")
    with caplog.at_level(logging.WARNING, logger="truffula.stalls"):
        clock.start()
        time.sleep(0.01)
        clock.end()
    assert not caplog.records
    loop = asyncio.new_event_loop()
    assert stalls.event_loop_watch(loop) == []
    loop.close()


def test_a_held_event_loop_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        task = asyncio.create_task(stalls.watch_event_loop(0.02))
        await asyncio.sleep(0.01)
        time.sleep(0.05)  # hold the loop
        await asyncio.sleep(0.01)
        task.cancel()

    with caplog.at_level(logging.WARNING, logger="truffula.stalls"):
        asyncio.run(main())
    assert any(
        "event loop of" in r.getMessage() and "held" in r.getMessage() for r in caplog.records
    )


def test_a_late_turn_and_a_paused_stream_are_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(TRUFFULA_STALL_LOG, "20")
    clock = stalls.clock("outputs", gaps=True)

    async def events() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"  # at once
        await asyncio.sleep(0.03)  # the engine is late
        yield b"c"

    async def consume() -> list[bytes]:
        got = []
        async for ev in stalls.timed_events(events(), "an SSE"):
            got.append(ev)
            if ev == b"c":
                continue
            if ev == b"a":
                await asyncio.sleep(0.03)  # the send of "a" is slow
        return got

    with caplog.at_level(logging.WARNING, logger="truffula.stalls"):
        for pause in (0.0, 0.03):
            time.sleep(pause)
            clock.start()
            clock.end()
        got = asyncio.run(consume())
    assert got == [b"a", b"b", b"c"]
    # a turn of no work is logged only when the host pauses this test itself (a busy machine)
    lines = [
        r.getMessage() for r in caplog.records if not r.getMessage().startswith("outputs turn")
    ]
    assert len(lines) == 3, lines
    assert lines[0].startswith("outputs came 3")
    first, second = (
        {k: float(v) for v, k in re.findall(r"([\d.]+) ms (\w+)", x)} for x in lines[1:]
    )
    assert first["waiting"] < 10 and first["sending"] >= 25  # "b" was ready; "a"'s send was slow
    assert second["waiting"] >= 25 and second["sending"] < 10  # "c" came late
