"""What a step costs by its make-up: decodes alone, and decodes with a prefill chunk beside them.

    python benchmarks/steps.py [--quick] [--profile] [--out DIR]

The Llama-3-8B-shaped model of ``benchmarks/gpu.py`` (``--quick``: the Llama-3.2-1B shape) on
CUDA, scheduled synchronously so each step is timed alone. 64 requests decode; then, for each
chunk size P, one request of 2P prompt tokens arrives with ``max_prefill_while_decoding = P``:
its first step carries 64 decodes + P new prompt tokens (``fresh``), its second 64 decodes + P
tokens that attend to the P already cached (``continued``). Medians of 5 arrivals, against the
median decode-only step (CUDA graphs) and against a decode-only step run eagerly, which is
what a mixed step's launch overhead is made of. ``--profile``: the torch profiler's table of a
continued step at P = 256. Results on stdout and ``steps.json`` in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import gpu  # benchmarks/gpu.py
import torch

from truffula.sampling.params import SamplingParams

CHUNKS = (64, 128, 256, 512, 1024)


def timed_step(core: gpu.EngineCore) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    core.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    hf, folder = gpu.build_8b(args.quick)
    core = gpu.engine_for(
        folder,
        hf,
        max_num_seqs=72,
        kv_cache_memory=16 << 30,
        max_num_batched_tokens=8192,
        async_scheduling="off",
        enable_prefix_caching=False,  # arrivals repeat a token: cache hits would skip prefill
    )
    keep = SamplingParams(max_new_tokens=3000, temperature=0, ignore_eos=True)
    for i in range(64):
        core.add_request([11 + i % 50] * 128, keep)
    while any(s.num_pending > 1 for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    for _ in range(5):
        core.step()
    decode = statistics.median(timed_step(core) for _ in range(20))
    res: dict = {"decode_graph_ms": decode}
    graphs, core.runner.graphs = core.runner.graphs, None  # the same step without its graph
    core.step()
    res["decode_eager_ms"] = statistics.median(timed_step(core) for _ in range(10))
    core.runner.graphs = graphs
    one = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    for p in CHUNKS:
        core.scheduler.max_prefill_while_decoding = p
        fresh, cont = [], []
        for rep in range(6):
            core.add_request([200 + rep] * (2 * p), one)
            a, b = timed_step(core), timed_step(core)
            if rep:  # the first arrival compiles this size's kernels
                fresh.append(a)
                cont.append(b)
            while core.scheduler.waiting or len(core.scheduler.running) > 64:
                core.step()
        res[f"P={p}"] = {
            "fresh_ms": statistics.median(fresh),
            "continued_ms": statistics.median(cont),
        }
    print(
        f"decode-only step, 64 requests: {decode:.2f} ms (graph), {res['decode_eager_ms']:.2f} ms (eager)"
    )
    print(f"{'P':>6} {'fresh ms':>9} {'x decode':>8} {'continued ms':>13} {'x decode':>8}")
    for p in CHUNKS:
        r = res[f"P={p}"]
        print(
            f"{p:>6} {r['fresh_ms']:>9.2f} {r['fresh_ms'] / decode:>7.2f}x "
            f"{r['continued_ms']:>13.2f} {r['continued_ms'] / decode:>7.2f}x"
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        core.scheduler.max_prefill_while_decoding = 256
        core.add_request([300] * 512, one)
        core.step()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed_step(core)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "steps.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
