"""Reports of ``benchmarks/gpu.py``: where 8B decode steps spend their time on CUDA (the torch
profiler's kernel table and the runner's host time for batch 1, batch 64 with k = 0 / 20 and 64
distinct adapters), and the plots of a run.

    python benchmarks/gpu.py --profile [--out DIR]   # writes profile.txt to --out
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import random_adapters
from gpu import LLAMA3_8B, build, engine_8b

from truffula.sampling.params import SamplingParams


def profile(out_dir: Path) -> None:
    """Kernel and host time of 8B decode steps: batch 1, batch 64 with k = 0 / 20, 64 adapters."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    hf8, f8 = build(LLAMA3_8B)
    core = engine_8b(f8, hf8)
    del hf8
    torch.cuda.empty_cache()
    keys = random_adapters(core.adapters, 64, 16, 0.01, "cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 128000, (512,), generator=gen).tolist() for _ in range(64)]
    report = []
    base = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    cases = {
        "b1": ([prompts[0]], [base]),
        "b64_k0": (prompts, [base] * 64),
        "b64_k20": (prompts, [base.with_updates(return_k_alternatives=20)] * 64),
        "b64_lora64": (prompts, [base.with_updates(adapter_id=keys[i]) for i in range(64)]),
        "b64_lora1": (prompts, [base.with_updates(adapter_id=keys[0])] * 64),
    }
    runner = core.runner
    for name, (ps, qs) in cases.items():
        for p, q in zip(ps, qs, strict=True):
            core.add_request(p, q)
        while any(r.num_pending > 1 for r in core.scheduler.running) or core.scheduler.waiting:
            core.step()
        for _ in range(5):
            core.step()
        t_launch: list[float] = []
        t_collect: list[float] = []
        t_step: list[float] = []
        originals = {"launch": runner.launch, "collect": runner.collect}

        def timer(fn, acc):  # type: ignore[no-untyped-def]
            def timed(*args):  # type: ignore[no-untyped-def]
                t = time.perf_counter()
                out = fn(*args)
                acc.append(time.perf_counter() - t)
                return out

            return timed

        runner.launch = timer(runner.launch, t_launch)  # type: ignore[method-assign]
        runner.collect = timer(runner.collect, t_collect)  # type: ignore[method-assign]
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                t = time.perf_counter()
                core.step()
                t_step.append(time.perf_counter() - t)
        runner.launch, runner.collect = originals["launch"], originals["collect"]  # type: ignore[method-assign]
        for rid in list(core.requests):
            core.abort(rid)
        core.step()
        table = prof.key_averages().table(
            sort_by="device_time_total", row_limit=14, max_name_column_width=60
        )
        line = (
            f"== {name}: step {1e3 * statistics.median(t_step):.2f} ms, runner.launch "
            f"{1e3 * statistics.median(t_launch):.2f} ms, runner.collect (waits for the "
            f"previous step) {1e3 * statistics.median(t_collect):.2f} ms"
        )
        print(line, flush=True)
        report += [line, table]
    (out_dir / "profile.txt").write_text("\n".join(report))


def plot(res: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    conc = sorted(res["concurrency_tok_s"], key=int)
    a.plot([int(c) for c in conc], [res["concurrency_tok_s"][c] for c in conc], "o-")
    a.set_xlabel("concurrent requests (512 in / 128 out)")
    a.set_ylabel("output tokens / s")
    a.set_title("Llama-3-8B shape, bf16")
    d = sorted(res["d"], key=int)
    b.plot([int(x) for x in d], [res["d"][x] for x in d], "o-")
    b.axhline(1.0, color="gray", lw=0.8)
    b.set_xscale("log", base=2)
    b.set_xlabel("distinct rank-16 adapters in 64 requests")
    b.set_ylabel("throughput / base model")
    b.set_ylim(0, 1.1)
    fig.suptitle(f"truffula on {res['device']} ({res['date']})")
    fig.tight_layout()
    fig.savefig(out_dir / "gpu.png", dpi=120)
