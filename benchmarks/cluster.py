"""``truffula cluster`` on CPU with the default model: replicas and adapter affinity.

    python benchmarks/cluster.py [--requests 64] [--new-tokens 32] [--rounds 4]

1. Throughput (scaled down): 64 concurrent greedy requests (``ignore_eos``) against 1 replica,
   then against 2 replicas, each cluster started fresh on a local Ray instance; output tokens
   per second over the whole batch, and the ratio.
2. Adapter affinity: on the 2-replica cluster, ``--rounds`` passes over 32 adapters (copies of
   the example adapters under 32 names, hard links in a temporary root), in a random order,
   8 at a time. A request is a *hit* when the replica that answered it (``x-truffula-replica``)
   had already served its adapter; the same sequence routed at random is the baseline
   (simulated, mean of 200 draws).

On a 2-core machine two replicas share the same cores, so (1) measures the cost of the extra
process more than a gain; on a machine with a core set (or a GPU) per replica it is the scaling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from common import machine, write_result

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "adapters"
ADAPTERS = 32
PROMPT = "Write a short story about a lighthouse keeper."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, replicas: int, adapter_root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="truffula-cluster-bench-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "truffula.cli", "cluster", "--port", str(self.port)]
        cmd += ["--replicas", str(replicas), "--cpus-per-replica", "0.5"]
        cmd += ["--adapter-root", str(adapter_root), "--max-cpu-adapters", str(ADAPTERS)]
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy()
        )
        deadline = time.time() + 600
        while "serving" not in self.log.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"truffula cluster did not start:\n{self.log.read_text()}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._out.close()


async def post(
    client: httpx.AsyncClient, url: str, adapter: str | None, new_tokens: int
) -> httpx.Response:
    params: dict[str, Any] = {"max_new_tokens": new_tokens, "ignore_eos": True}
    if adapter is not None:
        params["adapter_id"] = adapter
    r = await client.post(url + "/generate", json={"inputs": PROMPT, "parameters": params})
    r.raise_for_status()
    return r


async def throughput(url: str, requests: int, new_tokens: int) -> float:
    async with httpx.AsyncClient(timeout=1200) as client:
        await post(client, url, None, 4)  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(post(client, url, None, new_tokens) for _ in range(requests)))
        return requests * new_tokens / (time.perf_counter() - start)


async def affinity(url: str, rounds: int, new_tokens: int) -> tuple[list[str], list[str]]:
    """The adapters in the order sent, and the replica that answered each."""
    rng = random.Random(0)
    order = [f"a{i:02d}" for i in range(ADAPTERS) for _ in range(rounds)]
    rng.shuffle(order)
    replicas: list[str] = [""] * len(order)
    gate = asyncio.Semaphore(8)
    async with httpx.AsyncClient(timeout=1200) as client:

        async def one(i: int) -> None:
            async with gate:
                r = await post(client, url, order[i], new_tokens)
                replicas[i] = r.headers["x-truffula-replica"]

        await asyncio.gather(*(one(i) for i in range(len(order))))
    return order, replicas


def hit_rate(order: list[str], replicas: list[str]) -> float:
    held: dict[str, set[str]] = defaultdict(set)
    hits = 0
    for adapter, replica in zip(order, replicas, strict=True):
        hits += adapter in held[replica]
        held[replica].add(adapter)
    return hits / len(order)


def random_hit_rate(order: list[str], names: list[str], draws: int = 200) -> float:
    rng = random.Random(1)
    return statistics.mean(
        hit_rate(order, [rng.choice(names) for _ in order]) for _ in range(draws)
    )


def adapter_root() -> Path:
    """32 adapters: the example adapters under 32 names (hard links, no copies)."""
    root = Path(tempfile.mkdtemp(prefix="truffula-adapters-"))
    sources = sorted(p for p in EXAMPLES.iterdir() if (p / "adapter_config.json").exists())
    for i in range(ADAPTERS):
        folder = root / f"a{i:02d}"
        folder.mkdir()
        for f in sources[i % len(sources)].iterdir():
            os.link(f, folder / f.name)
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    root = adapter_root()
    result: dict[str, Any] = {"requests": args.requests, "new_tokens": args.new_tokens}
    try:
        for n in (1, 2):
            cluster = Cluster(n, root)
            try:
                tok_s = asyncio.run(throughput(cluster.url, args.requests, args.new_tokens))
                result[f"{n}_replica_tok_s"] = tok_s
                print(f"{n} replica(s), {args.requests} concurrent: {tok_s:.1f} tok/s", flush=True)
                if n == 2:
                    order, replicas = asyncio.run(affinity(cluster.url, args.rounds, 8))
            finally:
                cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["ratio_2_to_1"] = result["2_replica_tok_s"] / result["1_replica_tok_s"]
    names = sorted(set(replicas))
    result["affinity_hit_rate"] = hit_rate(order, replicas)
    result["random_hit_rate"] = random_hit_rate(order, names)
    result["adapter_requests"] = len(order)
    print(f"machine: {machine()}")
    print(f"2 replicas / 1: {result['ratio_2_to_1']:.2f}x")
    print(
        f"adapter hit rate, {ADAPTERS} adapters x {args.rounds}: "
        f"{result['affinity_hit_rate']:.0%} routed by adapter, "
        f"{result['random_hit_rate']:.0%} at random"
    )
    write_result("cluster", result)


if __name__ == "__main__":
    main()
