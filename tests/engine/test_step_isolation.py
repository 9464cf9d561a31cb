"""A step that raises fails only the request that made it fail (issue 15, item 1 at the
engine's depth): the real default model, a fault injected through the engine's test hook
(``TRUFFULA_FAULT_INJECT`` / ``FaultInjector``: a request with the marked seed gets a top_k of
2^63 once it has some tokens, which overflows in the runner's sampling tensors, exactly what
item 1 did before validation), and every other request answering exactly what it answers in a
run without the bad one: in process (synchronous and asynchronous scheduling) and over HTTP.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from conftest import RAW_PROMPTS
from serverproc import ROOT, ServerProcess

from truffula.engine.isolation import FAULT_ENV, FaultInjector
from truffula.engine.llm import LLM, Completion
from truffula.sampling.params import SamplingParams

pytestmark = pytest.mark.slow

SEED = 4242
"""The marker: requests with this seed fail their steps (when the hook is on)."""
AFTER = 3

GOOD = [
    SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, return_k_alternatives=3),
    SamplingParams(max_new_tokens=14, temperature=0, ignore_eos=True),
    SamplingParams(max_new_tokens=8, temperature=0.8, seed=7, ignore_eos=True, details=True),
    SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.3, ignore_eos=True),
    SamplingParams(max_new_tokens=6, temperature=0, decoder_input_details=True),
]
BAD = SamplingParams(max_new_tokens=12, temperature=0, seed=SEED, ignore_eos=True)


def same(a: Completion, b: Completion) -> None:
    assert a.token_ids == b.token_ids
    assert a.text == b.text and a.finish_reason == b.finish_reason
    for x, y in zip(a.tokens, b.tokens, strict=True):
        assert (x.logprob is None) == (y.logprob is None)
        if y.logprob is not None:
            assert abs(x.logprob - y.logprob) < 1e-4
    if b.prompt_tokens is not None:
        assert a.prompt_tokens is not None and len(a.prompt_tokens) == len(b.prompt_tokens)


def run_with_culprits(llm: LLM, bad_at: list[int]) -> list[Completion]:
    """GOOD on RAW_PROMPTS with BAD requests inserted at ``bad_at``; the hook on meanwhile."""
    prompts: list[str] = list(RAW_PROMPTS)
    params = list(GOOD)
    for i in bad_at:
        prompts.insert(i, "The culprit says")
        params.insert(i, BAD)
    engine = llm.engine
    engine.isolation.faults = FaultInjector(SEED, AFTER)
    try:
        return llm.generate(prompts, params)
    finally:
        engine.isolation.faults = None


def check_engine_clean(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.requests and not engine.has_work() and engine.inflight is None
    assert engine.pool.num_used == 0 and not engine.isolation.active
    assert engine.scheduler.num_requests == 0


@pytest.mark.parametrize("bad_at", [[2], [0, 4]], ids=["one-culprit", "two-culprits"])
def test_a_failing_request_fails_alone(llm, bad_at) -> None:  # type: ignore[no-untyped-def]
    want = llm.generate(RAW_PROMPTS, GOOD)
    got = run_with_culprits(llm, bad_at)
    bad = [got.pop(i - k) for k, i in enumerate(bad_at)]
    for a, b in zip(got, want, strict=True):
        same(a, b)
    for c in bad:
        # it failed at its first step with AFTER tokens (the batch was larger: found by halving)
        assert c.finish_reason == "error" and len(c.token_ids) == AFTER
    check_engine_clean(llm)
    assert llm.generate(RAW_PROMPTS, GOOD)[0].token_ids == want[0].token_ids


def test_with_asynchronous_scheduling(model_dir, llm) -> None:  # type: ignore[no-untyped-def]
    """A step in flight when the next one fails: it is read and delivered, its placeholders
    resolved; the failed step's requests run again from where they were."""
    async_llm = LLM(str(model_dir), progress=False, async_scheduling="on")
    assert async_llm.engine.overlap
    want = llm.generate(RAW_PROMPTS, GOOD)
    got = run_with_culprits(async_llm, [1])
    bad = got.pop(1)
    for a, b in zip(got, want, strict=True):
        same(a, b)
    assert bad.finish_reason == "error" and AFTER <= len(bad.token_ids) <= AFTER + 1
    check_engine_clean(async_llm)
    engine = async_llm.engine
    engine.isolation.faults = FaultInjector(SEED, 0)  # fails in its first step, alone
    try:
        (alone,) = async_llm.generate(["Alone"], BAD)
    finally:
        engine.isolation.faults = None
    assert alone.finish_reason == "error" and not alone.token_ids
    check_engine_clean(async_llm)


# ---------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def faulty(model_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    log = tmp_path_factory.mktemp("faulty") / "server.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, f"{SEED}:{AFTER}")
        proc = ServerProcess(
            "--adapter-root",
            str(ROOT / "examples" / "adapters"),
            "--max-active-adapters",
            "2",
            log=log,
        )
    yield proc
    proc.stop()


def victims() -> list[tuple[str, dict[str, Any]]]:
    common = {"max_new_tokens": 12, "ignore_eos_token": True, "details": True}
    return [
        ("/generate", {"inputs": "The sky is", "parameters": common}),
        ("/generate", {"inputs": "Bonjour", "parameters": {**common, "adapter_id": "french"}}),
        (
            "/generate_stream",
            {"inputs": "def add(a, b):", "parameters": {**common, "return_k_alternatives": 2}},
        ),
        (
            "/v1/completions",
            {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stream": True},
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 8,
                "temperature": 0,
                "model": "caps",
            },
        ),
    ]


def culprits() -> list[tuple[str, dict[str, Any]]]:
    # the LoRAX routes keep a seed only when sampling
    params = {"max_new_tokens": 12, "do_sample": True, "seed": SEED, "details": True}
    return [
        ("/generate", {"inputs": "The culprit says", "parameters": params}),
        ("/generate_stream", {"inputs": "Another culprit", "parameters": params}),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Culprit"}],
                "max_tokens": 12,
                "temperature": 0,
                "seed": SEED,
                "stream": True,
            },
        ),
    ]


def answer(route: str, status: int, text: str) -> Any:
    """What a client sees: the token texts (or an error) of a plain or streamed answer."""
    if not text.lstrip().startswith("data:"):
        data = json.loads(text)
        if status != 200:
            return ("error", status, data)
        if route.startswith("/v1/"):
            return data["choices"][0].get("text") or data["choices"][0]["message"]["content"]
        return [t["text"] for t in data["details"]["tokens"]]
    events = [e[5:].strip() for e in text.splitlines() if e.startswith("data:")]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    errors = [c for c in chunks if "error" in c]
    if errors:
        return ("error", status, errors[-1], len(chunks) - 1)
    if route.startswith("/v1/"):
        return "".join(c["choices"][0].get("text") or "" for c in chunks if c["choices"])
    return [c["token"]["text"] for c in chunks]


async def send(url: str, jobs: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(route: str, body: dict[str, Any]) -> Any:
            async with client.stream("POST", route, json=body) as r:
                return answer(route, r.status_code, (await r.aread()).decode())

        return await asyncio.gather(*(one(*j) for j in jobs))


def test_over_http_the_culprit_fails_and_the_others_are_untouched(faulty) -> None:  # type: ignore[no-untyped-def]
    want = [asyncio.run(send(faulty.url, [job]))[0] for job in victims()]  # alone, one by one
    assert all(not isinstance(w, tuple) for w in want), want
    jobs = victims() + culprits()
    got = asyncio.run(send(faulty.url, jobs))
    assert got[: len(want)] == want
    plain, stream, chat = got[len(want) :]
    assert plain[:2] == ("error", 424), plain
    assert "internal engine error" in plain[2]["error"], plain
    assert plain[2]["error_type"] == "generation"
    assert stream[:2] == ("error", 200) and stream[3] == AFTER, stream  # tokens, then the error
    assert "internal engine error" in stream[2]["error"], stream
    assert chat[:2] == ("error", 200) and "internal engine error" in json.dumps(chat[2]), chat
    m = httpx.get(faulty.url + "/metrics", headers={"accept": "application/json"}).json()
    assert (m["truffula_kv_blocks_used"], m["truffula_running_batch_size"]) == (0, 0)
    health = httpx.get(faulty.url + "/health")
    assert health.status_code == 200
    log = faulty.log.read_text()
    assert "isolating the culprit" in log and "failed its step alone" in log
