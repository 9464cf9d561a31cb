"""Adapters coming and going under requests (issue 15, item 9), in one process: the engine
holds the adapter a request names however it is spelled and whatever was unloaded since the
request's load, so a request for an adapter on disk never gets 404."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from serverproc import ROOT

from truffula.errors import AdapterError
from truffula.sampling.params import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The weather today is"
ADAPTERS = ["french", "caps", "pirate"]
SPELLINGS = ["french", "./french", "french/.", "caps/./", "pirate", "./pirate/."]


@pytest.fixture(scope="module")
def engine_llm(model_dir):  # type: ignore[no-untyped-def]
    from truffula.engine.llm import LLM

    return LLM(
        str(model_dir),
        progress=False,
        adapter_root=str(ROOT / "examples" / "adapters"),
        max_active_adapters=2,
    )


def greedy(adapter: str) -> SamplingParams:
    return SamplingParams(max_new_tokens=3, temperature=0, adapter_id=adapter)


def test_any_spelling_reaches_the_engine_and_is_held_under_its_key(engine_llm) -> None:  # type: ignore[no-untyped-def]
    store = engine_llm.engine.adapters
    outs = {s: engine_llm.generate([PROMPT], greedy(s))[0].token_ids for s in SPELLINGS}
    assert outs["./french"] == outs["french"] == outs["french/."]
    assert outs["pirate"] == outs["./pirate/."]
    assert outs["french"] != outs["pirate"]
    assert sorted(store.loaded_ids()) == ["caps", "french", "pirate"]  # each stored once
    assert not store.users and not any(store.pins)  # and let go by every request


def test_unload_loops_never_fail_requests(engine_llm) -> None:  # type: ignore[no-untyped-def]
    """Loads and unloads race requests the way the server makes them race: unloads on the
    engine's loop between a request's load (the API's call) and its arrival (``add``), and
    requests that name an adapter without loading it first."""
    from truffula.engine.async_engine import AsyncEngine
    from truffula.server.metrics import Metrics
    from truffula.server.state import AdapterRef, ServerSettings, ServerState

    expected = {a: engine_llm.generate([PROMPT], greedy(a))[0].token_ids for a in ADAPTERS}

    async def run() -> tuple[list[tuple[str, Any]], Counter[str]]:
        engine = AsyncEngine(engine_llm.engine)
        state = ServerState(engine, ServerSettings(model_id="base"), Metrics())
        stop = asyncio.Event()
        churned: Counter[str] = Counter()

        async def churn(j: int) -> None:
            while not stop.is_set():
                for a in ADAPTERS[j:] + ADAPTERS[:j]:
                    try:
                        await engine.call("load_adapter", a, None)
                        await engine.call("unload_adapter", a)
                        churned["unloaded"] += 1
                    except AdapterError as exc:  # 409 while a request holds it, 404 if gone
                        churned[str(exc.status)] += 1

        async def one(i: int) -> tuple[str, Any]:
            spelling = SPELLINGS[i % len(SPELLINGS)]
            params = greedy(spelling)
            try:
                if i % 2:  # the server's path: load (canonical key), then submit
                    params = await state.resolve_adapter(AdapterRef(spelling), params)
                ids = [
                    t.id
                    for out in [o async for o in engine.generate(PROMPT, params)]
                    for t in out.tokens
                ]
                return spelling, ids
            except Exception as exc:
                return spelling, exc

        churners = [asyncio.create_task(churn(j)) for j in range(2)]
        results: list[tuple[str, Any]] = []
        for start in range(0, 36, 6):
            results += await asyncio.gather(*(one(i) for i in range(start, start + 6)))
        stop.set()
        await asyncio.gather(*churners)
        await engine.shutdown()
        return results, churned

    results, churned = asyncio.run(run())
    assert churned["unloaded"] >= 5, churned
    for spelling, got in results:
        key = spelling.strip("./").split("/")[0]
        assert got == expected[key], (spelling, got)
    store = engine_llm.engine.adapters
    assert not store.users and not any(store.pins)
