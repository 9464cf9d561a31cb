"""Two replicas of the default model on a local Ray instance, behind one endpoint: the answers
are one engine's, an adapter's requests stay on one replica, the API key and streams behave as
on one server, and ``--stop`` ends it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import RAW_PROMPTS
from serverproc import ROOT

from .clusterproc import ClusterProcess

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow

ADAPTERS = ROOT / "examples" / "adapters"
KEY = "cluster-key"
NEW_TOKENS = 8
REPLICA = "x-truffula-replica"


@pytest.fixture(scope="module")
def cluster(model_dir: Path):  # type: ignore[no-untyped-def]
    proc = ClusterProcess(
        "--replicas",
        "2",
        "--cpus-per-replica",
        "0.5",
        "--model",
        str(model_dir),
        "--adapter-root",
        str(ADAPTERS),
        "--max-model-len",
        "512",
        key=KEY,
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference(model_dir: Path):  # type: ignore[no-untyped-def]
    """Greedy answers of one in-process engine: {(prompt, adapter): text}."""
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams

    llm = LLM(str(model_dir), progress=False, adapter_root=str(ADAPTERS), max_model_len=512)
    out = {}
    for adapter in (None, "pirate", "caps"):
        key = None if adapter is None else llm.engine.adapters.load(adapter)
        params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, adapter_id=key)
        for prompt, completion in zip(RAW_PROMPTS, llm.generate(RAW_PROMPTS, params), strict=True):
            out[prompt, adapter] = completion.text
    return out


def generate(cluster: ClusterProcess, prompt: str, adapter: str | None) -> httpx.Response:
    params: dict = {"max_new_tokens": NEW_TOKENS}
    if adapter is not None:
        params["adapter_id"] = adapter
    return cluster.post("/generate", {"inputs": prompt, "parameters": params})


def test_an_adapters_requests_stay_on_one_replica(cluster) -> None:  # type: ignore[no-untyped-def]
    # first in this file: no replica holds an adapter yet
    for adapter in ("pirate", "caps", "french"):
        generate(cluster, "Hello", adapter)  # the first one picks the replica
        with ThreadPoolExecutor(2) as pool:
            responses = list(
                pool.map(lambda i, a=adapter: generate(cluster, RAW_PROMPTS[i % 5], a), range(10))
            )
        assert all(r.status_code == 200 for r in responses)
        counts = Counter(r.headers[REPLICA] for r in responses)
        share = counts.most_common(1)[0][1] / len(responses)
        assert share >= 0.8, (adapter, counts)


def test_answers_are_one_engines(cluster, reference) -> None:  # type: ignore[no-untyped-def]
    jobs = [(p, a) for p in RAW_PROMPTS for a in (None, "pirate", "caps")]
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda j: generate(cluster, *j), jobs))
    for (prompt, adapter), r in zip(jobs, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"] == reference[prompt, adapter], (prompt, adapter)
        assert r.headers[REPLICA]
    base = {r.headers[REPLICA] for (_, a), r in zip(jobs, responses, strict=True) if a is None}
    assert len(base) == 2, "base-model requests in parallel should reach both replicas"
    # OpenAI names the adapter in ``model``; the answer is the same one
    r = cluster.post(
        "/v1/completions",
        {"model": "caps", "prompt": RAW_PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == reference[RAW_PROMPTS[0], "caps"]


def test_streams_keys_and_errors_as_one_server(cluster) -> None:  # type: ignore[no-untyped-def]
    body = {"inputs": RAW_PROMPTS[0], "parameters": {"max_new_tokens": NEW_TOKENS}}
    with httpx.stream(
        "POST", cluster.url + "/generate_stream", json=body, headers=cluster.headers, timeout=120
    ) as r:
        assert r.status_code == 200 and r.headers[REPLICA]
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == NEW_TOKENS and events[-1]["generated_text"]
    assert all(e["generated_text"] is None for e in events[:-1])
    # a client that goes away mid-stream: its request is aborted in the replica's engine
    before = aborted(cluster)
    long = {"inputs": "one two", "parameters": {"max_new_tokens": 480, "ignore_eos": True}}
    with httpx.stream(
        "POST", cluster.url + "/generate_stream", json=long, headers=cluster.headers, timeout=120
    ) as r:
        assert r.status_code == 200
        replica = r.headers[REPLICA]
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # until the abort lands, that replica is the busier one and the router sends scrapes to the
    # other: poll until it answers again
    deadline = time.time() + 60
    after = aborted(cluster, replica)
    while after.get(replica) != before[replica] + 1 and time.time() < deadline:
        time.sleep(0.5)
        after = aborted(cluster, replica)
    assert after[replica] == before[replica] + 1
    assert httpx.post(cluster.url + "/generate", json=body, timeout=60).status_code == 401
    assert httpx.get(cluster.url + "/health", timeout=60).status_code == 200
    r = cluster.post("/generate", {"inputs": "x", "parameters": {"adapter_id": "no-such"}})
    assert r.status_code in (400, 404, 422) and "error" in r.json()
    r = cluster.post("/v1/completions", {"model": "x", "prompt": "x", "max_tokens": -1})
    assert r.status_code == 422 and "message" in r.json()["error"]


def parent_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = parent_of(pid)
    return False


def replica_pids(cluster: ClusterProcess) -> list[int]:
    """The replicas' worker processes (Ray names them by deployment) of this cluster."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ServeReplica:truffula:TruffulaReplica" in cmdline and descends_from(
            int(entry.name), cluster.proc.pid
        ):
            pids.append(int(entry.name))
    return pids


def aborted(cluster: ClusterProcess, wanted: str | None = None) -> dict[str, float]:
    """Requests aborted on each replica that answered a scrape (each answers /metrics for
    itself): scrapes go on until both replicas, or the ``wanted`` one, answered (40 at most)."""
    seen: dict[str, float] = {}
    for _ in range(40):
        r = httpx.get(cluster.url + "/metrics", headers=cluster.headers, timeout=60)
        count = 0.0
        for line in r.text.splitlines():
            if line.startswith('truffula_requests_finished_total{reason="abort"}'):
                count = float(line.split()[-1])
        seen[r.headers[REPLICA]] = count
        if (wanted in seen) if wanted else len(seen) == 2:
            break
    if wanted is None:
        assert len(seen) == 2
    return seen


def test_a_killed_replica_loses_only_its_requests(cluster) -> None:  # type: ignore[no-untyped-def]
    pids = replica_pids(cluster)
    assert len(pids) == 2, pids
    before = {generate(cluster, "Hi", None).headers[REPLICA] for _ in range(6)}
    body = {"inputs": RAW_PROMPTS[2], "parameters": {"max_new_tokens": 128}}

    def one(_: int) -> httpx.Response:
        return cluster.post("/generate", body)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(8)]
        time.sleep(2)
        os.kill(pids[0], signal.SIGKILL)
        responses = [f.result() for f in futures]
    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 503}, codes
    assert codes[200] >= 1, "the other replica's requests finish"
    assert codes[503] >= 1, "the killed replica had requests in flight"
    texts = {r.json()["generated_text"] for r in responses if r.status_code == 200}
    assert len(texts) == 1
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error_type"] == "replica_failed"
    # service goes on, and Serve starts a replica in place of the dead one
    deadline = time.time() + 240
    seen: set[str] = set()
    while time.time() < deadline:
        r = generate(cluster, "Hi", None)
        assert r.status_code in (200, 503)
        if r.status_code == 200:
            seen.add(r.headers[REPLICA])
        if len(seen - before) >= 1 and len(replica_pids(cluster)) == 2:
            break
        time.sleep(1)
    assert seen - before, "no new replica answered"


def test_stop_ends_the_cluster(cluster) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run(
        [sys.executable, "-m", "truffula.cli", "cluster", "--stop"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert cluster.proc.wait(60) == 0
    assert "stopped" in cluster.log.read_text()
