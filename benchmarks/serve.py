"""The HTTP server against the in-process engine on the same workload, measured in the same run.

    python benchmarks/serve.py [--quick] [--out DIR] [-- SERVER FLAGS]
    python benchmarks/serve.py --gpu [--quick] [--tuned-flags "FLAGS"] [-- SERVER FLAGS]
    python benchmarks/serve.py --url http://HOST:PORT --adapter-dir DIR [-- FLAGS IT RUNS WITH]

For each server configuration (the flags after ``--``; with ``--tuned-flags`` those flags added
as a second one), adapter mix (base model, or 16 distinct random PEFT LoRA adapters assigned
round-robin) and k (alternatives per token), with R requests (greedy, ignore_eos, details):

1. the engine (``EngineCore``, built from the same flags as the server) keeps C requests in
   flight, refilling as they finish, and materializes the alternatives' text: output tok/s;
2. ``truffula serve`` (started here, ``python -m truffula.cli serve``; stopped with SIGINT),
   driven by C closed-loop clients over ``POST /generate``: output tok/s (generated tokens over
   wall time), response body bytes per generated token, ratio to the engine;
3. the same over ``POST /generate_stream``: tok/s, time to first token and inter-token latency
   p50/p90/p99 as the client sees them (``p99/step``: the p99 over the engine's decode step),
   SSE bytes per token.

``--rate`` adds open-loop rows: Poisson arrivals at that many requests/s, for server and engine.
The engine's runs come first and it is freed before the server starts; ``--interleave`` (CPU)
keeps it and alternates its runs with the server's, so a shared machine's drift hits both alike;
``--repeats N`` keeps the run of median throughput of N. ``--client-procs N`` spreads the HTTP
clients over N processes (every N-th request and 1/N of the clients each), so that one client
event loop's own delays do not count as the server's. The in-process engine's garbage
collector is set as in the server's processes (``truffula/heap.py``).
The benchmark writes its adapters (``--adapter-root``) and gives the server 16 adapter slots
(``--max-active-adapters 16``) ahead of the user's flags, which may override them.

CPU (default): the default model, 32 clients, 64 requests of 30-60 prompt tokens, 64 new tokens,
k = 0, 5, 20, rank-8 adapters. ``--gpu``: a Llama-3-8B-shaped model with random bf16 weights
(``benchmarks/gpu.py``), saved with its tokenizer to a temporary folder for the server (16 GB),
64 clients, 128 requests of 512 prompt tokens, 128 new tokens, k = 0 and 20, rank-16 adapters,
server flags ``--device cuda`` plus the user's. ``--quick``: a smoke run (on GPU, the
Llama-3.2-1B shape). The GPU model's tokenizer covers few of its ids: most texts are empty, so
bytes per token there count the JSON structure rather than text. Results: a table on stdout and
``serve.json`` plus the server logs in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import itertools
import json
import multiprocessing
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import without_out  # noqa: E402

from truffula import heap  # noqa: E402
from truffula.cli import build_parser, engine_config  # noqa: E402
from truffula.engine.core import EngineCore  # noqa: E402
from truffula.sampling.params import SamplingParams  # noqa: E402

PRESETS: dict[tuple[bool, bool], dict[str, Any]] = {  # (gpu, quick)
    (False, False): dict(conc="32", requests=64, prompt=(30, 60), new=64, k="0,5,20", rank=8),
    (False, True): dict(conc="8", requests=16, prompt=(30, 60), new=16, k="0,20", rank=8),
    (True, False): dict(conc="64", requests=128, prompt=(512, 512), new=128, k="0,20", rank=16),
    (True, True): dict(conc="16", requests=32, prompt=(128, 128), new=32, k="0,20", rank=16),
}
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "a", "bird")
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MODULES += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
Work = list[tuple[str, SamplingParams]]


def write_adapters(model_dir: Path, root: Path, n: int, rank: int, dtype: torch.dtype) -> list[str]:
    """``n`` random rank-``rank`` PEFT LoRA adapters on all seven projections of a Llama-style
    model, as folders ``bench-NN`` under ``root`` (kept if already there); returns their ids."""
    from safetensors.torch import save_file

    c = json.loads((model_dir / "config.json").read_text())
    h, inter = c["hidden_size"], c["intermediate_size"]
    heads = c["num_attention_heads"]
    hd = c.get("head_dim") or h // heads
    q, kv = heads * hd, c.get("num_key_value_heads", heads) * hd
    dims = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    gen = torch.Generator().manual_seed(0)
    ids = []
    for a in range(n):
        folder = root / f"bench-{a:02d}"
        ids.append(folder.name)
        if (folder / "adapter_model.safetensors").exists():
            continue
        tensors = {}
        for layer in range(c["num_hidden_layers"]):
            for mod, (fan_in, fan_out) in zip(MODULES, dims, strict=True):
                key = f"base_model.model.model.layers.{layer}.{mod}"
                for ab, shape in (("A", (rank, fan_in)), ("B", (fan_out, rank))):
                    w = torch.randn(*shape, generator=gen) * 0.02
                    tensors[f"{key}.lora_{ab}.weight"] = w.to(dtype)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / "adapter_model.safetensors")
        targets = [m.split(".")[1] for m in MODULES]
        peft = dict(peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=rank, bias="none")
        (folder / "adapter_config.json").write_text(json.dumps({**peft, "target_modules": targets}))
    return ids


class Prompts:
    """Random word sequences cut at a token boundary to ``lo``-``hi`` tokens of the model: new
    words on every call (with prefix caching on, a repeated prompt would be answered from the
    cache), the same lengths."""

    def __init__(self, model_dir: Path, n: int, lo: int, hi: int) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.n, self.lo, self.hi = n, lo, hi
        self.words = random.Random(0)

    def __call__(self) -> list[str]:
        lengths = random.Random(0)
        out = []
        for _ in range(self.n):
            want = lengths.randint(self.lo, self.hi)
            text = " ".join(self.words.choice(WORDS) for _ in range(2 * want + 8))
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            out.append(text[: enc["offset_mapping"][want - 1][1]])
        return out


def pct(values: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 in milliseconds."""
    if not values:
        return {}
    p = np.percentile(np.array(values) * 1e3, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def engine_run(core: EngineCore, work: Work, conc: int, arrivals: list[float] | None) -> dict:
    """Serve ``work`` keeping ``conc`` requests in flight (or adding each at its arrival time)."""
    queue = list(range(len(work)))[::-1]
    decode_only: list[bool] = []  # per step: did it run decodes alone?
    schedule = core.scheduler.schedule

    def watched() -> Any:
        out = schedule()
        decode_only.append(bool(out.seqs) and all(s.num_tokens == 1 for s in out.seqs))
        return out

    core.scheduler.schedule = watched  # type: ignore[method-assign]
    steps: list[tuple[float, int]] = []  # (seconds, index of the step launched)
    added: dict[str, float] = {}
    ttft: list[float] = []
    last: dict[str, float] = {}  # request -> when its latest token came out
    itl: list[float] = []
    tokens = live = chars = 0
    if core.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    while queue or core.has_work():
        now = time.perf_counter() - t0
        while queue and (arrivals[queue[-1]] <= now if arrivals else live < conc):
            added[core.add_request(*work[queue.pop()])] = now
            live += 1
        if not core.has_work():
            time.sleep(max(0.0, arrivals[queue[-1]] - now) if arrivals else 0.0)
            continue
        before = time.perf_counter() - t0
        outs = core.step()
        t = time.perf_counter() - t0
        steps.append((t - before, len(decode_only) - 1))
        for o in outs:
            for tok in o.tokens:  # the alternatives' text, as a server builds it to answer
                chars += sum(len(a.text) for a in tok.alternatives or ())
            if o.tokens and o.request_id in added:
                ttft.append(t - added.pop(o.request_id))
            elif o.tokens and o.request_id in last:
                itl += [t - last[o.request_id]] + [0.0] * (len(o.tokens) - 1)
            if o.tokens:
                last[o.request_id] = t
            if o.finished:
                last.pop(o.request_id, None)
            tokens += len(o.tokens)
            live -= o.finished
    wall = time.perf_counter() - t0
    del core.scheduler.schedule
    # a call launches step i and (scheduling asynchronously) waits for step i - 1: both decode
    pure = [dt for dt, i in steps if i >= 1 and decode_only[i] and decode_only[i - 1]]
    return dict(
        requests=len(work),
        tokens=tokens,
        wall=wall,
        tok_s=tokens / wall,
        ttft_ms=pct(ttft),
        itl_ms=pct(itl),
        decode_step_ms=float(np.median(pure)) * 1e3 if pure else float("nan"),
    )


async def post(client: httpx.AsyncClient, body: dict, stream: bool) -> dict:
    """One request; for a stream, the arrival time of each SSE event (one event per token)."""
    t0 = time.perf_counter()
    if not stream:
        r = await client.post("/generate", json=body)
        r.raise_for_status()
        return {"t0": t0, "tokens": int(r.headers["x-generated-tokens"]), "bytes": len(r.content)}
    times: list[float] = []
    size, last = 0, b""
    async with client.stream("POST", "/generate_stream", json=body) as r:
        r.raise_for_status()
        async for chunk in r.aiter_raw():
            now = time.perf_counter()
            size += len(chunk)
            times += [now] * (last + chunk).count(b"\n\n")
            last = chunk[-1:]
    return {"t0": t0, "tokens": len(times), "bytes": size, "times": times}


async def drive_part(
    url: str, bodies: list[dict], conc: int, arrivals: list[float] | None, stream: bool
) -> tuple[list[dict], float, float, float]:
    """Closed loop (``conc`` clients, each sending its next request when the last is answered)
    or open loop (each request at its arrival time) in this process: the replies, start and
    end (``perf_counter``, one clock for every process) and this process's CPU seconds."""
    pool = len(bodies) if arrivals else conc
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    res: list[dict] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as client:
        t0, cpu0 = time.perf_counter(), time.process_time()
        if arrivals is None:
            todo = iter(bodies)

            async def worker() -> None:
                for b in todo:
                    res.append(await post(client, b, stream))

            await asyncio.gather(*(worker() for _ in range(conc)))
        else:

            async def at(b: dict, when: float) -> None:
                await asyncio.sleep(max(0.0, t0 + when - time.perf_counter()))
                res.append(await post(client, b, stream))

            await asyncio.gather(*(at(b, w) for b, w in zip(bodies, arrivals, strict=True)))
        return res, t0, time.perf_counter(), time.process_time() - cpu0


def run_part(job: tuple) -> tuple[list[dict], float, float, float, list[float]]:
    """``drive_part`` with this process's collector settled as the server's are (its own
    pauses would count as the server's), and the collections that still took 5 ms or more."""
    pauses: list[float] = []
    started = [0.0]

    def timed(phase: str, _: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            started[0] = now
        elif now - started[0] >= 0.005:
            pauses.append(now - started[0])

    worker = multiprocessing.current_process().name != "MainProcess"
    if worker:  # the main process settled its heap already
        heap.settle()
    gc.callbacks.append(timed)
    try:
        return (*asyncio.run(drive_part(*job)), pauses)
    finally:
        gc.callbacks.remove(timed)
        if worker:
            gc.unfreeze()


def drive(
    url: str,
    bodies: list[dict],
    conc: int,
    arrivals: list[float] | None,
    stream: bool,
    pool: concurrent.futures.Executor | None = None,
) -> dict:
    """``drive_part`` in this process, or split over the processes of ``pool`` (each with
    every n-th request and its share of the clients), so that one client process's event
    loop does not add its own delays to what it measures."""
    n = getattr(pool, "_max_workers", 1) if pool is not None else 1
    jobs = [
        (url, bodies[i::n], max(1, conc // n), arrivals[i::n] if arrivals else None, stream)
        for i in range(n)
    ]
    parts = list(pool.map(run_part, jobs)) if pool is not None else [run_part(jobs[0])]
    res = [r for p in parts for r in p[0]]
    wall = max(p[2] for p in parts) - min(p[1] for p in parts)
    cpu = sum(p[3] for p in parts)
    client_gc = [x for p in parts for x in p[4]]
    tokens = sum(r["tokens"] for r in res)
    want = bodies[0]["parameters"]["max_new_tokens"]
    size = sum(r["bytes"] for r in res)
    out = dict(requests=len(res), tokens=tokens, wall=wall, tok_s=tokens / wall, client_cpu_s=cpu)
    out |= dict(client_gc_pauses=len(client_gc), client_gc_max_ms=max(client_gc, default=0) * 1e3)
    out |= dict(bytes_per_token=size / max(tokens, 1), short=sum(r["tokens"] != want for r in res))
    if stream:
        out["ttft_ms"] = pct([r["times"][0] - r["t0"] for r in res if r["times"]])
        out["itl_ms"] = pct([b - a for r in res for a, b in itertools.pairwise(r["times"])])
        out["stalls"] = stalls(res)
    return out


def stalls(res: list[dict], gap_s: float = 0.025, top: int = 12) -> dict:
    """The moments streams waited ``gap_s`` or more between events, merged when they end within
    5 ms of each other: how many there were and the longest, each with its wall-clock time (to
    place beside a server's ``TRUFFULA_STALL_LOG`` lines) and how many streams it held."""
    ends = sorted(
        (b, b - a) for r in res for a, b in itertools.pairwise(r["times"]) if b - a >= gap_s
    )
    groups: list[list[tuple[float, float]]] = []
    for end, gap in ends:
        if groups and end - groups[-1][-1][0] <= 0.005:
            groups[-1].append((end, gap))
        else:
            groups.append([(end, gap)])
    to_wall = time.time() - time.perf_counter()
    worst = sorted(groups, key=lambda g: -max(x[1] for x in g))[:top]
    return dict(
        count=len(groups),
        gaps=len(ends),
        worst=[
            dict(
                at=time.strftime("%H:%M:%S", time.localtime(g[0][0] + to_wall))
                + f".{int((g[0][0] + to_wall) % 1 * 1000):03d}",
                gap_ms=round(max(x[1] for x in g) * 1e3, 1),
                streams=len(g),
            )
            for g in worst
        ],
    )


@contextlib.contextmanager
def serving(flags: list[str], log_path: Path, wait_s: float) -> Iterator[str]:
    """``truffula serve`` on a free port: ready once /health answers 200 and it logged 'serving'."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "truffula.cli", "serve", "--host", "127.0.0.1"]
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))  # this checkout's truffula first
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port), *flags],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
            process_group=0,  # its own group, in this session (and scheduling autogroup)
        )
        try:
            deadline = time.monotonic() + wait_s
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the server did not come up ({proc.returncode}):\n{tail}")
                if "serving" in log_path.read_text(errors="replace"):
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                            break
                time.sleep(0.5)
            yield url
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput, with every run's tok/s."""
    runs = sorted(runs, key=lambda r: r["tok_s"])
    return {**runs[len(runs) // 2], "runs_tok_s": [r["tok_s"] for r in runs]}


def fmt(d: dict, key: str) -> str:
    p = d.get(key) or {}
    return "/".join(f"{p[q]:.0f}" for q in ("p50", "p90", "p99")) if p else "-"


Case = tuple[int, int, str, int, list[float] | None]  # adapters, k, load label, clients, arrivals


def workload(prompts: Prompts, ids: list[str], mix: int, k: int, new: int) -> tuple[Work, list]:
    """Requests of fresh prompts for the engine (prompt, params) and for HTTP (``/generate``
    bodies): every call is a new set of prompts of the same lengths."""
    texts = prompts()
    q = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True, details=True)
    par = {"max_new_tokens": new, "ignore_eos_token": True, "details": True}
    par |= {"return_k_alternatives": k} if k else {}
    adapters = [ids[i % mix] if mix else None for i in range(len(texts))]
    work = [
        (s, q.with_updates(return_k_alternatives=k, adapter_id=a))
        for s, a in zip(texts, adapters, strict=True)
    ]
    bodies = [
        {"inputs": s, "parameters": par | ({"adapter_id": a} if a else {})}
        for s, a in zip(texts, adapters, strict=True)
    ]
    return work, bodies


def engine(flags: list[str], weights: Any, wl: Callable, cases: list[Case]) -> EngineCore:
    """The in-process engine, configured by the server's flags, warmed up on the largest case."""
    core = EngineCore(engine_config(build_parser().parse_args(["serve", *flags])), False, weights)
    mix, k, _, conc, _ = max(cases, key=lambda c: (c[0], c[1], c[3]))
    engine_run(core, wl(mix, k, 8)[0], conc, None)
    heap.settle()  # the garbage collector as in the server's processes (truffula/heap.py)
    return core


def measure(
    core: EngineCore | None,
    url: str | None,
    wl: Callable,
    new: int,
    cases: list[Case],
    repeats: int,
    pool: concurrent.futures.Executor | None = None,
) -> dict[tuple[int, int, str], dict]:
    """Each case on the engine and/or the server (``/generate``, then ``/generate_stream``),
    ``repeats`` rounds; when both are given their runs alternate, so drift hits both alike."""
    if url:  # warm-up: adapters loaded, connections opened
        mix, k, _, conc, _ = max(cases, key=lambda c: (c[0], c[1], c[3]))
        for stream in (False, True):
            drive(url, wl(mix, k, 8)[1], conc, None, stream, pool)
    out = {}
    for mix, k, label, conc, arr in cases:
        runs: dict[str, list[dict]] = {"engine": [], "server": [], "stream": []}
        for _ in range(repeats):  # fresh prompts for every run: none is a prefix-cache hit
            if core is not None:
                runs["engine"].append(engine_run(core, wl(mix, k, new)[0], conc, arr))
            for key, stream in (("server", False), ("stream", True)) if url else ():
                runs[key].append(drive(url, wl(mix, k, new)[1], conc, arr, stream, pool))
        r = out[mix, k, label] = {key: median_run(v) for key, v in runs.items() if v}
        line = f"{mix} adapters, k={k}, {label}:"
        if "engine" in r:
            line += f" engine {r['engine']['tok_s']:.1f} tok/s, ITL {fmt(r['engine'], 'itl_ms')} ms"

        if url:
            line += (
                f" server {r['server']['tok_s']:.1f} tok/s, stream {r['stream']['tok_s']:.1f} "
                f"tok/s, TTFT {fmt(r['stream'], 'ttft_ms')} ms, ITL {fmt(r['stream'], 'itl_ms')} ms"
            )
            line += "".join(f"; {r[x]['short']} {x} replies short" for x in r if r[x].get("short"))
            st = r["stream"]["stalls"]
            line += f"; client collections >= 5 ms: {r['stream']['client_gc_pauses']}"
            line += f"; {st['count']} stream stalls >= 25 ms: " + ", ".join(
                f"{w['at']} {w['gap_ms']:.0f} ms x{w['streams']}" for w in st["worst"][:6]
            )
        print(line, flush=True)
    return out


def release_memory() -> None:
    gc.unfreeze()  # heap.settle froze the engine's objects: its cycles would never be freed
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def report(rows: list[dict], head: str) -> None:
    print(
        f"\n{head}\n{'config':<8} {'adapters':>8} {'k':>3} {'load':>10} {'engine':>8} "
        f"{'server':>8} {'ratio':>6} {'stream':>8} {'ratio':>6} {'TTFT p50/90/99':>16} "
        f"{'ITL p50/90/99':>14} {'step':>5} {'p99/step':>8} {'B/tok':>6} {'SSE B/tok':>9}"
    )
    nan = {"tok_s": float("nan"), "bytes_per_token": float("nan")}
    for r in rows:
        e, s, st = r.get("engine") or nan, r.get("server") or nan, r.get("stream") or nan
        r["ratio"], r["stream_ratio"] = s["tok_s"] / e["tok_s"], st["tok_s"] / e["tok_s"]
        step = e.get("decode_step_ms", float("nan"))  # the engine's median decode-only step
        r["itl_p99_per_step"] = (st.get("itl_ms") or {}).get("p99", float("nan")) / step
        print(
            f"{r['config']:<8} {r['adapters'] or 'base':>8} {r['k']:>3} {r['load']:>10} "
            f"{e['tok_s']:>8.1f} {s['tok_s']:>8.1f} {r['ratio']:>5.2f}x {st['tok_s']:>8.1f} "
            f"{r['stream_ratio']:>5.2f}x {fmt(st, 'ttft_ms'):>16} {fmt(st, 'itl_ms'):>14} "
            f"{step:>5.1f} {r['itl_p99_per_step']:>7.1f}x "
            f"{s['bytes_per_token']:>6.0f} {st['bytes_per_token']:>9.0f}"
        )


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, server_flags = argv[:cut], argv[cut + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the Llama-3-8B-shaped model on CUDA")
    ap.add_argument("--quick", action="store_true", help="a smoke run")
    ap.add_argument("--url", help="use this running server (not started or stopped here)")
    ap.add_argument("--tuned-flags", default="", help="server flags of a second configuration")
    ap.add_argument("--concurrency", help="closed-loop clients, comma-separated (a sweep)")
    ap.add_argument("--requests", type=int, help="requests per run")
    ap.add_argument("--new", type=int, help="new tokens per request")
    ap.add_argument("--k", help="alternatives per token, comma-separated")
    ap.add_argument("--adapters", default="0,16", help="0 = base model, N = N distinct adapters")
    ap.add_argument("--rate", default="", help="open-loop requests/s, comma-separated")
    ap.add_argument("--repeats", type=int, default=1, help="runs per measurement (median kept)")
    ap.add_argument("--adapter-dir", help="where the adapters are written (default: temporary)")
    ap.add_argument("--no-engine", action="store_true", help="skip the in-process engine runs")
    ap.add_argument("--interleave", action="store_true", help="engine runs beside the server's")
    ap.add_argument(
        "--client-procs", type=int, default=1, help="processes the HTTP clients are spread over"
    )
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)
    if args.gpu and args.url:
        ap.error("--gpu builds its own random model; it cannot use --url")
    if args.gpu and args.interleave:
        ap.error("--interleave keeps the engine beside the server: not with --gpu (device memory)")
    p = PRESETS[(args.gpu, args.quick)]
    n_req, new = args.requests or p["requests"], args.new or p["new"]
    ks = [int(k) for k in (args.k or p["k"]).split(",")]
    mixes = [int(a) for a in args.adapters.split(",")]
    loads: list[tuple[str, int, list[float] | None]] = [
        (f"C={c}", int(c), None) for c in (args.concurrency or p["conc"]).split(",")
    ]
    for rate in (float(r) for r in args.rate.split(",") if r):
        rng = random.Random(1)
        arrivals = np.cumsum([rng.expovariate(rate) for _ in range(n_req)]).tolist()
        loads.append((f"{rate:g} req/s", n_req, arrivals))
    cases: list[Case] = [(m, k, *load) for m in mixes for k in ks for load in loads]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="truffula-serve-"))
    adapter_root = Path(args.adapter_dir) if args.adapter_dir else scratch / "adapters"
    hf, gpu_dir, rows = None, None, {}
    clients = None
    if args.client_procs > 1:  # started before any CUDA work; spawned, so nothing is inherited
        spawn = multiprocessing.get_context("spawn")
        clients = concurrent.futures.ProcessPoolExecutor(args.client_procs, mp_context=spawn)
        list(clients.map(time.sleep, [0.0] * args.client_procs))  # the workers, up and importing
    try:
        if args.gpu:
            import gpu  # benchmarks/gpu.py

            hf, gpu_dir = gpu.build_8b(args.quick)
            print(f"saving the random model to {gpu_dir} for the server", flush=True)
            hf.save_pretrained(gpu_dir)
            server_flags = ["--model", str(gpu_dir), "--device", "cuda", *server_flags]
        from truffula.model_store.resolve import resolve_model

        model_dir = resolve_model(build_parser().parse_args(["serve", *server_flags]).model)
        dtype = torch.bfloat16 if args.gpu else torch.float32
        ids = write_adapters(model_dir, adapter_root, max(mixes), p["rank"], dtype)
        wl = functools.partial(workload, Prompts(model_dir, n_req, *p["prompt"]), ids)
        lead = ["--adapter-root", str(adapter_root.resolve()), "--max-active-adapters", "16"]
        configs = {"default": [*lead, *server_flags]}
        if args.tuned_flags:
            configs["tuned"] = [*lead, *server_flags, *shlex.split(args.tuned_flags)]
        if args.url:
            configs = {"url": configs["default"]}
        cores: dict[str, EngineCore] = {}
        for name, flags in configs.items():  # engines first (with --interleave, kept for later)
            if args.no_engine:
                continue
            core = engine(flags, hf.state_dict() if hf is not None else None, wl, cases)
            if args.interleave:
                cores[name] = core
                continue
            for key, r in measure(core, None, wl, new, cases, args.repeats).items():
                rows[name, *key] = r
            del core
            release_memory()
        del hf
        release_memory()
        for name, flags in configs.items():
            with contextlib.ExitStack() as stack:
                log, wait = out_dir / f"server-{name}.log", 1200 if args.gpu else 300
                url = args.url or stack.enter_context(serving(flags, log, wait))
                res = measure(cores.pop(name, None), url, wl, new, cases, args.repeats, clients)
            for key, r in res.items():
                rows.setdefault((name, *key), {}).update(r)
            release_memory()
    finally:
        if clients is not None:
            clients.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
        if gpu_dir is not None:
            shutil.rmtree(gpu_dir, ignore_errors=True)
    table = [
        {"config": n, "adapters": m, "k": k, "load": lb, **r} for (n, m, k, lb), r in rows.items()
    ]
    report(
        table,
        f"{n_req} requests of {p['prompt'][0]}-{p['prompt'][1]} prompt tokens, {new} new "
        "tokens; tok/s: generated tokens / wall time; latencies in ms, from the streamed runs",
    )
    from common import machine

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": torch.cuda.get_device_name() if args.gpu else machine(),
        "command": shlex.join(["python", "benchmarks/serve.py", *without_out(sys.argv[1:])]),
        "settings": dict(requests=n_req, prompt_tokens=p["prompt"], new_tokens=new, rank=p["rank"]),
        "configs": configs,
        "rows": table,
    }
    (out_dir / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_dir / 'serve.json'}")


if __name__ == "__main__":
    main()
