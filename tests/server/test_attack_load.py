"""The attack suite, load part (issue 15): one server of its own with a short context and a KV
cache far too small for what is asked of it, then a burst of concurrent mixed requests, storms
of clients that go away, load/unload loops against requests, and schemathesis over the OpenAPI
schema.

CI runs a bounded version (300 concurrent requests, 5 storms of 15, a few schemathesis examples
per operation with generation kept short: tests/schemathesis_hooks.py). ``TRUFFULA_ATTACK=full``
runs the issue's targets (1,000 concurrent requests, storms of 100, schemathesis with its
coverage phase and generation as long as the schema allows):

    TRUFFULA_ATTACK=full .venv/bin/pytest -q tests/server/test_attack_load.py
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serverproc import ROOT, ServerProcess

from truffula.sampling.params import SamplingParams

pytestmark = pytest.mark.slow

FULL = os.environ.get("TRUFFULA_ATTACK") == "full"
CONCURRENT = 1000 if FULL else 300
STORMS = 5
STORM_SIZE = 100 if FULL else 15
MAX_NEW = 8 if FULL else 4
"""Most new tokens a request of the burst asks for."""
EXHAUST_NEW = 20
MAX_QUEUED = 1024 if FULL else 192
"""CI: some of the 300 are refused (429), so both paths are exercised; full: none need be."""
ADAPTERS = ["french", "caps", "pirate"]
PATIENCE = 7200 if FULL else 600
"""Seconds a client of the burst waits for its answer: the target is none lost, not latency,
and 1,000 requests through a 256-token cache take tens of minutes on two shared CPU cores."""
MAX_LEN = 64
KV_BLOCKS, BLOCK = 64, 4
"""256 tokens: four sequences of the full length, where the burst asks for hundreds."""


@pytest.fixture(scope="module")
def attack(tmp_path_factory):  # type: ignore[no-untyped-def]
    log = tmp_path_factory.mktemp("attack") / "server.log"
    proc = ServerProcess(
        "--max-model-len",
        str(MAX_LEN),
        "--num-kv-blocks",
        str(KV_BLOCKS),
        "--block-size",
        str(BLOCK),
        "--max-concurrent-requests",
        str(MAX_QUEUED),
        "--max-num-seqs",
        "16",
        "--adapter-root",
        str(ROOT / "examples" / "adapters"),
        "--max-active-adapters",
        "2",
        "--max-k-alternatives",
        "5",
        "--max-request-bytes",
        "64KiB",
        log=log,
    )
    yield proc
    proc.stop()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def metrics(server: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return httpx.get(  # type: ignore[no-any-return]
        server.url + "/metrics", headers={"accept": "application/json"}, timeout=60
    ).json()


def wait_idle(server: Any, timeout: float = 120) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while True:
        m = metrics(server)
        gauges = (
            m["truffula_kv_blocks_used"],
            m["truffula_running_batch_size"],
            m["truffula_queue_depth"],
        )
        if gauges == (0, 0, 0) or time.time() > deadline:
            return m
        time.sleep(0.1)


def statuses(server: Any) -> Counter[str]:  # type: ignore[no-untyped-def]
    """HTTP statuses counted by the API process so far: ``{"200": n, "429": n, ...}``."""
    text = httpx.get(server.url + "/metrics", timeout=60).text
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "truffula_requests_total":
                out[sample.labels["status"]] += int(sample.value)
    return out


# ---------------------------------------------------------------------- the mixed workload


def mixed_request(i: int, rng: random.Random) -> tuple[str, dict[str, Any], bool, int]:
    """(route, body, streamed, max new tokens) of request ``i``: adapters, k, streams."""
    n = rng.randint(1, MAX_NEW)
    adapter = rng.choice([None, *ADAPTERS])
    k = rng.choice([0, 0, 1, 3, 5])
    prompt = rng.choice(["The sky is", "Once upon a time", "def add(a, b):", "Bonjour, je"])
    kind = i % 6
    if kind in (0, 1, 2):
        params: dict[str, Any] = {"max_new_tokens": n, "adapter_id": adapter, "details": True}
        if k:
            params["return_k_alternatives"] = k
        if rng.random() < 0.3:
            params.update(do_sample=True, seed=rng.randrange(1000), temperature=0.8)
        stream = kind == 1
        route = "/generate_stream" if stream else ("/generate" if kind == 0 else "/")
        body: dict[str, Any] = {"inputs": prompt, "parameters": params}
        if route == "/":
            body["stream"] = False
        return route, body, stream, n
    stream = kind == 4 or (kind == 5 and rng.random() < 0.5)
    common = {"model": adapter, "max_tokens": n, "stream": stream, "temperature": 0}
    if kind in (3, 4):
        return "/v1/completions", {**common, "prompt": prompt, "logprobs": k or None}, stream, n
    chat = {"messages": [{"role": "user", "content": prompt}], "logprobs": k > 0}
    if k:
        chat["top_logprobs"] = k
    return "/v1/chat/completions", {**common, **chat}, stream, n


def check_complete(
    route: str, body: dict[str, Any], stream: bool, n: int, r: Any, text: str
) -> None:  # type: ignore[no-untyped-def]
    """A 200 answer that is whole: every token asked for (or a stop), finish reason, [DONE]."""
    if not stream:
        data = json.loads(text)
        if route.startswith("/v1/"):
            (choice,) = data["choices"]
            assert choice["finish_reason"] in ("stop", "length"), data
            got = data["usage"]["completion_tokens"]
            assert got == n or choice["finish_reason"] == "stop", data
            return
        data = data[0] if isinstance(data, list) else data
        d = data["details"]
        assert len(d["tokens"]) == d["generated_tokens"], d
        assert d["generated_tokens"] == n or d["finish_reason"] != "length", d
        k = body["parameters"].get("return_k_alternatives")
        if k:
            assert all(len(t["alternative_tokens"]) >= 1 for t in d["tokens"]), d
        return
    events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    assert events, text[:300]
    if route.startswith("/v1/"):
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), chunks[-1]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] in ("stop", "length"), chunks[-1]
        return
    evs = [json.loads(e) for e in events]
    assert not any("error" in e for e in evs), evs[-1]
    assert evs[-1]["generated_text"] is not None, evs[-1]
    assert (
        len(evs) == n
        or evs[-1]["details"] is None
        or evs[-1]["details"]["finish_reason"] != "length"
    )


async def run_burst(url: str, count: int, seed: int) -> tuple[Counter[Any], list[str]]:
    """``count`` mixed requests at once; returns (outcomes, problems)."""
    rng = random.Random(seed)
    plan = [mixed_request(i, rng) for i in range(count)]
    outcomes: Counter[Any] = Counter()
    problems: list[str] = []
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=PATIENCE, limits=limits) as client:

        async def one(route: str, body: dict[str, Any], stream: bool, n: int) -> None:
            try:
                async with client.stream("POST", route, json=body) as r:
                    text = (await r.aread()).decode()
                if r.status_code == 200:
                    check_complete(route, body, stream, n, r, text)
                elif r.status_code != 429:
                    problems.append(f"{route} {r.status_code} {text[:300]}")
                outcomes[r.status_code] += 1
            except Exception as exc:  # a lost request: no answer, or a partial one
                problems.append(f"{route} {type(exc).__name__}: {exc!s:.300}")
                outcomes["lost"] += 1

        await asyncio.gather(*(one(*p) for p in plan))
    return outcomes, problems


# ---------------------------------------------------------------------- tests


def test_kv_exhaustion_gives_the_same_greedy_answers(attack, llm) -> None:  # type: ignore[no-untyped-def]
    """Requests preempted and recomputed over and over in a cache that holds about half of
    them answer exactly what an engine with room to spare answers (base model: the in-process
    engine; adapters: the same server, one request at a time)."""
    prompts = ["The capital of France is", "def add(a, b):"]
    adapters = [None, *ADAPTERS] if FULL else [None, "french", "caps"]  # caps: both slots
    jobs = [(p, a) for p in prompts for a in adapters]

    def body(prompt: str, adapter: str | None) -> dict[str, Any]:
        return {
            "inputs": prompt,
            "parameters": {
                "max_new_tokens": EXHAUST_NEW,
                "ignore_eos_token": True,
                "return_k_alternatives": 3,
                "adapter_id": adapter,
            },
        }

    reference: dict[tuple[str, str | None], list[int]] = {}
    copies = 3 if FULL else 2
    for prompt, adapter in jobs:
        if adapter is None:
            params = SamplingParams(max_new_tokens=EXHAUST_NEW, temperature=0, ignore_eos=True)
            (out,) = llm.generate([prompt], params)
            reference[prompt, adapter] = out.token_ids
        else:
            r = httpx.post(attack.url + "/generate", json=body(prompt, adapter), timeout=300)
            reference[prompt, adapter] = [t["id"] for t in r.json()["details"]["tokens"]]

    async def burst() -> tuple[list[dict[str, Any]], int]:
        peak = 0
        async with httpx.AsyncClient(base_url=attack.url, timeout=PATIENCE) as client:
            tasks = [
                asyncio.create_task(client.post("/generate", json=body(p, a)))
                for _ in range(copies)
                for p, a in jobs
            ]
            while not all(t.done() for t in tasks):
                m = (await client.get("/metrics", headers={"accept": "application/json"})).json()
                peak = max(peak, m["truffula_kv_blocks_used"])
                await asyncio.sleep(0.05)
            return [t.result().json() for t in tasks], peak

    answers, peak = asyncio.run(burst())
    assert peak >= KV_BLOCKS - 4, f"the cache never filled up (peak {peak} of {KV_BLOCKS} blocks)"
    for (prompt, adapter), got in zip(
        [j for _ in range(copies) for j in jobs], answers, strict=True
    ):
        ids = [t["id"] for t in got["details"]["tokens"]]
        assert ids == reference[prompt, adapter], (prompt, adapter)
    assert wait_idle(attack)["truffula_kv_blocks_used"] == 0


def test_concurrent_mixed_requests_are_complete_or_429(attack) -> None:  # type: ignore[no-untyped-def]
    before = statuses(attack)
    start = time.monotonic()
    outcomes, problems = asyncio.run(run_burst(attack.url, CONCURRENT, seed=15))
    elapsed = time.monotonic() - start
    print(f"{CONCURRENT} concurrent mixed requests in {elapsed:.1f} s: {dict(outcomes)}")
    assert not problems, problems[:10]
    assert outcomes["lost"] == 0 and sum(outcomes.values()) == CONCURRENT
    assert set(outcomes) <= {200, 429} and outcomes[200] >= min(CONCURRENT, MAX_QUEUED) // 2
    m = wait_idle(attack)
    assert (m["truffula_kv_blocks_used"], m["truffula_running_batch_size"]) == (0, 0)
    after = statuses(attack) - before
    assert not [s for s in after if s.startswith("5")], after


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def engine_pid(api_pid: int) -> int:
    """The engine process: the API process's child started by multiprocessing spawn."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == api_pid and b"spawn_main" in cmd:
            return int(entry.name)
    raise AssertionError("no engine process")


async def storm(url: str, size: int, seed: int) -> None:
    """``size`` clients that go away: streams closed after 0-3 events, plain requests given up
    after a fraction of a second, on every generating route."""
    rng = random.Random(seed)
    plan = []
    for i in range(size):
        route, body, stream, _ = mixed_request(i, rng)
        if "parameters" in body:
            body["parameters"].update(max_new_tokens=20, ignore_eos_token=True)
        else:
            body.update(max_tokens=20, ignore_eos=True)
        # streams go after 0-3 events; plain requests are given up after a moment
        plan.append((route, body, rng.randint(0, 3) if stream else -1, rng.uniform(0.2, 1.5)))

    async def one(route: str, body: dict[str, Any], events: int, patience: float) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=patience if events < 0 else 120) as c:
            try:
                async with c.stream("POST", route, json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            events -= 1
                            if events < 0:
                                break
            except httpx.TimeoutException:
                pass

    await asyncio.gather(*(one(*p) for p in plan))


def test_disconnect_storms_return_every_gauge_to_zero_and_rss_stays_flat(attack) -> None:  # type: ignore[no-untyped-def]
    api = attack.proc.pid
    engine = engine_pid(api)
    before = statuses(attack)
    asyncio.run(storm(attack.url, STORM_SIZE, seed=0))  # warm-up: allocations settle
    m = wait_idle(attack)
    base = {"api": rss_kib(api), "engine": rss_kib(engine)}
    rounds = []
    for i in range(STORMS):
        asyncio.run(storm(attack.url, STORM_SIZE, seed=i + 1))
        m = wait_idle(attack)
        gauges = (
            m["truffula_kv_blocks_used"],
            m["truffula_running_batch_size"],
            m["truffula_queue_depth"],
        )
        assert gauges == (0, 0, 0), (i, gauges)
        rounds.append({"api": rss_kib(api), "engine": rss_kib(engine)})
    print(f"RSS KiB after warm-up {base}, after each storm {rounds}")
    for name in ("api", "engine"):
        assert rounds[-1][name] <= base[name] * 1.05, (name, base, rounds)
    after = statuses(attack) - before
    assert after["499"] > 0, after  # the clients that went away are counted as such
    assert not [s for s in after if s.startswith("5")], after
    # and the server still answers correctly
    r = httpx.post(
        attack.url + "/generate",
        json={"inputs": "The sky is", "parameters": {"max_new_tokens": 3}},
        timeout=120,
    )
    assert r.status_code == 200 and r.json()["generated_text"]


def test_load_unload_loops_never_fail_requests(attack) -> None:  # type: ignore[no-untyped-def]
    """Issue item 9: with load/unload looping, requests for adapters present on disk got 404."""
    spellings = ["french", "./french", "caps/.", "pirate", "caps"]

    async def run() -> tuple[Counter[Any], list[str], Counter[Any]]:
        stop = asyncio.Event()
        churned: Counter[Any] = Counter()
        outcomes: Counter[Any] = Counter()
        problems: list[str] = []
        async with httpx.AsyncClient(base_url=attack.url, timeout=300) as client:

            async def churn(j: int) -> None:
                while not stop.is_set():
                    for a in ADAPTERS[j:] + ADAPTERS[:j]:
                        r = await client.post("/adapters/load", json={"adapter_id": a})
                        churned["load", r.status_code] += 1
                        r = await client.post("/adapters/unload", json={"adapter_id": a})
                        churned["unload", r.status_code] += 1

            async def worker(w: int) -> None:
                for i in range(6 if not FULL else 50):
                    a = spellings[(w + i) % len(spellings)]
                    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "adapter_id": a}}
                    r = await client.post("/generate", json=body)
                    outcomes[r.status_code] += 1
                    if r.status_code != 200:
                        problems.append(f"{a}: {r.status_code} {r.text[:200]}")

            churners = [asyncio.create_task(churn(j)) for j in range(3)]
            await asyncio.gather(*(worker(w) for w in range(6)))
            stop.set()
            await asyncio.gather(*churners)
        return outcomes, problems, churned

    outcomes, problems, churned = asyncio.run(run())
    print(f"requests {dict(outcomes)}, load/unload {dict(churned)}")
    assert not problems, problems[:10]
    assert churned["unload", 200] >= 5  # the adapters really did come and go
    listing = httpx.get(attack.url + "/adapters", timeout=60).json()
    assert all(a["requests"] == 0 for a in listing["adapters"]), listing


def test_schemathesis_finds_no_server_error_and_no_undocumented_status(attack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every documented operation, schema-valid and schema-violating data: no 5xx, every status
    and content type documented, error bodies as documented, 405 with Allow, JSON everywhere.
    `positive_data_acceptance` is left out: a request can be valid by the schema and still out
    of range for this server (a k above --max-k-alternatives, a prompt beyond the context)."""
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        attack.url + "/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-response-time",
        "300",
        "--request-timeout",
        "300",
        "--phases",
        "examples,coverage,fuzzing" if FULL else "examples,fuzzing",
        "--max-examples",
        "60" if FULL else "5",
        "--continue-on-failure",
        "--workers",
        "2",
        "--seed",
        "15",
        "--suppress-health-check",
        "all",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    env = dict(os.environ)
    if not FULL:
        env["SCHEMATHESIS_HOOKS"] = str(Path(__file__).parents[1] / "schemathesis_hooks.py")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=3600 if FULL else 480, env=env
    )
    reports = list(tmp_path.glob("junit*.xml"))
    assert reports, proc.stdout[-3000:] + proc.stderr[-3000:]
    (report,) = reports
    suite = ET.parse(report).getroot()
    cases = suite.findall(".//testcase")
    failures = [
        (case.get("name"), (f.get("message") or "") + " " + (f.text or "")[:600])
        for case in cases
        for f in [*case.findall("failure"), *case.findall("error")]
    ]
    print(proc.stdout[-3000:])
    assert len(cases) >= 15, proc.stdout[-3000:]
    assert not failures, "\n\n".join(f"{name}: {text}" for name, text in failures)[:8000]
    after = statuses(attack)
    assert not [s for s in after if s.startswith("5")], after
